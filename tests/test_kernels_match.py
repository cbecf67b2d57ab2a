"""Verification by exact match: the kernel against its torch reference (interpreted on CPU, compiled on
CUDA), and the reference against the rule it defines.

Greedy and sampling, top-k/top-p, drafts cut short (-1), no draft at all, fp16 logits, logits that are a
strided view, and invalid rows. Outputs must be equal (target probabilities close): the noise is passed
in, so both sides draw the same tokens.
"""

from __future__ import annotations

import pytest
import torch
from omnidraft_fast.kernels import rows
from omnidraft_fast.kernels.match import match_reference, match_triton
from omnidraft_fast.kernels.sampling import sampling_probs_reference

from omnidraft_fast import ops

pytestmark = pytest.mark.kernels
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _case(
    batch: int,
    k: int,
    vocab: int,
    temperature: float,
    *,
    seed: int = 0,
    top_k: int = 0,
    top_p: float = 1.0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> dict:
    """Target logits with a few strong tokens per position; drafts that follow the target's argmax for a
    random number of positions (so every accepted length occurs), then a random token, some rows cut short."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, k + 1, vocab, generator=generator)
    hot = torch.randint(0, vocab, (batch, k + 1, 3), generator=generator)
    logits.scatter_add_(-1, hot, torch.full(hot.shape, 4.0))
    draft = logits[:, :k].argmax(-1)
    miss = torch.randint(0, k + 1, (batch,), generator=generator)
    for b in range(batch):
        if miss[b] < k:
            draft[b, miss[b]] = torch.randint(0, vocab, (), generator=generator)
        if b % 3 == 2 and k:
            draft[b, k - 1 :] = -1  # nothing proposed at the end
    noise = torch.empty(batch, k + 1, vocab).exponential_(generator=generator)
    return dict(
        target_logits=logits.to(dtype=dtype, device=device),
        draft_ids=draft.to(device),
        noise=None if temperature == 0.0 else noise.to(device),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
    )


def _check(case: dict, block: int = 64) -> tuple[torch.Tensor, ...]:
    """The kernel equals the reference on every valid row (invalid rows: only the flags)."""
    got = match_triton(**case, block=block)
    want = match_reference(**case)
    assert torch.equal(got[3], want[3]), "invalid"
    rows = ~want[3].any(1)
    for name, g, w in zip(("num_accepted", "output_tokens"), got[:2], want[:2], strict=True):
        assert torch.equal(g[rows], w[rows]), f"{name}: {g[rows].tolist()} != {w[rows].tolist()}"
    torch.testing.assert_close(got[2][rows], want[2][rows], msg="target_probs")
    return got


def test_the_reference_is_the_rule():
    """Greedy: drafts are accepted while they equal the argmax, the first mismatch emits the argmax, and
    all k accepted add the bonus argmax; a position with nothing proposed never matches."""
    logits = torch.full((3, 4, 6), -1.0)
    argmax = torch.tensor([[1, 2, 3, 4], [5, 0, 1, 2], [3, 3, 3, 3]])
    logits.scatter_(-1, argmax[..., None], 2.0)
    draft = torch.tensor([[1, 2, 3], [5, 1, 1], [3, -1, 3]])
    num, out, probs, invalid = match_reference(logits, draft, None, 0.0, 0, 1.0)
    assert num.tolist() == [3, 1, 1]
    assert out.tolist() == [[1, 2, 3, 4], [5, 0, -1, -1], [3, 3, -1, -1]]
    assert probs.tolist() == [[1, 1, 1], [1, 0, 1], [1, 0, 1]]
    assert not invalid.any()


def test_sampled_draws_follow_the_target():
    """Sampling: every emitted token's frequency matches p at its position (here the first position of a
    one-draft row whose draft never matches, so the emitted token is z_1 ~ p_1, rejected draft excluded)."""
    vocab, n = 5, 40000
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, -9.0])
    block = logits.expand(n, 2, vocab).contiguous()
    block[:, 0, 4] = float("-inf")  # the draft, 4, has no mass at position 1: never matches
    draft = torch.full((n, 1), 4)
    noise = torch.empty(n, 2, vocab).exponential_(generator=torch.Generator().manual_seed(0))
    num, out, probs, _ = match_reference(block, draft, noise, 0.7, 0, 1.0)
    assert (num == 0).all() and (probs == 0).all()
    p = sampling_probs_reference(block[0, :1], 0.7, 0, 1.0)[0]
    freq = torch.bincount(out[:, 0], minlength=vocab).float() / n
    assert (freq - p).abs().max() < 4 * (p * (1 - p) / n).sqrt().max()


@pytest.fixture(params=[4, 256], ids=["one_chunk", "chunks"])
def programs(request, monkeypatch):
    """The kernel's target program count: 4 (this CPU's) puts each position's vocabulary in one chunk at
    these sizes; 256 (a GPU's) splits it over several, whose winners the last kernel combines."""
    monkeypatch.setattr(rows, "target_programs", lambda device, per_sm=4: request.param)
    return request.param


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0, 1.6])
def test_kernel_equals_reference(temperature, programs):
    for seed in range(2):
        _check(_case(5, 4, 300, temperature, seed=seed))


