"""The Triton drafter sampler against its torch reference (interpreted on CPU, compiled on CUDA)."""

from __future__ import annotations

import math

import pytest
import torch
from omnidraft_fast.kernels.sampling import sample_reference, sample_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.kernels
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# (temperature, top_k, top_p)
CONFIGS = {
    "greedy": (0.0, 0, 1.0),
    "temperature": (0.8, 0, 1.0),
    "top_k": (1.2, 9, 1.0),
    "top_p": (0.9, 0, 0.8),
    "top_k_top_p": (1.0, 40, 0.9),
}


def _inputs(rows: int, vocab: int, dtype: torch.dtype, seed: int, masked: bool):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=generator) * 3).to(dtype)
    noise = torch.empty(rows, vocab).exponential_(generator=generator)
    mask = torch.rand(vocab, generator=generator) > 0.3 if masked else None
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return to(logits), to(noise), to(mask)


def _check(logits, noise, temperature, top_k, top_p, mask=None, block=64):
    """Same distribution, and the chosen id maximises the race objective (ties may pick either id).

    Where a top-p boundary falls inside a group of equal logits (fp16 has many), the reference drops
    some of them in torch.sort's order and the kernel the lowest ids: the same number of the same value.
    """
    noise = None if temperature == 0.0 else noise
    ids, probs = sample_triton(logits, noise, temperature, top_k, top_p, mask, block=block)
    ref_ids, ref_probs = sample_reference(logits, noise, temperature, top_k, top_p, mask)
    assert ids.dtype == torch.int64 and probs.dtype == torch.float32
    differ = (probs > 0) != (ref_probs > 0)  # [rows, vocab]
    for row in differ.any(1).nonzero()[:, 0].tolist():
        assert top_p < 1.0 and logits[row][differ[row]].unique().numel() == 1
        torch.testing.assert_close(probs[row].sort().values, ref_probs[row].sort().values)
    same = ~differ.any(1)
    torch.testing.assert_close(probs[same], ref_probs[same], atol=1e-6, rtol=1e-5)
    objective = probs if temperature == 0.0 else probs / noise
    best = objective.max(1).values
    torch.testing.assert_close(objective.gather(1, ids[:, None])[:, 0], best, atol=0, rtol=1e-5)
    assert torch.equal(ids[same & (ids == ref_ids)], ref_ids[same & (ids == ref_ids)])
    assert (probs.gather(1, ids[:, None]) > 0).all()
    # Ids only (probs=False): the same draws, no distribution.
    only = sample_triton(logits, noise, temperature, top_k, top_p, mask, probs=False, block=block)
    ref_only = sample_reference(logits, noise, temperature, top_k, top_p, mask, probs=False)
    assert only[1] is None and ref_only[1] is None
    assert torch.equal(only[0], ids) and torch.equal(ref_only[0], ref_ids)
    return ids, probs


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize(("dtype", "masked"), [(torch.float32, False), (torch.float16, True)])
def test_matches_reference_across_blocks(config, dtype, masked):
    # vocab 300 with block 64: 5 blocks per row (the last partial), split over 2 programs.
    logits, noise, mask = _inputs(3, 300, dtype, seed=len(config), masked=masked)
    _check(logits, noise, *CONFIGS[config], mask)


@pytest.mark.parametrize("config", ["greedy", "temperature", "top_k_top_p"])
def test_vocab_smaller_than_a_block(config):
    logits, noise, mask = _inputs(2, 7, torch.float32, seed=3, masked=True)
    _check(logits, noise, *CONFIGS[config], mask)


def test_greedy_takes_the_first_of_tied_maxima():
    """Greedy decoding is torch.argmax's first maximum, also where the maximum is tied within a tile, across
    tiles of one program and across programs (bf16 logits tie often), with and without the distribution
    written; a row of -inf alone (every id masked) gives its first id."""
    logits = torch.zeros(5, 300)
    for row, places in enumerate([(5, 9, 40), (70, 71, 250), (130, 299), (299,)]):
        logits[row, list(places)] = 1.0  # block 64: tiles of 64 ids; 300 ids over 2 programs (150 each)
    logits[4] = float("-inf")
    for probs in (True, False):
        ids, _ = sample_triton(logits.to(DEVICE), None, 0.0, 0, 1.0, probs=probs, block=64)
        assert ids.tolist() == [5, 70, 130, 299, 0]


