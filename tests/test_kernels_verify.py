"""The fused verification kernel against its torch reference (interpreted on CPU, compiled on CUDA).

Every rule with alphas on both sides of its decisions, greedy and sampling, top-k/top-p, ragged drafts,
the cross-vocabulary proposal read through t2d (twins folded, merged spans), fp16/fp32 logits, invalid
rows and the zero-mass residual. Outputs must be equal (acceptance probabilities close); the noise and
uniforms are passed in, so both sides draw the same tokens.
"""

from __future__ import annotations

import pytest
import torch
from omnidraft_fast.kernels import rows
from omnidraft_fast.kernels.cascade import READ_P1, RULE_IDS, RULES, rules_held
from omnidraft_fast.kernels.proposal import (
    CrossProposal,
    TargetProposal,
    fold_twins_,
    target_proposal_reference,
)
from omnidraft_fast.kernels.sampling import sampling_probs_reference
from omnidraft_fast.kernels.verify import verify_reference, verify_triton

from omnidraft_fast import ops
from omnidraft_fast.graphs import ReplayGraph

pytestmark = pytest.mark.kernels
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# (rule, alpha) on both sides of each decision: exact at one end, lenient at the other.
RULE_ALPHAS = [
    ("exact", 0.0), ("chow", 0.0), ("chow", 0.6), ("chow", 1.0), ("diff", -1.0), ("diff", 0.1),
    ("diff", 0.8), ("opt", 0.0), ("opt", 3.0), ("token_v1", -1.0), ("token_v1", 0.05), ("token_v2", -1e-9),
    ("token_v2", 0.4), ("token_v3", 0.0), ("token_v3", 0.9), ("lossy", 0.0), ("lossy", 0.6),
]  # fmt: skip