def test_ties_go_to_the_first_id(programs):
    """Greedy: two equal maxima in different chunks emit the lower id, as torch's argmax does."""
    case = _case(3, 2, 300, 0.0, seed=4)
    case["target_logits"][:, :, [40, 250]] = 99.0
    case["draft_ids"][:] = 40
    case["draft_ids"][1, 1] = 250
    got = _check(case)
    assert got[1].tolist() == [[40, 40, 40], [40, 40, -1], [40, 40, 40]]


@pytest.mark.parametrize(("batch", "k"), [(1, 0), (3, 7)])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_shapes(batch, k, temperature):
    got = _check(_case(batch, k, 200, temperature, seed=batch + k))
    assert got[1].shape == (batch, k + 1) and got[2].shape == (batch, k)


@pytest.mark.parametrize(
    ("top_k", "top_p", "programs"), [(20, 1.0, 4), (0, 0.8, 4), (50, 0.9, 256)], indirect=["programs"]
)
def test_top_k_top_p(top_k, top_p, programs):
    batch = 4 if programs == 4 else 2  # the threshold passes interpret one program per chunk: slow
    _check(_case(batch, 2, 300, 0.8, seed=top_k, top_k=top_k, top_p=top_p))


def test_fp16_and_strided_logits():
    """fp16 logits, and logits that are a column slice of a wider block (as the rounds pass them)."""
    case = _case(3, 3, 250, 0.9, seed=5, dtype=torch.float16)
    _check(case)
    wide = torch.randn(3, 6, 250)
    wide[:, 1:5] = case["target_logits"].float()
    for top_p in (1.0, 0.9):
        _check({**case, "target_logits": wide[:, 1:5], "top_p": top_p})
    # noise laid out vocabulary-major (a transposed buffer): made contiguous first
    noise = case["noise"].permute(2, 0, 1).contiguous().permute(1, 2, 0)
    assert noise.stride(-1) != 1
    _check({**case, "noise": noise})


def test_target_probs_are_the_drafts_probabilities(programs):
    """Sampling: ``target_probs`` is ``p_j(y_j)``, the sampled distribution at the draft's id, for every
    proposed draft, id 0 (the lowest, a proposal like any other) included, and 0 where nothing was proposed."""
    case = _case(4, 3, 60, 0.8, seed=11)
    case["target_logits"][:, :, 0] += 3.0  # id 0 has some mass everywhere, as do its neighbours
    draft = case["draft_ids"]
    draft[:, 0] = 0
    draft[1, 1:] = torch.tensor([0, -1])
    p = sampling_probs_reference(case["target_logits"], 0.8, 0, 1.0)
    want = torch.tensor([[p[b, j, y].item() if y >= 0 else 0.0 for j, y in enumerate(row)]
                         for b, row in enumerate(draft.tolist())])  # fmt: skip
    torch.testing.assert_close(match_reference(**case)[2], want)
    torch.testing.assert_close(_check(case)[2], want)


