"""Speculative cascades: every deferral rule samples its cascade target pi exactly; the limits of alpha."""

from __future__ import annotations

import pytest
import torch
from conftest import left_padded_prompts, tiny_model
from omnidraft_fast.kernels.cascade import RULE_IDS, RULES, cascade_target_reference, rules_held

import omnidraft_fast
from omnidraft_fast import CascadeConfig, EngineConfig, SpeculativeEngine, ops

# Two (q, p) pairs over 5 tokens: in A the drafter is the more confident, in B the target.
PAIRS = {
    "A": ([0.5, 0.1, 0.1, 0.1, 0.2], [0.1, 0.4, 0.2, 0.3, 0.0]),
    "B": ([0.3, 0.3, 0.2, 0.1, 0.1], [0.6, 0.1, 0.1, 0.1, 0.1]),
}


def _hand_pi(rule: str, alpha: float, q: list[float], p: list[float]) -> tuple[list[float], list[bool]]:
    """pi and the kept set, written out from SPEC §3 for one position (T = 1, so q1 = q and p1 = p)."""
    max_q, max_p = max(q), max(p)
    tv = sum(max(0.0, a - b) for a, b in zip(q, p, strict=True))
    if rule == "lossy":
        capped = [min(a, b / (1 - alpha)) for a, b in zip(q, p, strict=True)]
        rho = [max(0.0, b - (1 - alpha) * a) for a, b in zip(q, p, strict=True)]
        return [c + (1 - sum(capped)) * r / sum(rho) for c, r in zip(capped, rho, strict=True)], [
            False
        ] * len(q)
    defer = {
        "exact": True,
        "chow": alpha <= 0 or max_q < 1 - alpha,
        "diff": max_q < max_p - alpha,
        "opt": max_q < max_p - alpha * tv,
    }
    if rule in defer:
        keep = [not defer[rule]] * len(q)
    else:
        keep = [
            {
                "token_v1": a >= max_p - alpha,
                "token_v2": b >= max_p - alpha,
                "token_v3": b >= (1 - alpha) * max_p,
            }[rule]
            for a, b in zip(q, p, strict=True)
        ]
    kept = sum(a for a, k in zip(q, keep, strict=True) if k)
    return [a * k + (1 - kept) * b for a, b, k in zip(q, p, keep, strict=True)], keep


CASES = [
    ("exact", 0.0, "A"), ("chow", 0.6, "A"), ("chow", 0.3, "A"), ("diff", 0.05, "A"), ("diff", -0.2, "A"),
    ("opt", 0.5, "B"), ("opt", 2.0, "B"), ("token_v1", 0.2, "A"), ("token_v2", 0.15, "A"),
    ("token_v3", 0.6, "A"), ("token_v3", 0.5, "B"), ("lossy", 0.5, "A"),
]  # fmt: skip


@pytest.mark.law
@pytest.mark.parametrize(("rule", "alpha", "pair"), CASES)
def test_first_token_follows_the_cascade_target(rule, alpha, pair):
    q, p = (torch.tensor(x) for x in PAIRS[pair])
    pi, keep = _hand_pi(rule, alpha, *PAIRS[pair])
    rows, vocab = 200_000, 5
    generator = torch.Generator().manual_seed(5)
    drafts = torch.multinomial(q, rows, replacement=True, generator=generator)[:, None]
    target_logits = torch.stack([p, p]).log().expand(rows, -1, -1).contiguous()
    _, out, accept_probs, deferred, _ = ops.verify(
        target_logits,
        drafts,
        q.expand(rows, 1, -1).contiguous(),
        torch.rand(rows, 1, generator=generator),
        torch.empty(rows, vocab).exponential_(generator=generator),
        temperature=1.0,
        rule=torch.full((rows,), RULES.index(rule)),
        alpha=torch.full((rows,), alpha),
    )
    freq = torch.bincount(out[:, 0], minlength=vocab).double() / rows
    assert (freq - torch.tensor(pi, dtype=torch.float64)).abs().max() < 0.006  # ~6 sigma at 200k draws
    pi_over_q = (torch.tensor(pi) / q).clamp(max=1.0)
    torch.testing.assert_close(accept_probs[:, 0], pi_over_q[drafts[:, 0]])
    assert torch.equal(deferred[:, 0], ~torch.tensor(keep)[drafts[:, 0]])