def _rules(batch: int, offset: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [RULE_ALPHAS[(offset + i) % len(RULE_ALPHAS)] for i in range(batch)]
    rule = torch.tensor([RULES.index(r) for r, _ in pairs], device=device)
    return rule, torch.tensor([a for _, a in pairs], dtype=torch.float32, device=device)


def _case(
    batch: int,
    k: int,
    vocab: int,
    temperature: float,
    *,
    seed: int = 0,
    offset: int = 0,
    vocab_d: int | None = None,
    separate_t1: bool = False,
    top_k: int = 0,
    top_p: float = 1.0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    support_only: bool = False,
) -> dict:
    """Inputs of ``verify_triton``: target logits near the drafter's (so that drafts are often accepted),
    drafts sampled from ``q`` (its argmax when greedy), some rows cut short (-1). With ``support_only``, a
    third of the target's logits are -inf (a processors' mask), at about 40% of the drafts too."""
    generator = torch.Generator().manual_seed(seed)
    vocab_q = vocab if vocab_d is None else vocab_d
    draft_logits = torch.randn(batch, k, vocab_q, generator=generator) * 3
    probs1 = draft_logits.softmax(-1)
    if temperature == 0.0:
        draft = draft_logits.argmax(-1)
        probs = torch.nn.functional.one_hot(draft, vocab_q).float()
    else:
        probs = sampling_probs_reference(draft_logits, temperature, top_k, top_p)
        draft = torch.multinomial(probs.reshape(-1, vocab_q), 1, generator=generator).reshape(batch, k)
    lengths = torch.randint(0, k + 1, (batch,), generator=generator)
    lengths[0] = k
    cut = torch.arange(k) >= lengths[:, None]  # [batch, k]
    cross = None
    if vocab_d is None:
        target_logits = torch.cat([draft_logits, torch.zeros(batch, 1, vocab)], 1)
        draft_ids = draft.masked_fill(cut, -1)
        probs, probs1 = probs.masked_fill(cut[..., None], 0.0), probs1.masked_fill(cut[..., None], 0.0)
    else:
        cross, twins, draft_ids, target_logits = _cross(draft, cut, vocab, vocab_d, generator)
        # the drafted tokens' own probabilities, read before folding (as the rounds do)
        path, path1 = (p.gather(2, cross.drafter_ids[..., None])[..., 0] for p in (probs, probs1))
        cross = cross._replace(path=path, path_t1=path1 if separate_t1 else None)
        for p in (probs, probs1):
            fold_twins_(p, twins)
    target_logits = target_logits + torch.randn(batch, k + 1, vocab, generator=generator) * 1.5
    if support_only:
        outside = torch.rand(batch, k + 1, vocab, generator=generator) < 0.3
        at_draft = (torch.rand(batch, k, generator=generator) < 0.4) & (draft_ids >= 0)
        outside[:, :k] |= torch.zeros(batch, k, vocab, dtype=torch.bool).scatter_(
            2, draft_ids.clamp_min(0)[..., None], at_draft[..., None]
        )
        target_logits = target_logits.masked_fill(outside, -torch.inf)
    rule, alpha = _rules(batch, offset, "cpu")
    case = dict(
        target_logits=target_logits.to(dtype),
        draft_ids=draft_ids,
        draft_probs=probs,
        draft_probs_t1=probs1 if separate_t1 else None,
        uniforms=torch.rand(batch, k, generator=generator),
        noise=torch.empty(batch, vocab).exponential_(generator=generator),
        rule=rule,
        alpha=alpha,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        cross=cross,
    )
    if support_only:
        case["support_only"] = True
    if cross is not None:
        case["cross"] = CrossProposal(*(None if t is None else t.to(device) for t in cross))
    return {name: v.to(device) if isinstance(v, torch.Tensor) else v for name, v in case.items()}


def _cross(draft, cut, vocab, vocab_d, generator):
    """A bridge between vocabularies of different sizes (60% of the smaller vocabulary mapped, a few drafter twins)
    and a translation of the drafts with spans of 1-3 drafter tokens (2-3: merged n-gram tokens) and
    split tokens (2-3 target pieces of one drafter token). About half the rows with room stop at a drafted
    token that does not translate (kernels/translate.py's stop), the others run out at their cut."""
    batch, k = draft.shape
    mapped = int(0.6 * min(vocab, vocab_d))  # a bridge is one-to-one: at most the smaller vocabulary
    targets = torch.randperm(vocab, generator=generator)[:mapped]
    drafters = torch.randperm(vocab_d, generator=generator)[:mapped]
    t2d = torch.full((vocab,), -1, dtype=torch.int32)
    t2d[targets] = drafters.int()
    d2t = torch.full((vocab_d,), -1, dtype=torch.int32)
    d2t[drafters] = targets.int()
    unmapped = torch.nonzero(d2t < 0)[:, 0]
    twins = torch.stack([unmapped[:4], drafters[:4]])  # fold 4 unmapped ids onto mapped ones
    draft = torch.where(d2t[draft] >= 0, draft, drafters[draft % mapped])  # drafts the bridge can read
    draft_ids = torch.full((batch, k), -1)
    source = torch.zeros(batch, k, dtype=torch.int64)
    span_end = torch.zeros(batch, k, dtype=torch.int64)
    for b in range(batch):
        end = int((~cut[b]).sum())  # the row's draft length
        stop = (
            int(torch.randint(0, end, (), generator=generator))
            if end and torch.rand((), generator=generator) < 0.5
            else end
        )
        u = j = 0
        while u < stop and j < k:
            size = int(torch.randint(0, 4, (), generator=generator))  # 0: a split token, 2-3 pieces
            if size == 0:
                pieces = min(int(torch.randint(2, 4, (), generator=generator)), k - j)
                for piece in range(pieces):
                    source[b, j], span_end[b, j] = u, u + (piece == pieces - 1)
                    draft_ids[b, j] = int(torch.randint(0, vocab, (), generator=generator))
                    j += 1
                u += 1
                continue
            size = min(size, stop - u)
            source[b, j], span_end[b, j] = u, u + size
            draft_ids[b, j] = (
                d2t[draft[b, u]] if size == 1 else int(torch.randint(0, vocab, (), generator=generator))
            )
            u, j = u + size, j + 1
        if j < k:  # the stop
            source[b, j:] = min(u, k - 1)
            span_end[b, j:] = min(u, k - 1)
            if u < end:  # at a drafted token with no target token
                draft[b, u] = unmapped[4 + u % (len(unmapped) - 4)]
                span_end[b, j] = u + 1
    target_logits = torch.randn(batch, k + 1, vocab, generator=generator)
    return CrossProposal(draft, source, span_end, d2t, t2d), twins, draft_ids, target_logits


def _reference(case: dict) -> tuple[torch.Tensor, ...]:
    q, q1, cross = case["draft_probs"], case["draft_probs_t1"], case["cross"]
    if cross is not None:
        q = target_proposal_reference(q, case["draft_ids"], cross)
        q1 = (
            None
            if q1 is None
            else target_proposal_reference(q1, case["draft_ids"], cross._replace(path=cross.path_t1))
        )
    return verify_reference(
        case["target_logits"], case["draft_ids"], q, q1, case["uniforms"], case["noise"], case["rule"],
        case["alpha"], case["temperature"], case["top_k"], case["top_p"], support_only=case.get("support_only", False),
    )  # fmt: skip


def _check(case: dict, block: int = 128) -> tuple[torch.Tensor, ...]:
    """The kernel equals the reference on every valid row (invalid rows: only the flags); returns the
    kernel's outputs (interpreted, a launch costs seconds: tests read these instead of launching again)."""
    got = verify_triton(**case, block=block)
    want = _reference(case)
    names = ("num_accepted", "output_tokens", "accept_probs", "deferred", "invalid")
    assert torch.equal(got[4], want[4]), "invalid"
    rows = ~want[4].any(1)
    for name, g, w in zip(names[:4], got[:4], want[:4], strict=True):
        if name == "accept_probs":
            torch.testing.assert_close(g[rows], w[rows], msg=name)
        else:
            assert torch.equal(g[rows], w[rows]), f"{name}: {g[rows].tolist()} != {w[rows].tolist()}"
    return got


def test_split_pieces_propose_a_point_mass():
    """A split token's later pieces are proposed with certainty (kernels/proposal.py); the kernel reads
    them the same way (test_cross_vocabulary)."""
    case = _case(8, 4, 300, 1.0, seed=0, vocab_d=257)
    cross, ids = case["cross"], case["draft_ids"]
    q = target_proposal_reference(case["draft_probs"], ids, cross)
    previous = torch.cat([torch.full((8, 1), -1), cross.source[:, :-1]], 1)
    pieces = (cross.source == previous) & (ids >= 0)
    assert pieces.any() and (~pieces & (ids >= 0)).any()
    point = torch.nn.functional.one_hot(ids.clamp_min(0), 300).float()
    assert torch.equal(q[pieces], point[pieces])
    assert not torch.equal(q[~pieces & (ids >= 0)], point[~pieces & (ids >= 0)])


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.3])
def test_every_rule(temperature):
    for offset in (0, 9):
        _check(_case(9, 2, 300, temperature, seed=offset, offset=offset))