def test_noise_in_any_layout():
    """Noise whose vocabulary axis is not unit-stride (every other element of a wider buffer, the batch axis
    innermost, or one value broadcast over the vocabulary) draws as its contiguous copy does."""
    case = _case(3, 2, 120, 0.9, seed=6)
    noise = case["noise"]
    wide = torch.ones(3, 3, 240)
    wide[..., ::2] = noise
    batch_inner = noise.permute(2, 1, 0).contiguous().permute(2, 1, 0)  # strides (1, batch, batch (k+1))
    broadcast = noise[..., :1].expand(-1, -1, 120)  # one value a position: the draw is p's first mode
    for layout in (wide[..., ::2], batch_inner, broadcast):
        assert layout.stride(-1) != 1
        got = _check({**case, "noise": layout})
        want = match_reference(**{**case, "noise": layout.contiguous()})
        assert torch.equal(got[1], want[1])
    assert batch_inner.stride(0) == 1 and wide[..., ::2].stride(-1) == 2 and broadcast.stride(-1) == 0


def test_default_tile():
    """The launcher's default tile (the one ``ops.verify`` uses) gives the reference's results."""
    for temperature in (0.0, 0.8):
        case = _case(2, 2, 300, temperature, seed=9)
        got, want = match_triton(**case), match_reference(**case)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        torch.testing.assert_close(got[2], want[2])


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_invalid_rows(temperature, programs):
    """Flags where the NaN, +inf and all -inf positions are; at 256 programs each position's vocabulary is
    split over 3 chunks, a count that is not a power of two (the kernel pads the chunk axis)."""
    case = _case(4, 3, 180, temperature, seed=7)
    case["target_logits"][1, 2, 17] = float("nan")
    case["target_logits"][2, 0] = float("-inf")
    case["target_logits"][3, 3, 5] = float("inf")
    got = _check(case)
    assert got[3].tolist() == [[False] * 4, [False, False, True, False], [True, False, False, False],
                               [False, False, False, True]]  # fmt: skip


def test_every_accepted_length_occurs():
    """The cases reach every number of accepted drafts, 0 to k: the scan is tested at each stop."""
    seen = set()
    for seed in range(8):
        seen |= set(_check(_case(6, 4, 150, 0.0, seed=seed))[0].tolist())
    assert seen == set(range(5))


# ---------------------------------------------------------------------------------------------- GPU


@gpu
@needs_cuda
@pytest.mark.parametrize("vocab", [32000, 128256, 151936])
@pytest.mark.parametrize(("temperature", "top_p"), [(0.0, 1.0), (0.8, 1.0), (0.8, 0.9)])
def test_gpu_full_vocabularies(vocab, temperature, top_p):
    for batch, k in ((1, 1), (8, 8), (64, 4)):
        case = _case(batch, k, vocab, temperature, seed=batch + k, top_p=top_p, dtype=torch.bfloat16,
                     device="cuda")  # fmt: skip
        _check(case, block=1024)


@gpu
@needs_cuda
def test_gpu_ops_dispatch():
    """ops.verify(exact_match=True) takes the kernel on CUDA and matches the reference."""
    case = _case(8, 4, 32000, 0.8, seed=2, device="cuda")
    uniforms = torch.rand(8, 4, device="cuda")
    got = ops.verify(case["target_logits"], case["draft_ids"], None, uniforms, case["noise"], temperature=0.8,
                     exact_match=True)  # fmt: skip
    want = match_reference(**case)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[2], want[2])
