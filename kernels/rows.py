"""What every pass over rows of a vocabulary shares: how a row is split into chunks over programs, and
the Triton helpers over one tile of a row (the sampling, statistics, threshold and race passes).

A row of ``vocab`` entries is cut into ``splits`` chunks of whole ``block``-wide tiles, so that a grid of
``[rows, splits]`` programs fills about four programs per SM (``target_programs``) however few the rows.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

__all__ = ["chunking", "load_z", "race_lanes", "race_step", "race_winner", "row_max_sum", "target_programs"]


@functools.cache
def target_programs(device: torch.device, per_sm: int = 4) -> int:
    """Programs a pass over rows aims at: ``per_sm`` per SM on a GPU (4 under the interpreter)."""
    if device.type == "cuda":
        return per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def chunking(width: int, rows: int, block: int, device: torch.device, per_sm: int = 4) -> tuple[int, int]:
    """(chunk, splits): the chunk of whole ``block`` tiles each program of a row of ``width`` (a vocabulary,
    or prompt lookup's slots) takes, and how many programs a row has, for about ``target_programs``
    programs over ``rows`` rows."""
    blocks = triton.cdiv(width, block)
    programs = target_programs(device, per_sm)
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
    """The exponential race over one tile, reduced at once: the running best value and its id, updated with
    ``race``, the tile's values from id ``start`` (the first id wins ties, within the tile and against
    earlier ones). For a kernel whose tiles already hold many values per thread, where ``race_lanes``'s
    accumulators spill (ptxas, sm_90, block 2048): verification's draw (two races beside the cascade's
    terms) and exact match's race."""
    block_best = tl.max(race, 0)
    best_id = tl.where(block_best > best, start + tl.argmax(race, 0).to(tl.int64), best_id)
    return tl.maximum(best, block_best), best_id


@triton.jit
def race_lanes(best, best_id, race, offs):
    """The exponential race over one tile, lane by lane: each lane's best value so far and its id, updated
    with ``race``, the tile's values at ids ``offs``. A lane keeps its first id among equal values (a later
    tile's equal value does not replace it), and a NaN never wins. Nothing is reduced across the tile:
    ``race_winner`` reduces the lanes once, after the last tile, where a block-wide max and argmax per tile
    put two reductions, and the latency of each, on every tile's path."""
    better = race > best
    return tl.where(better, race, best), tl.where(better, offs.to(tl.int32), best_id)


@triton.jit
def race_winner(best, best_id):
    """(value, id) of the race over the lanes of ``race_lanes``: the largest value, and the first id that
    holds it (so the first id wins ties over the whole chunk, as it does within each lane). Ids are int32
    in the lanes (a vocabulary is below 2**31) and int64 out."""
    value = tl.max(best, 0)
    return value, tl.min(tl.where(best == value, best_id, 2**31 - 1), 0).to(tl.int64)