# Equal maxima (0.5 each, q != p): each rule's bound is met with equality at alpha 0 (chow: at 0.5).
TIES = ([0.5, 0.3, 0.2], [0.2, 0.3, 0.5])
TIE_CASES = [
    ("chow", 0.5),
    ("diff", 0.0),
    ("opt", 0.0),
    ("token_v1", 0.0),
    ("token_v2", 0.0),
    ("token_v3", 0.0),
]


@pytest.mark.parametrize(("rule", "alpha", "pair"), CASES + [(r, a, "ties") for r, a in TIE_CASES])
def test_cascade_target_is_the_hand_written_one(rule, alpha, pair):
    """pi (a distribution) and the kept set of each rule, as SPEC §3 writes them (``_hand_pi``), for the general
    path and the one told the rule: a bound met with equality keeps (mixture rules defer where max q1 is
    strictly below it; token rules keep a token at it), and lossy's residual is normalised."""
    q_list, p_list = TIES if pair == "ties" else PAIRS[pair]
    want_pi, want_keep = _hand_pi(rule, alpha, q_list, p_list)
    q, p = torch.tensor([q_list]), torch.tensor([p_list])
    rule_id, alpha_t = torch.tensor([RULES.index(rule)]), torch.tensor([alpha])
    for rules in (None, {RULES.index(rule)}):
        pi, keep = cascade_target_reference(q, p, q, p, rule_id, alpha_t, rules)
        torch.testing.assert_close(pi[0], torch.tensor(want_pi), atol=1e-6, rtol=1e-6)
        assert keep.expand_as(q)[0].tolist() == want_keep, rules
    if pair == "ties":
        assert any(want_keep) and want_pi != p_list  # the tie keeps, which changes pi


def test_rules_held_are_read_off_a_cpu_tensor():
    """On the CPU, reading a request's rules costs nothing: ``rules_held`` gives the ids it holds (so that
    only their quantities are computed)."""
    assert rules_held(torch.tensor([5, 1, 5, 0])) == frozenset({0, 1, 5})


def test_rule_statistics_use_the_t1_distributions():
    """Greedy: q and p are one-hot, yet chow decides on the T=1 max q (0.9 here: no deferral at alpha 0.2)."""
    logits_q = torch.tensor([[[0.0, 4.0, 0.0, 0.0]]])
    q1 = logits_q.softmax(-1)  # max 0.95
    target_logits = torch.tensor([[[3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0]]])
    drafts = torch.tensor([[1]])
    q = torch.nn.functional.one_hot(drafts, 4).float()
    for alpha, expected in ((0.2, [1, 3]), (0.01, [0, -1])):
        _, out, *_ = ops.verify(
            target_logits, drafts, q, torch.zeros(1, 1), None, temperature=0.0,
            rule=torch.tensor([RULES.index("chow")]), alpha=torch.tensor([alpha]), draft_probs_t1=q1,
        )  # fmt: skip
        assert out[0].tolist() == expected, alpha


def test_chow_at_alpha_0_is_exact_where_the_drafter_is_certain():
    """A drafter softmax that rounds to exactly 1 in fp32 (a 30-nat lead) must not switch verification off at
    alpha 0, the exact end of chow's range: the target's argmax comes out, not the draft."""
    q1 = torch.tensor([[[0.0, 30.0, 0.0, 0.0]]]).softmax(-1)
    assert q1.max() == 1.0
    target_logits = torch.tensor([[[3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0]]])
    drafts = torch.tensor([[1]])
    _, out, *_ = ops.verify(
        target_logits, drafts, q1, torch.zeros(1, 1), None, temperature=0.0,
        rule=torch.tensor([RULES.index("chow")]), alpha=torch.tensor([0.0]), draft_probs_t1=q1,
    )  # fmt: skip
    assert out[0].tolist() == [0, -1]


