"""Verification by exact match (``kernels/match.py``; the engine's path for greedy requests without a
deferral rule, ``translation="exact"`` and prompt lookup), against the verification goals on an H100 at
[8 rows x 9 positions, 128256] bf16 logits: >= 80% of the device-to-device copy bandwidth, >= 3x the eager
reference, >= 1.5x its ``torch.compile``.

    python -m pytest benchmarks/bench_match.py --benchmark-only [--benchmark-json out.json]

Implementations: the eager torch reference ``match_reference``, ``torch.compile`` of it, ``match_triton``,
and ``copy``, a device-to-device copy of the logits, the bandwidth yardstick. Configurations: greedy,
sampling at T = 0.8, and the same with top-p 0.9. ``extra_info`` records the bytes the op must move at
least (logits once; the noise when sampling; outputs) and the bandwidth that implies.
"""

from __future__ import annotations

import pytest
import torch
from _timing import synced
from omnidraft_fast.kernels.match import match_reference, match_triton

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
torch._dynamo.config.recompile_limit = 64  # one compilation per shape (dynamic=False)

BATCHES = [1, 8, 64]
KS = [4, 8]
VOCABS = [32000, 128256, 151936]
CONFIGS = {"greedy": (0.0, 1.0), "sampled": (0.8, 1.0), "top_p": (0.8, 0.9)}  # temperature, top-p
IMPLEMENTATIONS = {
    "eager": match_reference,
    "compile": torch.compile(match_reference, dynamic=False),
    "triton": match_triton,
}


def match_inputs(
    batch: int, k: int, vocab: int, temperature: float, seed: int = 0, device: str | torch.device = "cuda"
) -> tuple:
    """(logits, draft_ids, noise) of one verification on ``device``: drafts that are the target's argmax, so
    that greedy rows accept all of them and sampled rows a realistic share."""
    generator = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(batch, k + 1, vocab, generator=generator, device=device).mul(3).bfloat16()
    draft_ids = logits[:, :k].argmax(-1)
    noise = None
    if temperature > 0:
        noise = torch.empty(batch, k + 1, vocab, device=device).exponential_(generator=generator)
    return logits, draft_ids, noise


def match_bytes(logits: torch.Tensor, noise: torch.Tensor | None) -> int:
    """What the op must move at least: the logits once, the noise when sampling, the outputs."""
    batch, width = logits.shape[:2]
    moved = logits.numel() * logits.element_size() + (0 if noise is None else noise.numel() * 4)
    return (
        moved + batch * width * 8 + batch * (width - 1) * 4 + batch * 9
    )  # tokens, target probs, counts, flags


@pytest.mark.parametrize("implementation", [*IMPLEMENTATIONS, "copy"])
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("batch", BATCHES)
def test_match(benchmark, implementation, config, vocab, k, batch):
    temperature, top_p = CONFIGS[config]
    logits, draft_ids, noise = match_inputs(batch, k, vocab, temperature)
    if implementation == "copy":
        out = torch.empty_like(logits)
        run = synced(lambda: out.copy_(logits))
        moved = 2 * logits.numel() * logits.element_size()
    else:
        match = IMPLEMENTATIONS[implementation]
        args = (logits, draft_ids, noise, temperature, 0, top_p)
        got, want = match(*args), match_reference(*args)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        run = synced(lambda: match(*args))
        moved = match_bytes(logits, noise)
    benchmark(run)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(
        bytes_moved=moved, gb_per_s=moved / seconds / 1e9, device=torch.cuda.get_device_name()
    )
