"""Drafter sampling: torch reference (eager), torch.compile of it and the Triton kernel, on CUDA.

Bytes moved (``extra_info["bytes_moved"]``; achieved bandwidth = bytes / time) count what the op must touch
once: the logits read, the fp32 noise read (when sampling) and the fp32 ``q`` written (not by ``greedy_ids``,
the draw of ids alone, ``probs=False``, as the engine's draft steps verified by exact match take it). The
yardstick is a device-to-device copy of the same logits (read + write). Run explicitly:

    python -m pytest benchmarks/bench_sampling.py --benchmark-only --benchmark-json=benchmarks/results/sampling.json
"""

from __future__ import annotations

import pytest
import torch
from _timing import synced
from omnidraft_fast.kernels.sampling import sample_reference, sample_triton
from torch._inductor.exc import InductorError

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# one compilation per shape and setting (dynamic=False): past the default limit of 8, dynamo runs the
# reference eagerly without a word, and the "compile" cases would time eager
torch._dynamo.config.recompile_limit = 64

ROWS = [1, 8, 72, 256]
VOCABS = [32000, 128256, 151936]
CONFIGS = {  # name: (temperature, top_k, top_p, probs)
    "greedy": (0.0, 0, 1.0, True),
    "greedy_ids": (0.0, 0, 1.0, False),
    "temperature": (1.0, 0, 1.0, True),
    "top_k_top_p": (0.8, 50, 0.95, True),
}
IMPLS = ["eager", "compile", "triton"]
# The top-p filter's cumsum of a softmax over a long row takes inductor's split-scan path, whose codegen
# fails on a broadcast operand (pytorch/pytorch#180221; torch 2.11 on an H200 at [72, 128256]).
_COMPILE_BUG = "inductor split-scan codegen, pytorch/pytorch#180221"


def sampling_inputs(rows: int, vocab: int, seed: int = 0, device: str | torch.device = "cuda"):
    """bf16 logits (standard normal x 3) and fp32 Exp(1) noise, both [rows, vocab] on ``device``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(rows, vocab, device=device, generator=generator).mul_(3).to(torch.bfloat16)
    noise = torch.empty(rows, vocab, device=device).exponential_(generator=generator)
    return logits, noise


def sampling_bytes(logits: torch.Tensor, noise: torch.Tensor | None, probs: bool = True) -> int:
    """What a draw must move at least: the logits read, the fp32 ``q`` written (``probs``), the noise read
    (sampling)."""
    q_bytes = 4 if probs else 0
    return logits.numel() * (logits.element_size() + q_bytes) + (0 if noise is None else noise.numel() * 4)


def _record(benchmark, rows: int, vocab: int, moved: int) -> None:
    benchmark.extra_info.update(
        rows=rows,
        vocab=vocab,
        bytes_moved=moved,
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
    )


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("rows", ROWS)
def test_copy(benchmark, rows, vocab):
    logits, _ = sampling_inputs(rows, vocab)
    out = torch.empty_like(logits)
    benchmark.group = f"sample rows={rows} vocab={vocab}"
    _record(benchmark, rows, vocab, 2 * logits.numel() * logits.element_size())
    benchmark(synced(lambda: out.copy_(logits)))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("rows", ROWS)
def test_sample(benchmark, rows, vocab, config, impl):
    temperature, top_k, top_p, probs = CONFIGS[config]
    logits, noise = sampling_inputs(rows, vocab)
    noise = None if temperature == 0.0 else noise
    fn = {
        "eager": sample_reference,
        "compile": torch.compile(sample_reference, dynamic=False),
        "triton": sample_triton,
    }[impl]
    try:
        fn(logits, noise, temperature, top_k, top_p, probs=probs)  # compile / warm up
    except InductorError as error:  # seen with torch 2.11: see _COMPILE_BUG
        pytest.skip(f"torch.compile cannot build this case ({_COMPILE_BUG}): {str(error).splitlines()[0]}")
    benchmark.group = f"sample rows={rows} vocab={vocab}"
    _record(benchmark, rows, vocab, sampling_bytes(logits, noise, probs))
    benchmark(synced(lambda: fn(logits, noise, temperature, top_k, top_p, probs=probs)))