@pytest.mark.parametrize(("batch", "k"), [(1, 1), (2, 4)])
def test_shapes(batch, k):
    """One row split over several programs per position; k = 4 with ragged drafts."""
    _check(_case(batch, k, 300, 1.0, seed=k, offset=3))
    _check(_case(batch, k, 300, 0.0, seed=k, offset=9), block=64)


@pytest.mark.parametrize(("temperature", "separate_t1"), [(0.0, False), (0.7, True)])
def test_cross_vocabulary(temperature, separate_t1):
    """q' gathered through t2d with the merge adjustments; the rules read the T = 1 proposal."""
    for offset in (0, 9):
        _check(
            _case(
                8, 3, 300, temperature, seed=offset + 1, offset=offset, vocab_d=257, separate_t1=separate_t1
            )
        )


@pytest.mark.parametrize(
    ("temperature", "vocab_d", "top_k"), [(0.0, 257, 0), (0.8, 257, 0), (1.0, 257, 20), (0.8, None, 0)]
)
def test_support_only(temperature, vocab_d, top_k):
    """``support_only``: q' (and q1') count only where the target's logits are finite, so every rule, kernel
    and reference alike, rejects and defers a draft outside that support and emits no token outside it,
    where the unrestricted rules keep such drafts (chow at alpha 1 keeps every draft, exact rows none)."""
    outside_drafts = kept_outside = 0
    for offset in (0, 3, 9):
        case = _case(9, 3, 300, temperature, seed=40 + offset, offset=offset, vocab_d=vocab_d, separate_t1=True,
                     top_k=top_k, support_only=True)  # fmt: skip
        _, tokens, accept, deferred, invalid = _check(case)
        logits, ids = case["target_logits"], case["draft_ids"]
        outside = logits[:, :-1].gather(2, ids.clamp_min(0)[..., None])[..., 0].isneginf() & (ids >= 0)
        outside_drafts += int(outside.sum())
        assert (accept[outside] == 0).all() and deferred[outside].all()
        rows = ~invalid.any(1)
        emitted = logits.gather(2, tokens.clamp_min(0)[..., None])[..., 0]
        assert not (emitted.isneginf() & (tokens >= 0))[rows].any()
        kept_outside += int((_reference({**case, "support_only": False})[2][outside] > 0).sum())
    assert outside_drafts >= 5
    assert kept_outside, (
        "the unrestricted rules accept no draft outside the support: the case tells nothing apart"
    )


