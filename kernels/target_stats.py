"""The statistics pass over a drafted block's target logits that verification starts with.

Verification (``verify.py``: speculative sampling and the deferral rules; ``match.py``: exact match) reads
the target's logits ``[batch, k+1, V_t]`` per position, each position's vocabulary split over ``splits``
programs (``~ 4 SMs / (batch (k+1))`` chunks of whole blocks). :func:`target_stats` launches

1. ``_stats_kernel`` (grid ``[batch (k+1), splits]``): per chunk, the online softmax of the logits at
   ``T = 1`` (max, normaliser: ``max p1 = 1 / Z1``) and at ``T`` (or the first argmax when greedy), and a
   NaN/+inf count;
2. with top-k/top-p, ``thresholds.py``'s threshold passes (``launch_thresholds``) on those partials: per
   position the threshold on ``z = logits / T``, the first kept id at it and the kept set's normaliser.

The verification kernels then merge a position's partials (:func:`combine_partials`) and read ``p(t)`` of
any token from its one logit (:func:`target_prob`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .rows import chunking
from .thresholds import launch_thresholds

__all__ = ["TargetStats", "combine_partials", "online_step", "target_prob", "target_stats"]


@triton.jit
def online_step(m, total, x):
    """One online-softmax step: running max ``m`` and ``total`` = sum exp(. - m), updated with block ``x``."""
    new_m = tl.maximum(m, tl.max(x, 0))
    safe_m = tl.where(new_m == float("-inf"), 0.0, new_m)
    return new_m, total * tl.exp(m - safe_m) + tl.sum(tl.exp(x - safe_m), 0)


@triton.jit
def combine_partials(
    part_m_ptr, part_aux_ptr, rows, valid, splits, SPLITS_P2: tl.constexpr, GREEDY: tl.constexpr
):
    """Merge the chunk partials of ``rows`` [N]: (max, sum of exp(. - max)), or (max, first argmax) if GREEDY."""
    s = tl.arange(0, SPLITS_P2)
    mask = valid[:, None] & (s < splits)[None, :]
    offs = rows[:, None] * splits + s[None, :]
    chunk_m = tl.load(part_m_ptr + offs, mask=mask, other=float("-inf"))
    m = tl.max(chunk_m, 1)
    # One return after a static if/else: Triton 3.9 types a return inside a constexpr branch against the
    # code after it.
    if GREEDY:
        chunk_arg = tl.load(part_aux_ptr + offs, mask=mask, other=0)
        first = tl.min(tl.where(chunk_m == m[:, None], s[None, :], SPLITS_P2), 1)
        aux = tl.sum(tl.where(s[None, :] == first[:, None], chunk_arg, 0), 1)
    else:
        chunk_z = tl.load(part_aux_ptr + offs, mask=mask, other=0.0)
        scale = tl.where(chunk_m == float("-inf"), 0.0, tl.exp(chunk_m - m[:, None]))
        aux = tl.sum(chunk_z * scale, 1)
    return m, aux


@triton.jit
def target_prob(x, t, inside, m, aux, thr, cut, temperature, GREEDY: tl.constexpr, FILTERED: tl.constexpr):
    """p(t) from the logit ``x`` of token ``t``: one-hot at ``aux`` (the argmax) when GREEDY, else the
    softmax of x / T over the kept set, ``aux`` its normaliser relative to exp(m); 0 outside ``inside``."""
    if GREEDY:
        p = (t == aux).to(tl.float32)
    else:
        z = tl.math.div_rn(x, temperature)
        p = tl.exp(z - m) / aux
        if FILTERED:
            p = tl.where((z > thr) | ((z == thr) & (t >= cut)), p, 0.0)
    return tl.where(inside, p, 0.0)


@triton.jit
def _stats_kernel(
    logits_ptr,  # [batch, k+1, vocab] fp32/bf16/fp16
    part_m1_ptr,  # [batch * (k+1), splits] fp32 out: chunk max of the logits (T = 1)
    part_z1_ptr,  # [batch * (k+1), splits] fp32 out: sum of exp(logit - chunk max)
    part_m_ptr,  # [batch * (k+1), splits] fp32 out: chunk max of z = logits / T
    part_aux_ptr,  # [batch * (k+1), splits] out: sum of exp(z - chunk max) fp32, or chunk argmax int64 (GREEDY)
    part_bad_ptr,  # [batch * (k+1), splits] int32 out: NaN/+inf count
    vocab,
    width,
    stride_lb,
    stride_lj,
    temperature,
    chunk,
    GREEDY: tl.constexpr,
    UNIT_T: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    row_logits = logits_ptr + (row // width) * stride_lb + (row % width) * stride_lj
    begin = split * chunk
    end = tl.minimum(begin + chunk, vocab)
    m1 = tl.full((), float("-inf"), tl.float32)
    z1 = tl.zeros((), tl.float32)
    bad = tl.zeros((), tl.int32)
    if GREEDY:
        best = begin.to(tl.int64)
        for start in range(begin, end, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(row_logits + offs, mask=offs < end, other=float("-inf")).to(tl.float32)
            bad += tl.sum(((x != x) | (x == float("inf"))).to(tl.int32), 0)
            best = tl.where(tl.max(x, 0) > m1, start + tl.argmax(x, 0).to(tl.int64), best)
            m1, z1 = online_step(m1, z1, x)
        tl.store(part_m_ptr + row * splits + split, m1)
        tl.store(part_aux_ptr + row * splits + split, best)
    else:
        m = tl.full((), float("-inf"), tl.float32)
        total = tl.zeros((), tl.float32)
        for start in range(begin, end, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(row_logits + offs, mask=offs < end, other=float("-inf")).to(tl.float32)
            bad += tl.sum(((x != x) | (x == float("inf"))).to(tl.int32), 0)
            m1, z1 = online_step(m1, z1, x)
            if not UNIT_T:
                m, total = online_step(m, total, tl.math.div_rn(x, temperature))
        if UNIT_T:
            m, total = m1, z1
        tl.store(part_m_ptr + row * splits + split, m)
        tl.store(part_aux_ptr + row * splits + split, total)
    tl.store(part_m1_ptr + row * splits + split, m1)
    tl.store(part_z1_ptr + row * splits + split, z1)
    tl.store(part_bad_ptr + row * splits + split, bad)


class TargetStats(NamedTuple):
    """What :func:`target_stats` leaves for the verification kernels (partials ``[batch (k+1), splits]``)."""

    logits: torch.Tensor  # [batch, k+1, V_t] the logits described (made contiguous where the search needs it)
    chunk: int  # vocabulary ids per program
    splits: int  # programs per position
    part_m1: torch.Tensor  # fp32 chunk max of the logits (T = 1)
    part_z1: torch.Tensor  # fp32 sum of exp(logit - chunk max)
    part_m: torch.Tensor  # fp32 chunk max of z = logits / T
    part_aux: torch.Tensor  # fp32 sum of exp(z - chunk max), or int64 chunk argmax when greedy
    part_bad: torch.Tensor  # int32 NaN/+inf count
    row_z: torch.Tensor  # [batch (k+1)] fp32 the kept set's normaliser relative to exp(max z) (filtered)
    row_t: torch.Tensor  # [batch (k+1)] fp32 the threshold on z (filtered)
    row_c: torch.Tensor  # [batch (k+1)] int64 the first kept id at the threshold (filtered)
    filtered: bool  # top-k/top-p filter the law (never when greedy): the row_* fields are the search's


def target_stats(
    target_logits: torch.Tensor,  # [batch, k+1, V_t] fp32/bf16/fp16, batch >= 1
    temperature: float,
    top_k: int,
    top_p: float,
    block: int,
) -> TargetStats:
    """The statistics pass (module docstring); unless ``filtered`` the ``row_*`` fields are placeholders."""
    batch, width, vocab = target_logits.shape
    device = target_logits.device
    greedy = temperature == 0.0
    filtered = not greedy and (0 < top_k < vocab or top_p < 1.0)
    if target_logits.stride(-1) != 1 or (
        filtered and target_logits.stride(0) != width * target_logits.stride(1)
    ):
        target_logits = (
            target_logits.contiguous()
        )  # the threshold search reads rows of a [batch (k+1), V_t] view
    rows = batch * width
    chunk, splits = chunking(vocab, rows, block, device)
    part_m1, part_z1, part_m = (
        torch.empty(rows, splits, dtype=torch.float32, device=device) for _ in range(3)
    )
    part_aux = torch.empty(rows, splits, dtype=torch.int64 if greedy else torch.float32, device=device)
    part_bad = torch.empty(rows, splits, dtype=torch.int32, device=device)
    stride_lb, stride_lj = target_logits.stride(0), target_logits.stride(1)
    _stats_kernel[(rows, splits)](
        target_logits, part_m1, part_z1, part_m, part_aux, part_bad, vocab, width, stride_lb, stride_lj,
        1.0 if greedy else temperature, chunk, GREEDY=greedy, UNIT_T=temperature == 1.0, BLOCK=block,
    )  # fmt: skip
    row_z = row_t = row_c = part_aux  # unused unless filtered
    if filtered:
        row_z, row_t, row_c = launch_thresholds(
            target_logits, None, stride_lj, part_m, part_aux, rows, vocab, temperature, top_k, top_p, block
        )  # fmt: skip
    return TargetStats(
        target_logits,
        chunk,
        splits,
        part_m1,
        part_z1,
        part_m,
        part_aux,
        part_bad,
        row_z,
        row_t,
        row_c,
        filtered,
    )
