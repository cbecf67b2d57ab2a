"""What every pass over rows of a vocabulary shares: how a row is split into chunks over programs, and
the Triton helpers over one tile of a row (the sampling, statistics, threshold and race passes).

A row of ``vocab`` entries is cut into ``splits`` chunks of whole ``block``-wide tiles, so that a grid of
``[rows, splits]`` programs fills about ``PROGRAMS_PER_SM`` programs per SM (``target_programs``) however few
the rows.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

__all__ = ["PROGRAMS_PER_SM", "chunking", "load_z", "race_step", "row_max_sum", "target_programs"]

# Programs per SM a pass over rows aims at (the threshold passes take their own: thresholds.py).
# ``benchmarks/tune_kernels.py --programs`` times others.
PROGRAMS_PER_SM = 4


@functools.cache
def target_programs(device: torch.device, per_sm: int) -> int:
    """Programs a pass over rows aims at: ``per_sm`` per SM on a GPU (4 under the interpreter)."""
    if device.type == "cuda":
        return per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def chunking(
    width: int, rows: int, block: int, device: torch.device, per_sm: int | None = None
) -> tuple[int, int]:
    """(chunk, splits): the chunk of whole ``block`` tiles each program of a row of ``width`` (a vocabulary,
    or prompt lookup's slots) takes, and how many programs a row has, for about ``target_programs``
    programs over ``rows`` rows (``per_sm`` of them per SM; ``PROGRAMS_PER_SM`` when None)."""
    blocks = triton.cdiv(width, block)
    programs = target_programs(device, PROGRAMS_PER_SM if per_sm is None else per_sm)
    chunk = triton.cdiv(blocks, min(blocks, max(1, triton.cdiv(programs, rows)))) * block
    return chunk, triton.cdiv(width, chunk)


@triton.jit
def load_z(row_logits, mask_ptr, offs, vocab, temperature, HAS_MASK: tl.constexpr):
    """z = logits / T, -inf past the row and where the mask disallows.

    IEEE division, as torch on the CPU; torch on CUDA multiplies by ``1 / T`` for a scalar ``T``, which can
    differ in the last bit of fp32: a relative difference of 6e-8, too small to part or join two bf16 or fp16
    logits."""
    inside = offs < vocab
    x = tl.load(row_logits + offs, mask=inside, other=float("-inf")).to(tl.float32)
    z = tl.math.div_rn(x, temperature)
    if HAS_MASK:
        allowed = tl.load(mask_ptr + offs, mask=inside, other=0) != 0
        z = tl.where(allowed, z, float("-inf"))
    return z


@triton.jit
def row_max_sum(part_m, part_z, row, splits, SPLITS_P2: tl.constexpr):
    """Combine the chunks' online-softmax partials of one row: (max, sum of exp(z - max))."""
    offs = tl.arange(0, SPLITS_P2)
    inside = offs < splits
    chunk_m = tl.load(part_m + row * splits + offs, mask=inside, other=float("-inf"))
    chunk_z = tl.load(part_z + row * splits + offs, mask=inside, other=0.0)
    m = tl.max(chunk_m, 0)
    scale = tl.where(chunk_m == float("-inf"), 0.0, tl.exp(chunk_m - m))
    return m, tl.sum(chunk_z * scale, 0)


@triton.jit
def race_step(best, best_id, race, start):
    """The exponential race over one tile: the running best value and its id, updated with ``race``, the
    tile's values from id ``start`` (the first id wins ties, within the tile and against earlier ones)."""
    block_best = tl.max(race, 0)
    best_id = tl.where(block_best > best, start + tl.argmax(race, 0).to(tl.int64), best_id)
    return tl.maximum(best, block_best), best_id