@pytest.mark.parametrize(("top_k", "top_p"), [(20, 1.0), (0, 0.8), (50, 0.9)])
def test_top_k_top_p(top_k, top_p):
    _check(_case(3, 2, 300, 0.7, seed=top_k, offset=top_k % 7, top_k=top_k, top_p=top_p))


@pytest.mark.parametrize(("top_k", "top_p"), [(1, 1.0), (0, 0.5)])
def test_filters_at_temperature_one(top_k, top_p):
    """At T = 1 with top-k or top-p, the law verified is filtered but the rules' p1 stays the unfiltered
    softmax (the reference reuses p as p1 only where nothing is filtered): every rule reading p1."""
    case = _case(10, 2, 300, 1.0, seed=31, offset=4, top_k=top_k, top_p=top_p)  # diff .. token_v3
    assert set(case["rule"].tolist()) >= READ_P1
    _check(case)


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(1.0, 1, 1.0), (1.0, 10, 1.0), (1.0, 0, 0.05), (0.05, 0, 1.0)]
)
def test_rules_read_the_unfiltered_t1_softmax(temperature, top_k, top_p):
    """diff at alpha 0 keeps a draft where max q1 >= max p1, p1 the unfiltered T = 1 softmax (about 0.1 here,
    q1's max about 0.5), even where the law verified (filtered, or at a low temperature) is close to a point
    mass, whose max would defer every position."""
    generator = torch.Generator().manual_seed(4)
    batch, k, vocab = 4, 3, 50
    logits = torch.randn(batch, k + 1, vocab, generator=generator) * 0.5
    q = (torch.randn(batch, k, vocab, generator=generator) * 3).softmax(-1)
    drafts = q.argmax(-1)
    assert (q.amax(-1) > logits[:, :k].softmax(-1).amax(-1)).all()
    noise = torch.empty(batch, vocab).exponential_(generator=generator)
    out = ops.verify(logits, drafts, q, torch.rand(batch, k, generator=generator), noise, temperature=temperature,
                     top_k=top_k, top_p=top_p, rule=torch.full((batch,), RULES.index("diff")),
                     alpha=torch.zeros(batch))  # fmt: skip
    assert not out[3].any()  # deferred nowhere


@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("rules", ["exact", "mixed"])
def test_a_token_the_target_never_draws_is_rejected_at_a_zero_uniform(temperature, rules):
    """a_j = 0 rejects even at u_j = 0 (the accept test is u < a): a draft the (filtered) target gives no
    probability never passes, in kernel and reference (the greedy exact path's shortcut too)."""
    case = _case(3, 2, 300, temperature, seed=12, top_k=5)
    case["uniforms"].zero_()
    if rules == "exact":  # every row exact: the reference takes its shortcuts
        case["rule"], case["alpha"] = torch.zeros_like(case["rule"]), torch.zeros_like(case["alpha"])
    for num_accepted, _, accept, _, _ in (_check(case), _reference(case)):
        zero = (accept == 0) & (case["draft_ids"] >= 0)
        assert zero.any()
        first_zero = torch.where(zero, torch.arange(2), 2).amin(-1)
        assert (num_accepted <= first_zero).all()


def test_fp16_logits_and_separate_t1():
    _check(_case(4, 3, 300, 1.3, seed=5, offset=2, dtype=torch.float16, separate_t1=True))


def test_column_major_noise():
    """Noise laid out vocabulary-major (a transposed buffer) is made contiguous first."""
    case = _case(3, 3, 200, 0.9, seed=6)
    noise = case["noise"].t().contiguous().t()
    assert noise.stride(-1) != 1
    _check({**case, "noise": noise})