def test_token_rules_at_a_negative_alpha_defer_everything():
    """token_v2/v3 at alpha < 0 keep no token (pi = p, exact speculative sampling), also at an alpha whose
    bound rounds back to max p1 in fp32 (max p1 + 1e-9, (1 + 5e-8) max p1)."""
    generator = torch.Generator().manual_seed(3)
    logits = 3 * torch.randn(2, 4, 50, generator=generator)
    q = q1 = logits[0].softmax(-1)
    p = p1 = logits[1].softmax(-1)
    for rule in ("token_v2", "token_v3"):
        for alpha in (-1e-9, -5e-8, -0.5):
            pi, keep = cascade_target_reference(
                q, p, q1, p1, torch.full((4,), RULES.index(rule)), torch.full((4,), alpha)
            )
            assert not keep.any() and torch.equal(pi, p), (rule, alpha)
    # the engine's verification: the target's argmax, drafted, is accepted with p / q, and deferred
    target_logits = torch.tensor([[[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]]])
    p_first = target_logits[0, 0].softmax(-1)
    draft = torch.tensor([[0.9, 0.05, 0.05]])
    for rule, alpha in (("token_v2", -1e-9), ("token_v3", -5e-8)):
        _, _, accept, deferred, _ = ops.verify(
            target_logits, torch.tensor([[0]]), draft[None], torch.tensor([[1.0]]), torch.ones(1, 3),
            temperature=1.0, rule=torch.tensor([RULES.index(rule)]), alpha=torch.tensor([alpha]),
        )  # fmt: skip
        assert deferred.tolist() == [[True]] and torch.allclose(accept, p_first[0] / 0.9), (rule, accept)


# Alphas on both sides of every rule's decisions, and past its range (the fast path must agree anywhere).
ALPHAS = [-1.0, -5e-8, -1e-9, 0.0, 0.05, 0.3, 0.6, 0.9, 1.0, 3.0]


@pytest.mark.parametrize("held", [[r] for r in RULES] + [["exact", "chow", "token_v2", "lossy"], ["diff", "opt"],
                                                          ["token_v1", "token_v3", "lossy"], ["exact", "token_v1"]])  # fmt: skip
