"""Prompt lookup's draft (``kernels/lookup.py``; the draft stage of an engine without a drafter): the eager
torch reference, ``torch.compile`` of it and the Triton kernel, per batch, context length and longest
suffix matched (``max_matching_ngram_size``), drafting ``k = 10`` tokens as transformers' examples do;
the kernel as shipped (a row's slots over several programs) and with one program a row.

    python -m pytest benchmarks/bench_lookup.py --benchmark-only [--benchmark-json out.json]

Contexts are random ids from a vocabulary of 32000 whose last tokens also occur once early in the row and
once in its middle, so the winning match is neither the first window nor absent. ``extra_info`` records
the bytes the op must move at least (each row's context read once, the draft written) and the bandwidth
that implies: the reference reads a whole ``[batch, slots]`` buffer ``N + 2`` times, the kernel each row's
context once (its shifted re-reads hit the same cache lines).
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from _timing import synced
from omnidraft_fast.kernels.lookup import lookup_reference, lookup_triton

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
torch._dynamo.config.recompile_limit = 64  # one compilation per shape (dynamic=False)

K = 10
BATCHES = [1, 8, 64]
CONTEXTS = [1024, 8192, 32768]
NGRAMS = [2, 4]
IMPLEMENTATIONS = {
    "eager": lookup_reference,
    "compile": torch.compile(lookup_reference, dynamic=False),
    "triton": lookup_triton,  # a row's slots over several programs (about 4 per SM in all)
    "triton_row": partial(lookup_triton, splits=1),  # one program a row (lookup v1): the A/B of TUNING.md
}


def lookup_inputs(batch: int, context: int, ngram: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(tokens, start, lengths) on CUDA: a spare slot after each row's context, as the rounds keep one."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    tokens = torch.randint(0, 32000, (batch, context + 1), generator=generator, device="cuda")
    suffix = tokens[:, context - ngram : context]
    tokens[:, 101 : 100 + ngram] = suffix[:, 1:]  # a shorter match, early
    tokens[:, context // 2 : context // 2 + ngram] = suffix  # the longest match
    start = torch.zeros(batch, dtype=torch.int64, device="cuda")
    lengths = torch.full((batch,), context, dtype=torch.int64, device="cuda")
    return tokens, start, lengths


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("ngram", NGRAMS)
@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("batch", BATCHES)
def test_lookup(benchmark, implementation, ngram, context, batch):
    tokens, start, lengths = lookup_inputs(batch, context, ngram)
    lookup = IMPLEMENTATIONS[implementation]
    args = (tokens, start, lengths, K, ngram)
    got, want = lookup(*args), lookup_reference(*args)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert bool((want[1] == K).all())  # the planted match drafts k tokens
    benchmark(synced(lambda: lookup(*args)))
    moved = batch * (context * 8 + K * 8 + 8 + 16)  # context, draft, count, start and length
    benchmark.extra_info.update(
        bytes_moved=moved,
        gb_per_s=moved / benchmark.stats.stats.median / 1e9,
        device=torch.cuda.get_device_name(),
    )