@pytest.mark.parametrize("programs", [4, 256], ids=["one_chunk", "chunks"])
def test_invalid_rows(programs, monkeypatch):
    """NaN, +inf and all -inf positions are flagged where they are; the other rows are unaffected. At 256
    programs (a GPU's count) each position's vocabulary is split over 3 chunks, a count that is not a power
    of two (the kernel pads the chunk axis)."""
    monkeypatch.setattr(rows, "target_programs", lambda device, per_sm=4: programs)
    for top_p in (1.0, 0.9):
        case = _case(4, 2, 300, 0.7, seed=7, top_p=top_p)
        logits = case["target_logits"]
        logits[0, 1, 17] = float("nan")
        logits[1, 2, 200] = float("inf")
        logits[2, 0] = float("-inf")
        flagged = _check(case)[4]
        assert flagged.tolist() == [
            [False, True, False],
            [False, False, True],
            [True, False, False],
            [False] * 3,
        ]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_zero_mass_residual(temperature):
    """q == p at a rejected position (nothing proposed): the residual has no mass and pi = p is drawn."""
    case = _case(3, 2, 300, temperature, seed=11)
    logits = case["target_logits"]
    logits[:, :2] = float("-inf")
    logits[:, :2, 123] = 0.0  # p one-hot at 123 exactly, in both implementations
    case["draft_probs"] = torch.nn.functional.one_hot(torch.full((3, 2), 123), 300).float()
    case["draft_ids"] = torch.tensor([[-1, -1], [123, -1], [123, 123]])
    got = _check(case)
    assert got[1].tolist() == [[123, -1, -1], [123, 123, -1], [123, 123, got[1][2, 2].item()]]


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_kept_drafts_pass_without_a_coin_flip(temperature):
    """SPEC §3: with r = 0 (or a drafted token in the kept set A) the draft is accepted without a coin flip:
    pi(y) >= q(y), so a_j is exactly 1 and even the largest uniform below 1 passes, every rule and alpha."""
    case = _case(len(RULE_ALPHAS), 3, 300, temperature, seed=21, separate_t1=True)
    case["uniforms"].fill_(torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)).item())
    for num_accepted, _, accept, deferred, _ in (_check(case), _reference(case)):
        kept = ~deferred & (case["draft_ids"] >= 0)
        assert kept.any() and (accept[kept] == 1.0).all(), accept[kept].tolist()
        assert torch.equal(num_accepted, (accept == 1.0).cumprod(-1).sum(-1))  # u < 1 passes only a_j = 1


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("vocab_d", [None, 200])
def test_exact_reference_shortcuts(vocab_d, temperature):
    """With no deferral rule (``rule=None``) the reference skips the cascade machinery (pi = p; greedy, it
    reads the argmax only): the same outputs as its general path with every row's rule "exact", drafts
    the proposal gave no mass included."""
    for seed in range(6):
        case = _case(5, 4, 300, temperature, seed=seed, vocab_d=vocab_d)
        q = case["draft_probs"]
        if case["cross"] is not None:
            q = target_proposal_reference(q, case["draft_ids"], case["cross"])
        q[1, 0] = 0.0  # row 1's first draft has no proposal mass: rejected whatever p says
        case["target_logits"][2, 1, 5] = float("nan")  # an invalid row
        args = (case["target_logits"], case["draft_ids"], q, None, case["uniforms"], case["noise"])
        shortcut = verify_reference(*args, None, None, temperature, 0, 1.0)
        exact = torch.zeros(5, dtype=torch.int64), torch.zeros(5)
        general = verify_reference(*args, *exact, temperature, 0, 1.0, rules=RULE_IDS)  # no rule read off
        for name, a, b in zip(("num_accepted", "output", "accept_probs", "deferred", "invalid"), shortcut,
                              general, strict=True):  # fmt: skip
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=f"seed {seed}: {name}")
        assert shortcut[0][1] == 0


def _equal(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...], msg: str) -> None:
    names = ("num_accepted", "output_tokens", "accept_probs", "deferred", "invalid")
    for name, g, w in zip(names, got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True, msg=f"{msg}: {name}")


