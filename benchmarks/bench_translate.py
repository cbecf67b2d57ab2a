"""Translation with n-gram merges (``kernels/translate.py``): drafted blocks per second for the eager torch
reference, ``torch.compile`` of it and the Triton kernel, at batch 1..256 and k 4/8, N = 4, a table of
2^16 slots at load factor 1/2.

    python -m pytest benchmarks/bench_translate.py --benchmark-only [--benchmark-json out.json]

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
from omnidraft_fast.kernels.translate import translate_ngram_reference, translate_triton

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
    counts = torch.zeros(CAPACITY, dtype=torch.int32, device="cuda")
    new_values = torch.randint(0, V_T, (keys.shape[0],), generator=generator, device="cuda")
    ngram_insert_triton(hashes, key_ids, values, counts, keys, new_values, torch.ones_like(new_values))
    return drafts, key_ids, values


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