def test_ties_at_the_thresholds():
    noise = torch.empty(1, 8).exponential_(generator=torch.Generator().manual_seed(0)).to(DEVICE)
    # A top-k boundary inside a group of equal logits: the whole group is kept.
    logits = torch.tensor([[0.0, 2.0, 1.0, 1.0, 1.0, -1.0, 1.0, 0.5]], device=DEVICE)
    _, probs = _check(logits, noise, 1.0, 3, 1.0, block=4)
    assert (probs > 0).sum() == 5
    # A top-p boundary inside one: 4 of the five 1.0 are dropped, here the lowest ids.
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, 3.0, 0.0, 1.0, -2.0]], device=DEVICE)
    _, probs = _check(logits, noise, 1.0, 0, 0.6, block=4)
    assert (probs[0] > 0).nonzero()[:, 0].tolist() == [4, 6]
    # The maximum itself tied: top-p keeps at least one of the group.
    logits = torch.tensor([[2.0, 2.0, 2.0, 0.0, 2.0, -1.0, 1.0, 2.0]], device=DEVICE)
    _, probs = _check(logits, noise, 1.0, 0, 0.1, block=4)
    assert (probs[0] > 0).nonzero()[:, 0].tolist() == [7]


def test_thresholds_that_need_every_digit():
    """Keys one ulp apart take all 8 digit passes of a search (top-k, then top-p), and a tie cut at the
    last ids of a vocabulary of 4097 (13 bits: 4 id digits) all of its passes: the launch count suffices."""
    vocab = 4097
    generator = torch.Generator().manual_seed(9)
    logits = torch.randn(2, vocab, generator=generator) - 10.0
    one = torch.tensor(1.0)
    logits[:, 100] = one
    logits[:, 200] = torch.nextafter(one, torch.tensor(2.0))  # the top two differ in the last bit
    logits[1, -40:] = 0.5  # row 1: a tie group at the end of the vocabulary, one ulp below another token
    logits[1, 300] = torch.nextafter(torch.tensor(0.5), one)
    noise = torch.empty(2, vocab).exponential_(generator=generator)
    to = lambda t: t.to(DEVICE)  # noqa: E731
    _, probs = _check(to(logits), to(noise), 1.0, 1, 1.0, block=256)  # top-1: only the larger survives
    assert (probs > 0).nonzero()[:, 1].tolist() == [200, 200]
    _, probs = _check(to(logits), to(noise), 1.0, 0, 0.8, block=256)  # drops 8 of the 40 ties
    kept = (probs[1] > 0).nonzero()[:, 0].tolist()
    assert kept == [100, 200, 300, *range(vocab - 32, vocab)]  # the lowest ids of the group dropped


def test_threshold_passes_keep_each_element_of_a_tile_in_one_warp(monkeypatch):
    """The threshold passes rewrite their candidates in place, safe only while the threads holding one element
    of a tile stay in step (one thread, or copies within one warp): a tile smaller than the launch's threads
    would be copied into warps that do not wait for each other. So the warps follow the tile, whatever most
    warps a pass may take (``PASS_WARPS``: shipped, and the tuning sweep's)."""
    from omnidraft_fast.kernels import thresholds

    for most in (8, 16):
        monkeypatch.setattr(thresholds, "PASS_WARPS", most)
        for block in (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096):
            warps = thresholds._warps(block)
            assert 1 <= warps <= most and (warps == 1 or 32 * warps <= block)
        assert thresholds._warps(2048) == most  # the production tile takes them all


def test_degenerate_filters():
    logits, noise, mask = _inputs(2, 100, torch.float32, seed=5, masked=True)
    _check(logits, noise, 1.0, 100, 1.0, mask, block=32)  # k >= vocab: no filter
    _check(logits, noise, 1.0, 95, 1.0, mask, block=32)  # k above the allowed count: keeps all allowed
    _check(logits, noise, 1.0, 1, 0.5, mask, block=32)  # one token left
    _check(logits, noise, 0.7, 0, 1e-6, mask, block=32)  # top-p keeps only the most likely


def test_top_p_boundary_at_a_rounding_point_of_a_digit_set():
    """A top-p goal within fp32 rounding of the mass up to the largest key below the most likely token: the
    search enters that key's digit set (its mass, summed as one digit, exceeds the goal), whose own digits'
    masses, summed again at the next pass, may fall at or below it. The search still picks a digit of the set
    (its largest), so it keeps the most likely token and at most that key below it, normalised; it used to
    pick none, end below the whole set and keep every token with the kept set's mass short of it (q summed to
    2.76 here at the goal one fp32 ulp below the boundary)."""
    z = [
        1.0432618856430054, 1.5327991247177124, 0.3092593848705292, 0.3876548707485199, 0.7033610343933105,
        1.2913415431976318, 1.0321681499481201, 1.763600468635559, 0.9701303243637085, 1.2881512641906738,
        0.778008222579956, 0.8730911016464233, 3.0,
    ]  # fmt: skip
    logits = torch.tensor([z])
    w = (logits.double() - 3.0).exp()
    boundary = torch.tensor(w[0, :-1].sum().item() / w.sum().item(), dtype=torch.float32)  # mass below 3.0
    noise = torch.empty(1, 13).exponential_(generator=torch.Generator().manual_seed(0))
    for step in range(-3, 4):  # 1 - top_p (fp32) within 3 ulps of the boundary, on both sides
        rest = boundary
        for _ in range(abs(step)):
            rest = torch.nextafter(rest, torch.tensor(2.0 if step > 0 else -1.0))
        top_p = 1.0 - rest.item()
        ids, probs = sample_triton(logits.to(DEVICE), noise.to(DEVICE), 1.0, 0, top_p, block=16)
        ref_ids, ref_probs = sample_reference(logits, noise, 1.0, 0, top_p)
        kept = (probs[0] > 0).nonzero()[:, 0].tolist()
        assert kept in ([12], [7, 12]), (step, kept)
        want = torch.zeros(13, dtype=torch.float64)
        want[kept] = w[0, kept] / w[0, kept].sum()
        torch.testing.assert_close(probs[0].double().cpu(), want, atol=1e-6, rtol=1e-5)
        if (probs > 0).cpu().equal(ref_probs > 0):
            assert ids.item() == ref_ids.item()