def test_rules_held_compute_only_theirs(held):
    """Told the rules its positions hold, cascade_target_reference computes only theirs (one rule: no
    selection per position, and no q1/p1 where the rule reads none): bit for bit the pi and keep of the
    general path, which computes every rule and selects per position; positions with nothing proposed
    (q = 0) and a proposal certain of one token included."""
    generator = torch.Generator().manual_seed(len(held) * 10 + RULES.index(held[0]))
    rows = len(ALPHAS) * len(held)
    logits = 3 * torch.randn(4, rows, 40, generator=generator)
    q, p, q1, p1 = (x.softmax(-1) for x in logits)
    q[0], q1[0] = 0.0, 0.0  # nothing proposed
    q1[1] = torch.nn.functional.one_hot(torch.tensor(3), 40).float()  # max q1 = 1
    rule = torch.tensor([RULES.index(held[i % len(held)]) for i in range(rows)])
    alpha = torch.tensor([ALPHAS[i // len(held)] for i in range(rows)])
    want_pi, want_keep = cascade_target_reference(q, p, q1, p1, rule, alpha)
    ids = {RULES.index(r) for r in held}
    read_q1, read_p1 = ids & {1, 2, 3, 4}, ids & {2, 3, 4, 5, 6}
    pi, keep = cascade_target_reference(
        q, p, q1 if read_q1 else None, p1 if read_p1 else None, rule, alpha, rules=ids
    )
    torch.testing.assert_close(pi, want_pi, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(keep, want_keep)
    assert cascade_target_reference(q, p, q1, p1, rule, alpha, rules=RULE_IDS)[0].equal(want_pi)


def test_zero_mass_residual_falls_back_to_pi():
    p = torch.tensor([0.25, 0.25, 0.5])
    for rule, alpha in (("chow", 0.3), ("token_v1", 1.0), ("token_v2", -0.5), ("lossy", 0.0)):
        _, out, a, _, _ = ops.verify(
            p.log().expand(1, 2, -1).contiguous(), torch.tensor([[0]]), p.expand(1, 1, -1).contiguous(),
            torch.tensor([[1.0]]), torch.ones(1, 3), temperature=1.0,
            rule=torch.tensor([RULES.index(rule)]), alpha=torch.tensor([alpha]),
        )  # fmt: skip
        assert a.tolist() == [[1.0]] and out[0, 0] == 2, rule  # u = 1 rejects; residual 0 -> argmax pi / 1


@pytest.fixture(scope="module")
def pair():
    return tiny_model("llama", 96, seed=0), tiny_model("llama", 96, seed=1, hidden=16, layers=1)


EXACT_LIMITS = [("chow", 0.0), ("diff", -1.0), ("token_v1", -1.0), ("token_v2", -0.5), ("token_v3", -0.5),
                ("lossy", 0.0)]  # fmt: skip


@pytest.mark.parametrize(("rule", "alpha"), EXACT_LIMITS)
def test_exact_limits_reproduce_the_target_greedy(pair, rule, alpha):
    target, drafter = pair
    ids, mask = left_padded_prompts(96, [5, 9, 3], seed=2)
    expected = target.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    out = omnidraft_fast.generate(
        target, ids, attention_mask=mask, drafter=drafter, max_new_tokens=24, num_draft_tokens=3,
        cascade=CascadeConfig(rule, alpha), return_dict_in_generate=True,
    )  # fmt: skip
    assert torch.equal(out.sequences, expected)
    if rule != "lossy":  # lossy defers everywhere by definition; the others defer where they must
        assert out.stats.deferral_rate == 1.0


@pytest.mark.parametrize("rule", ["chow", "diff", "token_v1", "token_v2", "token_v3"])
def test_lenient_limit_accepts_every_draft(pair, rule):
    target, drafter = pair
    ids, mask = left_padded_prompts(96, [5, 9], seed=3)
    out = omnidraft_fast.generate(
        target, ids, attention_mask=mask, drafter=drafter, max_new_tokens=20, num_draft_tokens=4,
        cascade=CascadeConfig(rule, 1.0), return_dict_in_generate=True,
    )  # fmt: skip
    assert out.stats.acceptance_rate == 1.0 and out.stats.deferral_rate == 0.0
    # With every draft accepted, the output is the drafter's greedy text, with the target's bonus token
    # every k + 1 tokens.
    assert out.stats.mean_accepted_length == pytest.approx(5.0, abs=1.0)


def test_alpha_per_row(pair):
    target, drafter = pair
    ids, mask = left_padded_prompts(96, [6, 6], seed=4)
    expected = target.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    engine = SpeculativeEngine(
        target, drafter, config=EngineConfig(cascade=CascadeConfig("chow", (0.0, 1.0)))
    )
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=16)
    assert torch.equal(out[0], expected[0])  # row 0: exact
    assert not torch.equal(out[1], expected[1])  # row 1: the drafter's text (a weak drafter differs)


def test_bad_cascades_are_refused_and_the_engine_still_works(pair):
    target, drafter = pair
    ids = torch.tensor([[1, 2, 3]])
    for rule in ("chaw", ["chow"]):  # a list: not `unhashable type`
        with pytest.raises(ValueError, match="`rule` must be one of"):
            CascadeConfig(rule, 0.1)
    with pytest.raises(ValueError, match=r"alpha.*chow.*\[0, 1\]"):
        CascadeConfig("chow", 1.5)
    with pytest.raises(ValueError, match=r"lossy.*\[0, 1\)"):
        CascadeConfig("lossy", 1.0)
    with pytest.raises(TypeError, match="alpha"):
        CascadeConfig("diff", "0.1")
    for empty in ([], ()):
        with pytest.raises(ValueError, match="`alpha` is an empty sequence; give one number, or one per row"):
            CascadeConfig("chow", empty)
    with pytest.raises(TypeError, match="CascadeConfig"):
        EngineConfig(cascade=("chow", 0.1))
    engine = SpeculativeEngine(target, drafter)
    with pytest.raises(ValueError, match="3 values for a batch of 1"):
        engine.generate(ids, max_new_tokens=4, cascade=CascadeConfig("chow", (0.1, 0.2, 0.3)))
    with pytest.raises(TypeError, match="CascadeConfig"):
        engine.generate(ids, max_new_tokens=4, cascade="chow")
    good = engine.generate(ids, max_new_tokens=4, cascade=CascadeConfig("chow", 0.0))
    assert torch.equal(good, target.generate(ids, max_new_tokens=4, do_sample=False))


def test_every_rule_has_an_alpha_range():
    """CascadeConfig's ranges and the verifier's rule ids name the same rules (exact is cascade=None)."""
    from omnidraft_fast.config import _ALPHA_RANGES

    assert set(_ALPHA_RANGES) | {"exact"} == set(RULES) and RULES[0] == "exact"


def test_alpha_takes_numpy_numbers_as_floats():
    import numpy as np

    assert CascadeConfig("chow", np.float32(0.5)).alpha == 0.5
    assert CascadeConfig("diff", [np.float64(0.1), np.int64(1)]).alphas(2) == (0.1, 1.0)
    with pytest.raises(TypeError, match="alpha"):
        CascadeConfig("chow", np.bool_(True))