@pytest.mark.parametrize("vocab_d", [None, 200], ids=["shared", "cross"])
@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(0.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 0, 1.0), (1.0, 20, 0.9)]
)
def test_reference_computes_only_the_rules_held(vocab_d, temperature, top_k, top_p):
    """The reference computes only the rules its rows hold (told, or read off the CPU rule tensor: exact rows
    take the shortcuts, T = 1 unfiltered reuses p as p1) and reads q' through ``cross`` (densely only where a
    deferral rule reads whole rows): bit for bit its general path (every rule computed and selected per row,
    q' built densely first), for each (rule, alpha) of RULE_ALPHAS on every row, the mix of rules, and no
    rule; greedy and sampled, shared and cross vocabularies, with and without a separate T = 1 proposal."""
    cases = [*((r, a) for r, a in RULE_ALPHAS), ("mix", None), (None, None)]
    for i, (name, alpha) in enumerate(cases):
        for separate_t1 in (False, True):
            case = _case(5, 3, 300, temperature, seed=i, offset=i, vocab_d=vocab_d, separate_t1=separate_t1,
                         top_k=top_k, top_p=top_p)  # fmt: skip
            rule, alphas, held = case["rule"], case["alpha"], set(case["rule"].tolist())
            if name is None:
                rule = alphas = held = None
            elif name != "mix":
                rule, alphas, held = (
                    torch.full((5,), RULES.index(name)),
                    torch.full((5,), alpha),
                    {RULES.index(name)},
                )
            q, q1, cross, ids = case["draft_probs"], case["draft_probs_t1"], case["cross"], case["draft_ids"]
            dense, dense1 = q, q1
            if cross is not None:
                dense = target_proposal_reference(q, ids, cross)
                dense1 = (
                    None
                    if q1 is None
                    else target_proposal_reference(q1, ids, cross._replace(path=cross.path_t1))
                )
            head = (case["target_logits"], ids)
            tail = (case["uniforms"], case["noise"], rule, alphas, temperature, top_k, top_p)
            general = verify_reference(*head, dense, dense1, *tail, rules=RULE_IDS)
            msg = f"{name} {alpha} separate_t1={separate_t1}"
            _equal(verify_reference(*head, q, q1, *tail, cross), general, f"{msg}, read off")
            _equal(verify_reference(*head, q, q1, *tail, cross, rules=held), general, f"{msg}, told")
            _equal(verify_reference(*head, dense, dense1, *tail, rules=held), general, f"{msg}, q' dense")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_t1_softmax_is_the_unwarped_target(dtype):
    """At T = 1 with no top-k/top-p the reference takes the rules' T = 1 softmax p1 from the sampled-from p:
    softmax(logits / 1) is softmax(logits) bit for bit, also sliced from the k + 1 positions."""
    logits = (4 * torch.randn(3, 5, 3072, generator=torch.Generator().manual_seed(0))).to(dtype)
    p = sampling_probs_reference(logits, 1.0, 0, 1.0)
    assert torch.equal(p[:, :4], logits[:, :4].float().softmax(-1))


def test_exact_rows_of_float64_greedy_stay_on_the_general_path():
    """The greedy shortcut takes the argmax of float64 logits in float64, the general path in fp32: where
    they differ (a near-tie fp32 merges) exact rows given as a rule tensor keep the general path's token."""
    logits = torch.full((1, 2, 8), -5.0, dtype=torch.float64)
    logits[0, :, 2], logits[0, :, 4] = 1.0, 1.0 + 1e-12  # float64 argmax 4, fp32 argmax 2
    q = torch.full((1, 1, 8), 1 / 8)
    args = (logits, torch.tensor([[4]]), q, None, torch.zeros(1, 1), None)
    exact = torch.zeros(1, dtype=torch.int64), torch.zeros(1)
    general = verify_reference(*args, *exact, 0.0, 0, 1.0, rules=RULE_IDS)
    _equal(verify_reference(*args, *exact, 0.0, 0, 1.0), general, "read off")
    assert general[1].tolist() == [[2, -1]]