@pytest.mark.parametrize("top_k", [0, 50])
def test_top_p_at_the_ends_of_its_range(top_k):
    """A top_p whose ``top_p Z`` underflows fp32 (1e-50) keeps the most likely token, as transformers' does;
    one within fp32 rounding of 1 keeps the tail token of mass ~5e-9 that transformers' cumulative sum keeps
    (the kernel sums the masses upwards from the smallest, against ``1 - top_p``)."""
    logits, noise, _ = _inputs(3, 100, torch.float32, seed=8, masked=False)
    logits[:, 7] = logits.max(1).values - 16.0  # about 5e-9 of the row's mass
    for top_p in (1e-50, 1 - 1e-9, *((1e-9, 1 - 3e-8) if top_k == 0 else ())):
        _, probs = _check(logits, noise, 1.0, top_k, top_p, block=32)
        if top_p < 1e-30:
            assert ((probs > 0).sum(1) == 1).all() and (probs.max(1).values == 1.0).all()
        elif top_p == 1 - 1e-9 and top_k == 0:
            assert (probs[:, 7] > 0).all()


def test_strided_logits_and_noise():
    """Row-strided views are read in place; column-major ones (a transposed buffer) are made contiguous."""
    logits, noise, _ = _inputs(2, 200, torch.float32, seed=6, masked=False)
    _check(logits[:, :150], noise[:, :150], 0.9, 0, 0.95)
    column_major = [t.t().contiguous().t() for t in (logits, noise)]
    assert all(t.stride(-1) != 1 for t in column_major)
    _check(*column_major, 0.9, 0, 0.95)


def test_strided_mask():
    """A mask that is a strided view (every other entry of a longer one) is read as its values."""
    logits, noise, mask = _inputs(2, 100, torch.float32, seed=7, masked=True)
    wide = torch.stack([mask, ~mask], 1).flatten()  # mask at the even entries
    _check(logits, noise, 0.8, 0, 1.0, wide[::2], block=32)
    _check(logits, noise, 0.0, 0, 1.0, wide[::2], block=32)


@pytest.mark.law
def test_race_frequencies():
    """Empirical frequencies of ``rows`` draws from one row of logits, each with its own noise.

    Each frequency is within ``sqrt(ln(2K / delta) / (2 rows))`` of its probability except with
    probability ``delta = 1e-6`` (Hoeffding and a union bound); the seed is fixed, so the test is
    deterministic, and the bound still separates q from the uniform law and from the argmax."""
    q = torch.tensor([0.7, 0.2, 0.1, 0.0, 0.0])  # token 3 masked out, token 4 impossible
    rows = 20_000 if DEVICE == "cuda" else 300
    logits = torch.tensor([0.7, 0.2, 0.1, 0.5, 0.0]).log().expand(rows, -1).contiguous()
    noise = torch.empty(rows, 5).exponential_(generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([True, True, True, False, True])
    ids, probs = sample_triton(logits.to(DEVICE), noise.to(DEVICE), 1.0, 0, 1.0, mask.to(DEVICE), block=4)
    torch.testing.assert_close(probs[0].cpu(), q)
    freq = torch.bincount(ids.cpu(), minlength=5).double() / rows
    assert (freq - q.double()).abs().max() < math.sqrt(math.log(2 * 5 / 1e-6) / (2 * rows))
    assert freq[3] == 0 and freq[4] == 0


@pytest.mark.gpu
@gpu
@needs_cuda
@pytest.mark.parametrize("vocab", [32000, 128256, 151936, 262144])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("rows", [1, 72])
def test_full_vocabularies_bf16(vocab, config, rows):
    logits, noise, mask = _inputs(rows, vocab, torch.bfloat16, seed=vocab, masked=config == "top_k_top_p")
    _check(logits, noise, *CONFIGS[config], mask, block=1024)


@pytest.mark.gpu
@gpu
@needs_cuda
@pytest.mark.parametrize("config", list(CONFIGS))
def test_many_rows(config):
    logits, noise, _ = _inputs(256, 32000, torch.float16, seed=1, masked=False)
    _check(logits, noise, *CONFIGS[config], block=1024)
