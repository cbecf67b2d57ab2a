"""Drafter sampling: the distribution actually sampled from, and one draw from it.

Maths (speculative sampling, Leviathan et al. 2023, arXiv 2211.17192; the
filters follow transformers' logits warpers so that "top-k/top-p applied to both
models as the papers do" means exactly what ``model.generate`` samples from):

    z      = logits / T, and -inf where ``mask`` is False   (T > 0)
    top-k: keep z_v >= the k-th largest z                  (ties kept; k = 0 keeps all)
    top-p: sort softmax(z) ascending, drop the tokens whose cumulative mass is
           <= 1 - top_p, always keeping the most likely one (as transformers:
           among equal z the order is torch.sort's, which is unspecified; the
           kernel uses ascending ids, so the same number of them is dropped)
    q      = softmax(z restricted to the kept tokens)       (fp32)

One draw uses the exponential race: with ``E_v ~ Exp(1)`` i.i.d.,
``argmax_v q_v / E_v`` is distributed as ``q``. The noise is an argument, so a
draw is reproducible and the same noise gives the same token on every backend.
Greedy decoding (``T == 0``) is ``argmax z`` (first maximum) with ``q`` one-hot there.

The kept set is a threshold: ``{v : z_v > t} ∪ {v : z_v == t, v >= c}``. With
``m = max z``, ``w_v = exp(z_v - m)`` and ``Z_k`` the mass of the top-k set,
``t_k`` is the largest ``x`` with ``#{z >= x} >= k``; top-p keeps ``v`` iff
``sum_{u: z_u > z_v} w_u < top_p Z_k`` (tie-inclusive), which gives ``t``; of
the group ``z == t`` the sort then drops the ``d`` tokens (the kernel: the ``d``
lowest ids) whose cumulative mass, one tie at a time, stays <= ``(1 - top_p) Z_k``
(``c`` is the id after the d-th). ``q_v = w_v / Z`` on the kept set, ``Z`` its mass.
The reference decides top-p as transformers does, on an fp32 cumulative sum in sorted order; the kernel
compares partial sums taken in another order, against ``top_p`` in fp32. Where the boundary falls exactly
on a rounding point the two can keep one token more or less (10 equal logits at ``top_p = 0.1``:
transformers keeps 2 of them, the kernel 1); away from such points they keep the same set.

The Triton kernel (``sample_triton``) splits each row over ``splits`` programs
(grid ``[rows, splits]``, ``splits = min(blocks, ceil(4 SMs / rows))``, each a
chunk of whole blocks) and runs in passes over the vocabulary:

1. ``_stats_kernel``: an online softmax per chunk (running max, rescaled sum);
   greedy instead writes the zero probabilities and the chunk's argmax.
2. ``_threshold_pass_kernel`` (top-k/top-p only, grid ``[rows, splits]``, launched a fixed number of
   times; no host sync): an exact search for ``t`` on order-preserving int32 keys of ``z`` (the idea of
   FlashInfer's pivot samplers, made exact), one 4-bit digit per pass, most significant first (radix
   select): each program histograms its chunk's keys that match the digits picked so far (count, mass,
   smallest and largest key per digit value, accumulated in registers and reduced once), and the next
   launch combines the chunks' histograms, picks the digit holding the answer and either ends the
   search (one distinct key left) or narrows to it. Every program of a row advances the same state, and
   program 0 writes it: two halves, read by one pass and written by the next. Top-k and top-p are one
   search of at most 8 passes each (usually 3-5); a top-p boundary inside a group of equal logits adds
   a search over ids (``ceil(log16 V)`` passes, 5 at V = 128256). A row whose searches ended returns at
   once in the remaining launches; tiles without a candidate key skip the histogram.
3. ``_probs_kernel``: writes ``q`` and each chunk's race winner (reads the logits
   again, mostly from L2, and the noise).
4. ``_finish_kernel`` (one program per row): the first winner over the chunks;
   greedy writes the 1 of the one-hot row.

So greedy is one read of the logits plus the write of ``q``; temperature
sampling reads the logits twice, the noise once and writes ``q``; the filters
add up to 8 + 8 + ceil(log16 V) + 1 launches over the whole grid, of which
typically 6-10 read the logits (mostly from L2) and the rest return at once.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

__all__ = ["nonfinite_rows_reference", "sample_reference", "sample_triton", "sampling_probs_reference"]


def sampling_probs_reference(
    logits: torch.Tensor,  # [rows, vocab]
    temperature: float,
    top_k: int,
    top_p: float,
    mask: torch.Tensor | None = None,  # [vocab] bool, True = allowed
) -> torch.Tensor:  # [rows, vocab] fp32
    """The normalised distribution sampled from: mask, temperature, top-k, top-p (one-hot if T == 0)."""
    z = logits.float()
    if mask is not None:
        z = z.masked_fill(~mask, float("-inf"))
    if temperature == 0.0:
        # scatter, not one_hot: one_hot checks its indices on the host
        return torch.zeros_like(z).scatter_(-1, z.argmax(-1, keepdim=True), 1.0)
    z = z / temperature
    if 0 < top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=False)
        cumulative = sorted_z.softmax(-1).cumsum(-1)
        drop_sorted = cumulative <= 1 - top_p
        drop_sorted[..., -1] = False
        z = z.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return z.softmax(-1)


def sample_reference(
    logits: torch.Tensor,  # [rows, vocab]
    noise: torch.Tensor | None,  # [rows, vocab] Exp(1) draws; unused when greedy
    temperature: float,
    top_k: int,
    top_p: float,
    mask: torch.Tensor | None = None,  # [vocab] bool, True = allowed
) -> tuple[torch.Tensor, torch.Tensor]:  # ids [rows] int64, probs [rows, vocab] fp32
    """Sample one token per row from ``sampling_probs_reference``; returns the ids and the distribution."""
    probs = sampling_probs_reference(logits, temperature, top_k, top_p, mask)
    if temperature == 0.0:
        return probs.argmax(-1), probs
    return (probs / noise).argmax(-1), probs


def nonfinite_rows_reference(logits: torch.Tensor) -> torch.Tensor:  # logits [..., vocab] -> [...] bool
    """Rows a sampler cannot use: any NaN or +inf, or every entry -inf."""
    bad = torch.isnan(logits) | torch.isposinf(logits)
    return bad.any(-1) | torch.isneginf(logits).all(-1)


# ---------------------------------------------------------------------------------------------- Triton

_BUCKETS = 16  # a search pass histograms one 4-bit digit of the keys
_INT32_MIN = tl.constexpr(-(2**31))
_INT32_MAX = tl.constexpr(2**31 - 1)
# The threshold searches' state per row: int64 slots, then fp32 slots (``_threshold_pass_kernel``).
_PHASE = tl.constexpr(0)  # 0 top-k search, 1 top-p search, 2 tie cut (search over ids), 3 done
_SHIFT = tl.constexpr(1)  # the digit the next histogram reads
_PREFIX = tl.constexpr(2)  # the digits above it, picked so far
_N_ABOVE = tl.constexpr(3)  # tokens above the keys matching the prefix
_FLOOR = tl.constexpr(4)  # top-p searches the keys >= the top-k threshold
_TIE = tl.constexpr(5)  # the threshold's key
_CUT = tl.constexpr(6)  # first kept id at the threshold
_GOAL_N = tl.constexpr(7)  # top-k: k; tie cut: the number dropped
_NI = tl.constexpr(8)
_MASS_ABOVE = tl.constexpr(0)  # mass above the keys matching the prefix
_NORM = tl.constexpr(1)  # mass the top-p goal is relative to (Z_k)
_GOAL_S = tl.constexpr(2)  # top-p: top_p Z_k
_NORM_OUT = tl.constexpr(3)  # mass of the kept set
_NF = tl.constexpr(4)


@triton.jit
def _load_z(row_logits, mask_ptr, offs, vocab, temperature, HAS_MASK: tl.constexpr):
    """z = logits / T (IEEE division, as torch), -inf past the row and where the mask disallows."""
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
def _stats_kernel(
    logits_ptr,  # [rows, vocab] fp32/bf16/fp16
    mask_ptr,  # [vocab] uint8 (HAS_MASK)
    probs_ptr,  # [rows, vocab] fp32, zeroed here when GREEDY
    part_m_ptr,  # [rows, splits] fp32: chunk max
    part_aux_ptr,  # [rows, splits]: sum of exp(z - chunk max) fp32, or the chunk argmax int64 (GREEDY)
    vocab,
    stride_logits,
    stride_probs,
    temperature,
    chunk,
    GREEDY: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    row_logits = logits_ptr + row * stride_logits
    begin = split * chunk
    end = tl.minimum(begin + chunk, vocab)
    m = tl.full((), float("-inf"), tl.float32)
    if GREEDY:
        best = begin.to(tl.int64)
        for start in range(begin, end, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            z = _load_z(row_logits, mask_ptr, offs, vocab, temperature, HAS_MASK)
            tl.store(probs_ptr + row * stride_probs + offs, tl.zeros((BLOCK,), tl.float32), mask=offs < end)
            block_m = tl.max(z, 0)
            best = tl.where(block_m > m, start + tl.argmax(z, 0).to(tl.int64), best)
            m = tl.maximum(m, block_m)
        tl.store(part_aux_ptr + row * splits + split, best)
    else:
        total = tl.zeros((), tl.float32)
        for start in range(begin, end, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            z = _load_z(row_logits, mask_ptr, offs, vocab, temperature, HAS_MASK)
            new_m = tl.maximum(m, tl.max(z, 0))
            safe_m = tl.where(new_m == float("-inf"), 0.0, new_m)
            total = total * tl.exp(m - safe_m) + tl.sum(tl.exp(z - safe_m), 0)
            m = new_m
        tl.store(part_aux_ptr + row * splits + split, total)
    tl.store(part_m_ptr + row * splits + split, m)


@triton.jit
def _key32(z):
    """Order-preserving int32 key of fp32 ``z`` (-0 and +0 share a key)."""
    bits = tl.where(z == 0.0, 0.0, z).to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _threshold_pass_kernel(
    logits_ptr,  # [rows, vocab]
    mask_ptr,  # [vocab] uint8 (HAS_MASK)
    part_m_ptr,  # [rows, splits] fp32: chunk max of z
    part_z_ptr,  # [rows, splits] fp32: chunk sum of exp(z - chunk max)
    state_i_ptr,  # [2, rows, _NI] int64: the search state (one half read, the other written)
    state_f_ptr,  # [2, rows, _NF] fp32
    hist_n_ptr,  # [2, rows, splits, BUCKETS] int32: each chunk's count per digit
    hist_s_ptr,  # [2, rows, splits, BUCKETS] fp32: its mass exp(z - m)
    hist_lo_ptr,  # [2, rows, splits, BUCKETS] int32: its smallest key
    hist_hi_ptr,  # [2, rows, splits, BUCKETS] int32: its largest key
    row_z_ptr,  # [rows] fp32 out (when the row's searches end): mass of the kept set, relative to exp(max z)
    row_t_ptr,  # [rows] fp32 out: threshold t
    row_c_ptr,  # [rows] int64 out: first kept id among z == t
    rows,
    vocab,
    stride_logits,
    temperature,
    top_k,
    top_p,
    chunk,
    splits,
    id_shift,  # the id search's first digit: ids need id_shift + 4 bits
    SPLITS_P2: tl.constexpr,
    TOP_K: tl.constexpr,
    TOP_P: tl.constexpr,
    HAS_MASK: tl.constexpr,
    FIRST: tl.constexpr,
    PARITY: tl.constexpr,
    BLOCK: tl.constexpr,
    BUCKETS: tl.constexpr,
):
    """One pass of the threshold searches (module docstring, step 2): advance the row's state with the
    previous pass's digit histograms, then histogram this program's chunk for the next digit."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    m, total = row_max_sum(part_m_ptr, part_z_ptr, row, splits, SPLITS_P2)
    src_i = state_i_ptr + ((1 - PARITY) * rows + row) * _NI
    src_f = state_f_ptr + ((1 - PARITY) * rows + row) * _NF
    if FIRST:
        phase = tl.full((), 1, tl.int64)
        if TOP_K:
            phase = tl.full((), 0, tl.int64)
        shift = tl.full((), 28, tl.int64)
        prefix = tl.zeros((), tl.int64)
        n_above = tl.zeros((), tl.int64)
        floor = tl.full((), _INT32_MIN, tl.int64)
        tie = tl.zeros((), tl.int64)
        cut = tl.zeros((), tl.int64)
        goal_n = tl.zeros((), tl.int64) + top_k
        mass_above = tl.zeros((), tl.float32)
        norm = total
        goal_s = top_p * total
        norm_out = total
    else:
        phase = tl.load(src_i + _PHASE)
        shift = tl.load(src_i + _SHIFT)
        prefix = tl.load(src_i + _PREFIX)
        n_above = tl.load(src_i + _N_ABOVE)
        floor = tl.load(src_i + _FLOOR)
        tie = tl.load(src_i + _TIE)
        cut = tl.load(src_i + _CUT)
        goal_n = tl.load(src_i + _GOAL_N)
        mass_above = tl.load(src_f + _MASS_ABOVE)
        norm = tl.load(src_f + _NORM)
        goal_s = tl.load(src_f + _GOAL_S)
        norm_out = tl.load(src_f + _NORM_OUT)
        # The previous pass's histograms (of the digit at ``shift``, over the keys matching ``prefix``).
        bucket = tl.arange(0, BUCKETS)
        chunks = tl.arange(0, SPLITS_P2)[:, None]
        cells = (((1 - PARITY) * rows + row) * splits + chunks) * BUCKETS + bucket[None, :]
        # [SPLITS_P2, BUCKETS]; a row past its searches reads stale cells and ignores what it read
        live = (chunks < splits) & (bucket[None, :] < BUCKETS)
        n_b = tl.sum(tl.load(hist_n_ptr + cells, mask=live, other=0), 0).to(tl.int64)
        s_b = tl.sum(tl.load(hist_s_ptr + cells, mask=live, other=0.0), 0)
        min_b = tl.min(tl.load(hist_lo_ptr + cells, mask=live, other=_INT32_MAX), 0)
        max_b = tl.max(tl.load(hist_hi_ptr + cells, mask=live, other=_INT32_MIN), 0)
        n_prefix = tl.cumsum(n_b, 0)
        s_prefix = tl.cumsum(s_b, 0)
        n_gt = n_above + tl.sum(tl.where(bucket == BUCKETS - 1, n_prefix, 0), 0) - n_prefix  # above the digit
        s_gt = mass_above + tl.sum(tl.where(bucket == BUCKETS - 1, s_prefix, 0.0), 0) - s_prefix
        # top-k and ties: the largest digit with #{key >= it} >= goal; top-p: the smallest with mass above < goal
        pick_n = tl.max(tl.where((n_b > 0) & (n_gt + n_b >= goal_n), bucket, -1), 0)
        pick_p = tl.min(tl.where((n_b > 0) & (s_gt < goal_s), bucket, BUCKETS), 0)
        picked = bucket == tl.where(phase == 1, pick_p, pick_n)
        lo = tl.sum(tl.where(picked, min_b, 0), 0).to(tl.int64)
        hi = tl.sum(tl.where(picked, max_b, 0), 0).to(tl.int64)
        n = tl.sum(tl.where(picked, n_b, 0), 0)
        s = tl.sum(tl.where(picked, s_b, 0.0), 0)
        n_above_new = tl.sum(tl.where(picked, n_gt, 0), 0)
        mass_above_new = tl.sum(tl.where(picked, s_gt, 0.0), 0)
        pick = tl.sum(tl.where(picked, bucket, 0), 0).to(tl.int64)
        searching = phase < 3
        found = searching & (lo == hi)  # one key left in the picked digit: the answer
        # Narrow (the search goes on) or end the phase.
        go_on = searching & ~found
        prefix = tl.where(go_on, prefix | (pick << shift), prefix)
        shift = tl.where(go_on, shift - 4, shift)
        n_above = tl.where(go_on, n_above_new, n_above)
        mass_above = tl.where(go_on, mass_above_new, mass_above)
        # top-k found: t_k = lo keeps the keys >= it, of mass Z_k; top-p (if on) searches above t_k.
        end_k = found & (phase == 0)
        z_k = mass_above_new + s
        # top-p found: of the n tokens at t, the sort drops d (the lowest ids) while their mass stays
        # <= (1 - p) Z; d > 0 starts the search for the d-th lowest id among them.
        end_p = found & (phase == 1)
        below = norm - mass_above_new - s
        each = s / tl.maximum(n, 1).to(tl.float32)
        spare = tl.where(
            end_p & (each > 0), ((1.0 - top_p) * norm - below) / tl.where(each > 0, each, 1.0), 0.0
        )
        drop = tl.minimum(tl.maximum(tl.floor(spare).to(tl.int64), 0), n - 1)
        end_tie = found & (phase == 2)
        after_k = tl.full((), 3, tl.int64)  # top-k alone: done
        if TOP_P:
            after_k = tl.full((), 1, tl.int64)
        restart = (end_k & (after_k == 1)) | (end_p & (drop > 0))
        tie = tl.where(end_k | end_p, lo, tie)  # the threshold key so far
        floor = tl.where(end_k, lo, floor)
        goal_s = tl.where(end_k, top_p * z_k, goal_s)
        norm = tl.where(end_k, z_k, norm)
        norm_out = tl.where(end_k, z_k, norm_out)
        kept = (n - drop).to(tl.float32) / tl.maximum(n, 1).to(tl.float32)
        norm_out = tl.where(end_p, mass_above_new + s * kept, norm_out)
        goal_n = tl.where(end_p, drop, goal_n)
        cut = tl.where(end_tie, ((1 << (id_shift + 4)) - 1) - lo + 1, cut)
        phase = tl.where(end_k, after_k, phase)
        phase = tl.where(end_p, tl.where(drop > 0, 2, 3), phase)
        phase = tl.where(end_tie, 3, phase)
        shift = tl.where(restart, tl.where(phase == 2, id_shift, 28), shift)
        prefix = tl.where(restart, 0, prefix)
        n_above = tl.where(restart, 0, n_above)
        mass_above = tl.where(restart, 0.0, mass_above)
    dst_i = state_i_ptr + (PARITY * rows + row) * _NI
    dst_f = state_f_ptr + (PARITY * rows + row) * _NF
    if split == 0:
        tl.store(dst_i + _PHASE, phase)
        tl.store(dst_i + _SHIFT, shift)
        tl.store(dst_i + _PREFIX, prefix)
        tl.store(dst_i + _N_ABOVE, n_above)
        tl.store(dst_i + _FLOOR, floor)
        tl.store(dst_i + _TIE, tie)
        tl.store(dst_i + _CUT, cut)
        tl.store(dst_i + _GOAL_N, goal_n)
        tl.store(dst_f + _MASS_ABOVE, mass_above)
        tl.store(dst_f + _NORM, norm)
        tl.store(dst_f + _GOAL_S, goal_s)
        tl.store(dst_f + _NORM_OUT, norm_out)
        if phase == 3:
            bits = tie.to(tl.int32)
            tl.store(row_t_ptr + row, (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True))
            tl.store(row_c_ptr + row, cut)
            tl.store(row_z_ptr + row, norm_out)
    if phase < 3:
        # Histogram the digit at ``shift`` of the keys matching ``prefix`` above it: the keys of z
        # (>= floor) with the sign bit flipped, so that the digits order as the keys; for the ties, the
        # keys id_max - id of the tokens at the threshold.
        ties = phase == 2
        flip = tl.where(ties, 0, _INT32_MIN)
        high = (~((tl.full((), 1, tl.int64) << (shift + 4)) - 1)).to(tl.int32)  # 0 when shift + 4 == 32
        want = prefix.to(tl.int32)
        id_max = ((1 << (id_shift + 4)) - 1).to(tl.int32)
        tie32 = tie.to(tl.int32)
        floor32 = floor.to(tl.int32)
        shift32 = shift.to(tl.int32)
        bucket = tl.arange(0, BUCKETS)
        acc_n = tl.zeros((BLOCK, BUCKETS), tl.int32)
        acc_s = tl.zeros((BLOCK, BUCKETS), tl.float32)
        acc_lo = tl.full((BLOCK, BUCKETS), _INT32_MAX, tl.int32)
        acc_hi = tl.full((BLOCK, BUCKETS), _INT32_MIN, tl.int32)
        row_logits = logits_ptr + row * stride_logits
        begin = split * chunk
        end = tl.minimum(begin + chunk, vocab)
        for start in range(begin, end, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            z = _load_z(row_logits, mask_ptr, offs, vocab, temperature, HAS_MASK)
            zkey = _key32(z)
            key = tl.where(ties, id_max - offs.to(tl.int32), zkey)
            u = key ^ flip
            chosen = (offs < end) & tl.where(ties, zkey == tie32, zkey >= floor32) & ((u & high) == want)
            if tl.max(chosen.to(tl.int32), 0) > 0:
                hit = chosen[:, None] & (((u >> shift32) & (BUCKETS - 1))[:, None] == bucket[None, :])
                acc_n += hit.to(tl.int32)
                acc_s += tl.where(hit, tl.exp(z - m)[:, None], 0.0)
                acc_lo = tl.minimum(acc_lo, tl.where(hit, key[:, None], _INT32_MAX))
                acc_hi = tl.maximum(acc_hi, tl.where(hit, key[:, None], _INT32_MIN))
        mine = ((PARITY * rows + row) * splits + split) * BUCKETS + bucket
        tl.store(hist_n_ptr + mine, tl.sum(acc_n, 0))
        tl.store(hist_s_ptr + mine, tl.sum(acc_s, 0))
        tl.store(hist_lo_ptr + mine, tl.min(acc_lo, 0))
        tl.store(hist_hi_ptr + mine, tl.max(acc_hi, 0))


def _search_passes(top_k_on: bool, top_p_on: bool, vocab: int) -> tuple[int, int]:
    """(id_shift, passes): the id search's first digit and the most histogram passes the searches need
    (8 digits of a 32-bit key per search; the ids' digits for the tie cut)."""
    id_digits = max(1, triton.cdiv((vocab - 1).bit_length(), 4))
    return 4 * (id_digits - 1), 8 * top_k_on + (8 + id_digits) * top_p_on


def launch_thresholds(
    logits: torch.Tensor,  # rows of ``vocab`` logits, ``stride`` apart
    mask: torch.Tensor | None,  # [vocab] uint8
    stride: int,
    part_m: torch.Tensor,  # [rows, splits] fp32
    part_z: torch.Tensor,  # [rows, splits] fp32
    rows: int,
    vocab: int,
    temperature: float,
    top_k: int,
    top_p: float,
    chunk: int,
    block: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # row_z fp32, row_t fp32, row_c int64, all [rows]
    """The top-k/top-p threshold of each row (module docstring, step 2): a fixed number of pass launches
    over the ``[rows, splits]`` grid of the stats kernel (no host sync); a row whose searches ended
    early returns at once in the remaining passes."""
    device = logits.device
    splits = part_m.shape[1]
    top_k_on, top_p_on = 0 < top_k < vocab, top_p < 1.0
    id_shift, passes = _search_passes(top_k_on, top_p_on, vocab)
    state_i = torch.empty(2, rows, _NI.value, dtype=torch.int64, device=device)
    state_f = torch.empty(2, rows, _NF.value, dtype=torch.float32, device=device)
    hist_n, hist_lo, hist_hi = (
        torch.empty(2, rows, splits, _BUCKETS, dtype=torch.int32, device=device) for _ in range(3)
    )
    hist_s = torch.empty(2, rows, splits, _BUCKETS, dtype=torch.float32, device=device)
    row_z = torch.empty(rows, dtype=torch.float32, device=device)
    row_t = torch.empty(rows, dtype=torch.float32, device=device)
    row_c = torch.empty(rows, dtype=torch.int64, device=device)
    mask_arg = logits if mask is None else mask
    for step in range(passes + 1):  # the last launch only reads the last histograms
        _threshold_pass_kernel[(rows, splits)](
            logits, mask_arg, part_m, part_z, state_i, state_f, hist_n, hist_s, hist_lo, hist_hi, row_z, row_t,
            row_c, rows, vocab, stride, temperature, top_k, top_p, chunk, splits, id_shift,
            SPLITS_P2=triton.next_power_of_2(splits), TOP_K=top_k_on, TOP_P=top_p_on, HAS_MASK=mask is not None,
            FIRST=step == 0, PARITY=step % 2, BLOCK=min(block, 128), BUCKETS=_BUCKETS, num_warps=4,
        )  # fmt: skip
    return row_z, row_t, row_c


@triton.jit
def race_step(best, best_id, race, start):
    """The exponential race over one tile: the running best value and its id, updated with ``race``, the
    tile's values from id ``start`` (the first id wins ties, within the tile and against earlier ones)."""
    block_best = tl.max(race, 0)
    best_id = tl.where(block_best > best, start + tl.argmax(race, 0).to(tl.int64), best_id)
    return tl.maximum(best, block_best), best_id


@triton.jit
def _probs_kernel(
    logits_ptr,  # [rows, vocab]
    mask_ptr,  # [vocab] uint8 (HAS_MASK)
    noise_ptr,  # [rows, vocab] fp32 Exp(1)
    probs_ptr,  # [rows, vocab] fp32 out
    part_m_ptr,  # [rows, splits] fp32
    part_z_ptr,  # [rows, splits] fp32
    row_z_ptr,  # [rows] fp32 (FILTERED)
    row_t_ptr,  # [rows] fp32 (FILTERED)
    row_c_ptr,  # [rows] int64 (FILTERED)
    win_val_ptr,  # [rows, splits] fp32 out: the chunk's best q / E
    win_id_ptr,  # [rows, splits] int64 out: its id
    vocab,
    stride_logits,
    stride_noise,
    stride_probs,
    temperature,
    chunk,
    splits,
    SPLITS_P2: tl.constexpr,
    FILTERED: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    row_logits = logits_ptr + row * stride_logits
    m, norm = row_max_sum(part_m_ptr, part_z_ptr, row, splits, SPLITS_P2)
    if FILTERED:
        norm = tl.load(row_z_ptr + row)
        t = tl.load(row_t_ptr + row)
        cut = tl.load(row_c_ptr + row)
    inv_norm = 1.0 / norm
    begin = split * chunk
    end = tl.minimum(begin + chunk, vocab)
    best = tl.full((), -1.0, tl.float32)
    best_id = begin.to(tl.int64)
    for start in range(begin, end, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < end
        z = _load_z(row_logits, mask_ptr, offs, vocab, temperature, HAS_MASK)
        q = tl.exp(z - m) * inv_norm
        if FILTERED:
            q = tl.where((z > t) | ((z == t) & (offs >= cut)), q, 0.0)
        tl.store(probs_ptr + row * stride_probs + offs, q, mask=inside)
        noise = tl.load(noise_ptr + row * stride_noise + offs, mask=inside, other=1.0)
        best, best_id = race_step(best, best_id, tl.where(inside, q / noise, -1.0), start)
    tl.store(win_val_ptr + row * splits + split, best)
    tl.store(win_id_ptr + row * splits + split, best_id)


@triton.jit
def _finish_kernel(
    win_val_ptr,  # [rows, splits] fp32
    win_id_ptr,  # [rows, splits] int64
    ids_ptr,  # [rows] int64 out
    probs_ptr,  # [rows, vocab] fp32: the 1 of the one-hot row is written when ONE_HOT
    stride_probs,
    splits,
    SPLITS_P2: tl.constexpr,
    ONE_HOT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, SPLITS_P2)
    inside = offs < splits
    val = tl.load(win_val_ptr + row * splits + offs, mask=inside, other=float("-inf"))
    win = tl.load(win_id_ptr + row * splits + offs, mask=inside, other=0)
    best = tl.sum(tl.where(offs == tl.argmax(val, 0), win, 0), 0)  # the first chunk wins ties
    tl.store(ids_ptr + row, best)
    if ONE_HOT:
        tl.store(probs_ptr + row * stride_probs + best, 1.0)


@functools.cache
def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def sample_triton(
    logits: torch.Tensor,  # [rows, vocab] fp32/bf16/fp16
    noise: torch.Tensor | None,  # [rows, vocab] fp32 Exp(1) draws; unused when greedy
    temperature: float,
    top_k: int,
    top_p: float,
    mask: torch.Tensor | None = None,  # [vocab] bool, True = allowed
    *,
    block: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:  # ids [rows] int64, probs [rows, vocab] fp32
    """``sample_reference`` in Triton (see the module docstring); ``block`` is the tile of the vocabulary."""
    rows, vocab = logits.shape
    device = logits.device
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    greedy = temperature == 0.0
    if not greedy and noise.stride(-1) != 1:
        noise = noise.contiguous()
    probs = torch.empty(rows, vocab, dtype=torch.float32, device=device)
    ids = torch.empty(rows, dtype=torch.int64, device=device)
    if rows == 0:
        return ids, probs
    blocks = triton.cdiv(vocab, block)
    chunk = triton.cdiv(blocks, min(blocks, max(1, triton.cdiv(_target_programs(device), rows)))) * block
    splits = triton.cdiv(vocab, chunk)
    splits_p2 = triton.next_power_of_2(splits)
    has_mask = mask is not None
    mask_arg = mask.contiguous().view(torch.uint8) if has_mask else logits
    grid = (rows, splits)

    part_m = torch.empty(rows, splits, dtype=torch.float32, device=device)
    part_aux = torch.empty(rows, splits, dtype=torch.int64 if greedy else torch.float32, device=device)
    _stats_kernel[grid](
        logits, mask_arg, probs, part_m, part_aux, vocab, logits.stride(0), probs.stride(0),
        1.0 if greedy else temperature, chunk, GREEDY=greedy, HAS_MASK=has_mask, BLOCK=block,
    )  # fmt: skip
    if greedy:
        _finish_kernel[(rows,)](
            part_m, part_aux, ids, probs, probs.stride(0), splits, splits_p2, ONE_HOT=True
        )
        return ids, probs

    top_k_on = 0 < top_k < vocab
    filtered = top_k_on or top_p < 1.0
    row_z = row_t = row_c = part_aux  # unused unless filtered
    if filtered:
        row_z, row_t, row_c = launch_thresholds(
            logits, mask_arg if has_mask else None, logits.stride(0), part_m, part_aux, rows, vocab, temperature,
            top_k, top_p, chunk, block,
        )  # fmt: skip
    win_val = torch.empty(rows, splits, dtype=torch.float32, device=device)
    win_id = torch.empty(rows, splits, dtype=torch.int64, device=device)
    _probs_kernel[grid](
        logits, mask_arg, noise, probs, part_m, part_aux, row_z, row_t, row_c, win_val, win_id, vocab,
        logits.stride(0), noise.stride(0), probs.stride(0), temperature, chunk, splits, splits_p2,
        FILTERED=filtered, HAS_MASK=has_mask, BLOCK=block,
    )  # fmt: skip
    _finish_kernel[(rows,)](win_val, win_id, ids, probs, probs.stride(0), splits, splits_p2, ONE_HOT=False)
    return ids, probs