def _proposal_by_definition(probs, target_ids, cross):
    """q' of kernels/proposal.py's module docstring, position by position: [batch, k, V_t]."""
    batch, k = target_ids.shape
    vocab_t = cross.t2d.shape[0]
    path = probs.gather(2, cross.drafter_ids[..., None])[..., 0] if cross.path is None else cross.path
    out = torch.zeros(batch, k, vocab_t)
    for b in range(batch):
        for j in range(k):
            s, e, x = int(cross.source[b, j]), int(cross.span_end[b, j]), int(target_ids[b, j])
            direct = torch.zeros(vocab_t)
            for t in range(vocab_t):
                if cross.t2d[t] >= 0:
                    direct[t] = probs[b, s, cross.t2d[t]]
            if x < 0:  # nothing proposed: the stop at a drafted token with no target token keeps its row
                out[b, j] = direct if e - s == 1 else 0.0
            elif j > 0 and s == int(cross.source[b, j - 1]):  # a split token's later piece
                out[b, j, x] = 1.0
            else:
                if e - s >= 2:  # a merge: its path probability, taken from its first part's direct token
                    mass = float(torch.prod(path[b, s:e].double()))
                    first = int(cross.d2t[cross.drafter_ids[b, s]])
                    if first >= 0:
                        direct[first] = max(float(direct[first]) - mass, 0.0)
                    direct[x] = mass
                out[b, j] = direct
    return out


def test_proposal_is_its_definition():
    """The dense q' against the module docstring's formula written out position by position, and each
    position's entry at its own draft against it: direct tokens read through t2d, merges anywhere in the
    block (their path probability, taken off the first part's direct token), split pieces, stops at
    untranslatable tokens, nothing proposed after. Kernel-against-reference tests alone miss a wrong merge
    mass: a merged token's ratio p / q' is mostly above 1 on both sides."""

    def check(q, ids, cross):
        dense = target_proposal_reference(q, ids, cross)
        torch.testing.assert_close(dense, _proposal_by_definition(q, ids, cross), rtol=1e-5, atol=1e-7)
        own = dense.gather(2, ids.clamp_min(0)[..., None])[..., 0]
        assert torch.equal(TargetProposal(q, ids, cross).at_drafts(), own)
        return dense

    later_merges = 0
    for seed in range(6):
        case = _case(8, 5, 120, 0.9, seed=seed, vocab_d=101)
        ids, cross = case["draft_ids"], case["cross"]
        later_merges += int(((cross.span_end - cross.source >= 2) & (ids >= 0) & (cross.source > 0)).sum())
        check(case["draft_probs"], ids, cross)
    assert later_merges >= 5
    # By hand, with id 0 on both sides and the path read from the probabilities: drafter 0 is target 0,
    # drafter 3 has no target token; y = 0 | 0 4 (merged into target 5) | 3 (the stop) | nothing.
    d2t = torch.tensor([0, 1, 2, -1, 4], dtype=torch.int32)
    t2d = torch.tensor([0, 1, 2, -1, 4, -1], dtype=torch.int32)
    cross = CrossProposal(torch.tensor([[0, 0, 4, 3]]), torch.tensor([[0, 1, 3, 3]]), torch.tensor([[1, 3, 4, 3]]),
                          d2t, t2d)  # fmt: skip
    q = torch.randn(1, 4, 5, generator=torch.Generator().manual_seed(0)).softmax(-1)
    dense = check(q, torch.tensor([[0, 5, -1, -1]]), cross)
    assert dense[0, 0, 0] == q[0, 0, 0]  # target 0 proposed at its drafter twin 0's probability
    merge = q[0, 1, 0] * q[0, 2, 4]  # taken off target 0, the merge's first part's direct token
    torch.testing.assert_close(dense[0, 1, [0, 5]], torch.stack([q[0, 1, 0] - merge, merge]))
    # Targets 0 and 5 swapped: target 0 is the merged token (drafter 1 then 2), which has no drafter twin
    cross = CrossProposal(torch.tensor([[1, 2, 3, 3]]), torch.tensor([[0, 2, 2, 2]]), torch.tensor([[2, 3, 2, 2]]),
                          torch.tensor([5, 1, 2, -1, 4], dtype=torch.int32),
                          t2d[[5, 1, 2, 3, 4, 0]])  # fmt: skip
    dense = check(q, torch.tensor([[0, -1, -1, -1]]), cross)
    torch.testing.assert_close(dense[0, 0, 0], q[0, 0, 1] * q[0, 1, 2])


