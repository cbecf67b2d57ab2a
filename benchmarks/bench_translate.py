"""Translation with n-gram merges (``kernels/translate.py``): drafted blocks per second for the eager torch
reference, ``torch.compile`` of it and the Triton kernel, at batch 1..256 and k 4/8, N = 4, a table of
2^16 slots at load factor 1/2.

    python -m pytest benchmarks/bench_translate.py --benchmark-only [--benchmark-json out.json]

``test_translate_with_splits`` times the engine's path with split tokens (``units`` through the eager
reference or the kernel, then ``split_reference``; unmapped ids spelled by 2-3 target tokens).

Drafts are uniform over a 32000-id drafter vocabulary of which 3/4 map directly; one window of 2..N ids
of each draft is in the table (so rows merge), the rest of the table is random runs. Each case records in
``extra_info``: drafts (rows) per second, bytes moved (drafts read, their direct map, the four outputs,
and one probed table row per window looked up: a lower bound) and the device.
"""

from __future__ import annotations

import functools

import pytest
import torch
from _timing import synced
from omnidraft_fast.kernels.ngram import EMPTY, ngram_insert_triton
from omnidraft_fast.kernels.translate import split_reference, translate_ngram_reference, translate_triton

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
torch._dynamo.config.recompile_limit = 64  # one compilation per shape (dynamic=False)

N = 4
CAPACITY = 1 << 16
V_D, V_T = 32000, 128256
BATCHES = [1, 8, 64, 256]
KS = [4, 8]
TRANSLATES = {
    "eager": translate_ngram_reference,
    "compile": torch.compile(translate_ngram_reference, dynamic=False),
    "triton": translate_triton,
}
SPLIT_PIECES = 3  # the most target tokens an unmapped drafter id is spelled with in the split case


@functools.cache
def _d2t() -> torch.Tensor:  # [V_D] int32, a quarter unmapped
    generator = torch.Generator(device="cuda").manual_seed(0)
    d2t = torch.randint(0, V_T, (V_D,), generator=generator, device="cuda", dtype=torch.int32)
    return torch.where(torch.rand(V_D, generator=generator, device="cuda") < 0.25, -1, d2t)


@functools.cache
def _case(batch: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drafts [batch, k] and the table (key_ids, values) at load 1/2 holding one window of each draft."""
    generator = torch.Generator(device="cuda").manual_seed(1)
    drafts = torch.randint(0, V_D, (batch, k), generator=generator, device="cuda")
    randoms = CAPACITY // 2 - batch
    lengths = torch.randint(2, N + 1, (batch + randoms, 1), generator=generator, device="cuda")
    starts = (torch.rand(batch, 1, generator=generator, device="cuda") * (k - lengths[:batch] + 1)).long()
    columns = torch.arange(N, device="cuda")
    windows = drafts.gather(1, (starts + columns).clamp_max(k - 1))  # [batch, N]
    keys = torch.cat([windows, torch.randint(0, V_D, (randoms, N), generator=generator, device="cuda")])
    keys = torch.where(columns < lengths, keys, -1)
    hashes = torch.full((CAPACITY,), EMPTY, dtype=torch.int64, device="cuda")
    key_ids = torch.full((CAPACITY, N), -1, dtype=torch.int32, device="cuda")
    values = torch.full((CAPACITY,), -1, dtype=torch.int32, device="cuda")
    counts = torch.zeros(CAPACITY, dtype=torch.int64, device="cuda")
    new_values = torch.randint(0, V_T, (keys.shape[0],), generator=generator, device="cuda")
    ngram_insert_triton(hashes, key_ids, values, counts, keys, new_values, torch.ones_like(new_values))
    return drafts, key_ids, values


@functools.cache
def _splits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The units map of ``_d2t`` (its unmapped ids as split markers V_T + id) and target spellings of 1..3
    pieces for them (``VocabBridge.units``/``d2ts``)."""
    generator = torch.Generator(device="cuda").manual_seed(2)
    d2t = _d2t()
    ids = torch.arange(V_D, device="cuda", dtype=torch.int32)
    units = torch.where(d2t >= 0, d2t, V_T + ids)
    d2ts_len = torch.where(
        d2t >= 0, 1, torch.randint(2, SPLIT_PIECES + 1, (V_D,), generator=generator, device="cuda")
    ).int()
    d2ts = torch.randint(0, V_T, (V_D, SPLIT_PIECES), generator=generator, device="cuda", dtype=torch.int32)
    d2ts[:, 0] = torch.where(d2t >= 0, d2t, d2ts[:, 0])
    d2ts = torch.where(torch.arange(SPLIT_PIECES, device="cuda") < d2ts_len[:, None], d2ts, -1)
    return units, d2ts, d2ts_len


@pytest.mark.parametrize("implementation", ["eager", "triton"])
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("batch", BATCHES)
def test_translate_with_splits(benchmark, implementation, batch, k):
    """The drafted block through ``units`` and ``split_reference`` (the engine's path with split tokens):
    what writing split tokens out adds to either translation."""
    drafts, key_ids, values = _case(batch, k)
    units, d2ts, d2ts_len = _splits()
    translate = TRANSLATES[implementation]

    def run():
        ids, _, source, span_end = translate(drafts, units, key_ids, values)
        return split_reference(ids, source, span_end, d2ts, d2ts_len, V_T)

    ids, _, source, span_end = translate_ngram_reference(drafts, units, key_ids, values)
    expected = split_reference(ids, source, span_end, d2ts, d2ts_len, V_T)
    assert all(torch.equal(a, b) for a, b in zip(run(), expected, strict=True))
    benchmark(synced(run))
    benchmark.extra_info.update(
        drafts_per_s=batch / benchmark.stats.stats.median,
        split_positions=int(
            (
                (_d2t()[drafts.gather(1, expected[2])] < 0)
                & (expected[3] - expected[2] <= 1)
                & (expected[0] >= 0)
            ).sum()
        ),
        device=torch.cuda.get_device_name(),
    )


@pytest.mark.parametrize("implementation", list(TRANSLATES))
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("batch", BATCHES)
def test_translate(benchmark, implementation, batch, k):
    drafts, key_ids, values = _case(batch, k)
    d2t = _d2t()
    translate = TRANSLATES[implementation]
    expected = translate_ngram_reference(drafts, d2t, key_ids, values)
    assert all(
        torch.equal(a, b) for a, b in zip(translate(drafts, d2t, key_ids, values), expected, strict=True)
    )

    benchmark(synced(lambda: translate(drafts, d2t, key_ids, values)))
    windows = batch * sum(k - n + 1 for n in range(2, min(N, k) + 1))
    benchmark.extra_info.update(
        drafts_per_s=batch / benchmark.stats.stats.median,
        merged_positions=int(((expected[3] - expected[2]) >= 2).sum()),
        bytes_moved=batch * k * (8 + 4) + batch * (3 * k * 8 + 8) + windows * (N * 4 + 4),
        device=torch.cuda.get_device_name(),
    )