def test_folding_twins_adds_their_mass_to_the_canonical_ids():
    probs = torch.rand(2, 3, 7)
    twins = torch.tensor([[3, 5, 6], [0, 0, 2]])  # 3 and 5 fold onto 0, 6 onto 2
    want = probs.clone()
    for folded, canonical in twins.t().tolist():
        want[..., canonical] += probs[..., folded]
    assert fold_twins_(probs, twins) is probs
    torch.testing.assert_close(probs, want)
    assert torch.equal(fold_twins_(probs.clone(), torch.empty(2, 0, dtype=torch.int64)), probs)


def test_proposal_at_drafts_and_at_positions():
    """q' at each position's own draft, and whole rows at chosen positions, without the dense tensor: the
    dense tensor's entries, bit for bit (merged spans, split pieces, stops, nothing proposed)."""
    for seed in range(4):
        case = _case(8, 4, 300, 0.9, seed=seed, vocab_d=257)
        q, ids, cross = case["draft_probs"], case["draft_ids"], case["cross"]
        dense = target_proposal_reference(q, ids, cross)
        want = dense.gather(2, ids.clamp_min(0)[..., None])[..., 0]
        proposal = TargetProposal(q, ids, cross)  # one set of span terms for both reads, as verification
        assert torch.equal(proposal.at_drafts(), want)
        positions = torch.randint(0, 4, (8, 2), generator=torch.Generator().manual_seed(seed))
        rows = dense.gather(1, positions[..., None].expand(-1, -1, 300))
        assert torch.equal(target_proposal_reference(q, ids, cross, positions), rows)
        assert torch.equal(proposal.rows(positions), rows)


def test_rules_are_read_off_outside_captures_only():
    """In a captured stage (the CPU stand-in for CUDA graphs refuses host reads) ops.verify's reference takes
    the general path, reading nothing; the replay gives what the eager call gave."""
    case = _case(4, 3, 300, 0.8, seed=1, vocab_d=200, separate_t1=True)
    case["rule"].fill_(RULES.index("token_v2"))
    names = ("target_logits", "draft_ids", "draft_probs", "uniforms", "noise")
    kwargs = dict(temperature=0.8, rule=case["rule"], alpha=case["alpha"], draft_probs_t1=case["draft_probs_t1"],
                  cross=case["cross"])  # fmt: skip
    eager = ops.verify(*(case[n] for n in names), **kwargs)
    assert rules_held(case["rule"]) == {RULES.index("token_v2")}
    out, inside = [], []

    def stage() -> None:
        inside.append(rules_held(case["rule"]))  # None: the general path, no read
        out.append(ops.verify(*(case[n] for n in names), **kwargs))

    graph = ReplayGraph()
    graph.record(stage)
    assert inside == [None]
    _equal(out[0], eager, "captured")
    graph.replay()
    _equal(out[0], eager, "replayed")


# ---------------------------------------------------------------------------------------------- GPU


@gpu
@needs_cuda
@pytest.mark.parametrize("vocab", [32000, 128256, 151936, 262144])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_gpu_full_vocabularies(vocab, temperature):
    for batch, k in ((1, 1), (8, 8), (64, 4)):
        case = _case(
            batch, k, vocab, temperature, seed=batch + k, offset=k, dtype=torch.bfloat16, device="cuda"
        )
        _check(case, block=1024)


@gpu
@needs_cuda
@pytest.mark.parametrize(("top_k", "top_p"), [(50, 1.0), (0, 0.9), (40, 0.95)])
def test_gpu_filters_and_cross(top_k, top_p):
    for support_only in (False, True):
        case = _case(8, 4, 128256, 0.7, seed=3, vocab_d=32000, separate_t1=True, top_k=top_k, top_p=top_p,
                     dtype=torch.bfloat16, device="cuda", support_only=support_only)  # fmt: skip
        _check(case, block=1024)


@gpu
@needs_cuda
def test_gpu_ops_dispatch():
    """ops.verify takes the kernel on CUDA and matches the reference it keeps for exact match."""
    case = _case(8, 4, 32000, 0.8, seed=2, vocab_d=30000, separate_t1=True, device="cuda")
    names = ("target_logits", "draft_ids", "draft_probs", "uniforms", "noise")
    got = ops.verify(
        *(case[n] for n in names), temperature=0.8, rule=case["rule"], alpha=case["alpha"],
        draft_probs_t1=case["draft_probs_t1"], cross=case["cross"],
    )  # fmt: skip
    want = _reference(case)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[2], want[2])
