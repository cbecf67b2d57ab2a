"""The top-k/top-p threshold of each row, found exactly on the device with no host sync (radix select).

The kept set of a filtered row is a threshold (``sampling.py``'s module docstring states the rule):
``{v : z_v > t} ∪ {v : z_v == t, v >= c}``. The search runs on order-preserving int32 keys of ``z``
(the idea of FlashInfer's pivot samplers, made exact), one 4-bit digit per pass, most significant first.
``_threshold_pass_kernel`` runs over a ``[rows, splits]`` grid of its own (chunks of whole tiles, more
programs than the other passes: ``PROGRAMS_PER_SM``) and reads each row's max and mass from the
statistics pass's per-chunk online-softmax partials. It is launched a fixed number of times. Each launch
combines the previous one's per-chunk results for the set of keys that match the digits picked so far
(the set holding the answer): the set's histogram of the next digit (count and mass per digit value) and
its smallest and largest key. A set of one key is the answer; otherwise the launch picks the digit that
holds the answer and narrows to it (a digit picked at the last place is one key, the answer too). Then it
histograms its chunk's keys in the narrowed set, a tile at a time: the counts with ``tl.histogram``, the
mass per digit with one sum per digit value the tile holds, and a tile without a key in the set costs its
read alone.
Every program of a row advances the same state, and program 0 writes it: two halves, read by one pass and
written by the next.

The first two passes read the program's whole chunk; every later one reads the chunk's candidates alone:
the ids of the keys a later pass may still need, which each pass from the second on writes in place over
its chunk's slots (the keys from the set's smallest up: the set, the keys above it, which top-p after top-k
searches again, and the ties; in the id search the ties alone). Passes after the first few then cost a
read of the candidates, not of the row; their slots take one int32 per logit of scratch. A row whose
searches ended is marked done, and its programs return at once in the remaining launches.

Top-k and top-p are one search of at most 8 passes each (usually 3-5: a set of one key ends a search one
pass after the digit that left it); a top-p boundary inside a group of equal logits adds a search over ids
(``ceil(log16 V)`` passes, 5 at V = 128256) for the cut ``c``. The id search counts alone, and so does
top-k when top-p follows it: top-p's first pass histograms the keys >= t_k, whose mass is Z_k, the scale of
top-p's goal.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rows import chunking, load_z, row_max_sum

__all__ = ["launch_thresholds"]

_BUCKETS = 16  # a search pass histograms one 4-bit digit of the keys
# Programs per SM of a pass (``rows.chunking``): four times the other passes' four, since a pass is bound by
# the latency of its tile loop (a read and a block-wide test per tile), which more resident warps hide.
PROGRAMS_PER_SM = 16
# The most warps a pass takes (``_warps``); ``benchmarks/tune_kernels.py --pass-warps`` times others.
PASS_WARPS = 8
# Registers a thread of a pass after the first may take (ptxas's ``maxnreg``; None: no cap): 128 keeps two
# 8-warp programs on an SM, where Triton 3.6 gives those passes 164-174 and so one (benchmarks/TUNING.md,
# "Occupancy"); the first pass, at 48-80, goes uncapped (a cap lets ptxas take more, up to it).
PASS_MAXNREG = 128
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
_GOAL_S = tl.constexpr(1)  # top-p: (1 - top_p) Z_k, the mass the dropped tokens stay within; -1: not yet
_NORM_OUT = tl.constexpr(2)  # mass of the kept set
_MASS_BELOW = tl.constexpr(3)  # mass below the keys matching the prefix (and >= the floor)
_NF = tl.constexpr(4)


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _key32(z):
    """Order-preserving int32 key of fp32 ``z`` (-0 and +0 share a key)."""
    bits = tl.where(z == 0.0, 0.0, z).to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _threshold_pass_kernel(
    logits_ptr,  # [rows, vocab]
    mask_ptr,  # [vocab] uint8 (HAS_MASK)
    part_m_ptr,  # [rows, stats] fp32: the statistics pass's chunk max of z
    part_z_ptr,  # [rows, stats] fp32: its chunk sum of exp(z - chunk max)
    state_i_ptr,  # [2, rows, _NI] int64: the search state (one half read, the other written)
    state_f_ptr,  # [2, rows, _NF] fp32
    hist_n_ptr,  # [2, rows, splits, BUCKETS] int32: each chunk's count per digit
    hist_s_ptr,  # [2, rows, splits, BUCKETS] fp32: its mass exp(z - m)
    set_lo_ptr,  # [2, rows, splits] int32: its smallest key matching the prefix
    set_hi_ptr,  # [2, rows, splits] int32: its largest
    cand_ptr,  # [rows, splits * chunk] int32: each chunk's candidates, the ids a later pass may need
    count_ptr,  # [rows, splits] int32: how many of its slots hold candidates
    done_ptr,  # [rows] int32: 1 once the row's searches ended
    row_z_ptr,  # [rows] fp32 out (when the row's searches end): mass of the kept set, relative to exp(max z)
    row_t_ptr,  # [rows] fp32 out: threshold t
    row_c_ptr,  # [rows] int64 out: first kept id among z == t
    rows,
    vocab,
    stride_logits,
    temperature,
    top_k,
    top_p_rest,  # 1 - top_p, taken in double precision on the host
    stats,
    chunk,
    splits,
    id_shift,  # the id search's first digit: ids need id_shift + 4 bits
    STATS_P2: tl.constexpr,
    SPLITS_P2: tl.constexpr,
    TOP_K: tl.constexpr,
    TOP_P: tl.constexpr,
    HAS_MASK: tl.constexpr,
    FIRST: tl.constexpr,
    FROM_CANDIDATES: tl.constexpr,  # read the chunk's candidates, not the whole chunk
    PARITY: tl.constexpr,
    BLOCK: tl.constexpr,
    BUCKETS: tl.constexpr,
):
    """One pass of the threshold searches (module docstring): advance the row's state with the previous
    pass's histograms, then histogram this program's chunk for the next digit."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    if not FIRST:  # noqa: SIM102 (a constexpr test: FIRST reads no flag, which it has not written yet)
        if tl.load(done_ptr + row) != 0:  # the row's searches ended in an earlier pass
            return
    m, total = row_max_sum(part_m_ptr, part_z_ptr, row, stats, STATS_P2)
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
        mass_below = tl.zeros((), tl.float32)
        goal_s = top_p_rest * total
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
        mass_below = tl.load(src_f + _MASS_BELOW)
        goal_s = tl.load(src_f + _GOAL_S)
        norm_out = tl.load(src_f + _NORM_OUT)
        # The previous pass's histograms of the digit at ``shift`` over the set of keys matching ``prefix``
        # (which holds the answer), and the set's smallest and largest key.
        bucket = tl.arange(0, BUCKETS)
        chunks = tl.arange(0, SPLITS_P2)
        cells = (((1 - PARITY) * rows + row) * splits + chunks[:, None]) * BUCKETS + bucket[None, :]
        # [SPLITS_P2, BUCKETS]; a row past its searches reads stale cells and ignores what it read
        live = (chunks[:, None] < splits) & (bucket[None, :] < BUCKETS)
        n_b = tl.sum(tl.load(hist_n_ptr + cells, mask=live, other=0), 0).to(tl.int64)
        s_b = tl.sum(tl.load(hist_s_ptr + cells, mask=live, other=0.0), 0)
        ends = ((1 - PARITY) * rows + row) * splits + chunks
        set_lo = tl.min(tl.load(set_lo_ptr + ends, mask=chunks < splits, other=_INT32_MAX), 0).to(tl.int64)
        set_hi = tl.max(tl.load(set_hi_ptr + ends, mask=chunks < splits, other=_INT32_MIN), 0).to(tl.int64)
        # The first top-p pass after top-k histograms the keys >= t_k: their mass is Z_k, the goal's scale
        # (top-k's passes count alone when top-p follows).
        pending = (phase == 1) & (goal_s < 0)
        goal_s = tl.where(pending, top_p_rest * tl.sum(s_b, 0), goal_s)
        n_prefix = tl.cumsum(n_b, 0)
        n_gt = n_above + tl.sum(tl.where(bucket == BUCKETS - 1, n_prefix, 0), 0) - n_prefix  # above the digit
        # The mass at or below each digit, summed upwards from the smallest keys as transformers' cumulative
        # sum is, so that a top_p within fp32 rounding of 1 keeps the tail it keeps.
        s_le = mass_below + tl.cumsum(s_b, 0)
        # top-k and ties: the largest digit with #{key >= it} >= goal; top-p: the smallest whose mass at or
        # below exceeds (1 - p) Z, and at least the set's largest (n_gt == n_above: no key of the set above
        # it). So the most likely token is always kept, also where p Z underflows; and a set entered because
        # its mass summed one way exceeded the goal still picks a digit where its masses summed another way
        # (its digits', from the next histogram) fall at or below it, a rounding point (no digit picked
        # would leave the set empty, the threshold below all of it and the kept mass short of it).
        pick_n = tl.max(tl.where((n_b > 0) & (n_gt + n_b >= goal_n), bucket, -1), 0)
        pick_p = tl.min(tl.where((n_b > 0) & ((s_le > goal_s) | (n_gt == n_above)), bucket, BUCKETS), 0)
        pick = tl.where(phase == 1, pick_p, pick_n)
        picked = bucket == pick
        n_pick = tl.sum(tl.where(picked, n_b, 0), 0)
        s_pick = tl.sum(tl.where(picked, s_b, 0.0), 0)
        n_above_new = tl.sum(tl.where(picked, n_gt, 0), 0)
        # the masses beside the picked digit, each summed directly (no difference of large sums)
        mass_above_new = mass_above + tl.sum(tl.where(bucket > pick, s_b, 0.0), 0)
        mass_below_new = mass_below + tl.sum(tl.where(bucket < pick, s_b, 0.0), 0)
        pick = tl.sum(tl.where(picked, bucket, 0), 0).to(tl.int64)  # 0 when none (a row past its searches)
        searching = phase < 3
        # The answer is found when the set holds one key (that key, with the set's count and masses), or
        # when the digit picked is the last one (the key is its digits).
        single = searching & (set_lo == set_hi)
        last = searching & ~single & (shift == 0)
        found = single | last
        flip = tl.where(phase == 2, 0, _INT32_MIN)
        answer = tl.where(single, set_lo, ((prefix | pick).to(tl.int32) ^ flip.to(tl.int32)).to(tl.int64))
        n = tl.where(single, tl.sum(n_b, 0), n_pick)
        s = tl.where(single, tl.sum(s_b, 0), s_pick)
        above = tl.where(single, mass_above, mass_above_new)
        below = tl.where(single, mass_below, mass_below_new)
        # Narrow (the search goes on) or end the phase.
        go_on = searching & ~found
        prefix = tl.where(go_on, prefix | (pick << shift), prefix)
        shift = tl.where(go_on, shift - 4, shift)
        n_above = tl.where(go_on, n_above_new, n_above)
        mass_above = tl.where(go_on, mass_above_new, mass_above)
        mass_below = tl.where(go_on, mass_below_new, mass_below)
        # top-k found: t_k = answer keeps the keys >= it, of mass Z_k; top-p (if on) searches above t_k.
        end_k = found & (phase == 0)
        z_k = above + s
        # top-p found: of the n tokens at t, the sort drops d (the lowest ids) while their mass stays
        # <= (1 - p) Z; d > 0 starts the search for the d-th lowest id among them.
        end_p = found & (phase == 1)
        each = s / tl.maximum(n, 1).to(tl.float32)
        spare = tl.where(end_p & (each > 0), (goal_s - below) / tl.where(each > 0, each, 1.0), 0.0)
        drop = tl.minimum(tl.maximum(tl.floor(spare).to(tl.int64), 0), n - 1)
        end_tie = found & (phase == 2)
        after_k = tl.full((), 3, tl.int64)  # top-k alone: done
        if TOP_P:
            after_k = tl.full((), 1, tl.int64)
        restart = (end_k & (after_k == 1)) | (end_p & (drop > 0))
        tie = tl.where(end_k | end_p, answer, tie)  # the threshold key so far
        floor = tl.where(end_k, answer, floor)
        goal_s = tl.where(end_k, -1.0, goal_s)  # top-p's first pass measures Z_k (``pending``)
        norm_out = tl.where(end_k, z_k, norm_out)  # top-k alone (top-p's end sets it otherwise)
        kept = (n - drop).to(tl.float32) / tl.maximum(n, 1).to(tl.float32)
        norm_out = tl.where(end_p, above + s * kept, norm_out)
        goal_n = tl.where(end_p, drop, goal_n)
        cut = tl.where(end_tie, ((1 << (id_shift + 4)) - 1) - answer + 1, cut)
        phase = tl.where(end_k, after_k, phase)
        phase = tl.where(end_p, tl.where(drop > 0, 2, 3), phase)
        phase = tl.where(end_tie, 3, phase)
        shift = tl.where(restart, tl.where(phase == 2, id_shift, 28), shift)
        prefix = tl.where(restart, 0, prefix)
        n_above = tl.where(restart, 0, n_above)
        mass_above = tl.where(restart, 0.0, mass_above)
        mass_below = tl.where(restart, 0.0, mass_below)
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
        tl.store(dst_f + _MASS_BELOW, mass_below)
        tl.store(dst_f + _GOAL_S, goal_s)
        tl.store(dst_f + _NORM_OUT, norm_out)
        tl.store(done_ptr + row, (phase == 3).to(tl.int32))
        if phase == 3:
            bits = tie.to(tl.int32)
            tl.store(row_t_ptr + row, (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True))
            tl.store(row_c_ptr + row, cut)
            tl.store(row_z_ptr + row, norm_out)
    if phase < 3:
        # Histogram the digit at ``shift`` of the keys matching ``prefix`` above it: the keys of z
        # (>= floor) with the sign bit flipped, so that the digits order as the keys; for the ties, the
        # keys id_max - id of the tokens at the threshold. A tile without such a key costs its read alone.
        ties = phase == 2
        # The mass per digit decides top-p, and top-k's Z_k when top-p does not follow; the id search (the
        # tokens at the threshold share their mass) and top-k before top-p count alone.
        need_mass = phase == 1
        if not TOP_P:
            need_mass = phase == 0
        flip = tl.where(ties, 0, _INT32_MIN)
        high = (~((tl.full((), 1, tl.int64) << (shift + 4)) - 1)).to(tl.int32)  # 0 when shift + 4 == 32
        want = prefix.to(tl.int32)
        id_max = ((1 << (id_shift + 4)) - 1).to(tl.int32)
        tie32 = tie.to(tl.int32)
        floor32 = floor.to(tl.int32)
        shift32 = shift.to(tl.int32)
        # What a later pass may still need (the candidates): every key from the set's smallest up (the set,
        # the keys above it, which top-p after top-k searches again, and the ties the id search reads), or,
        # in the id search, the ties alone.
        keep_from = tl.maximum((want ^ _INT32_MIN), floor32)
        bucket = tl.arange(0, BUCKETS)
        acc_n = tl.zeros((BUCKETS,), tl.int32)
        acc_s = tl.zeros((BUCKETS,), tl.float32)
        lo = tl.full((), _INT32_MAX, tl.int32)
        hi = tl.full((), _INT32_MIN, tl.int32)
        row_logits = logits_ptr + row * stride_logits
        begin = split * chunk
        # The first two passes read the whole chunk; the second and later ones keep the chunk's candidates in
        # its slots, in place (a tile's candidates go to slots at or before the tile's own, written after
        # the whole tile was read: the prefix sum that places them waits for every lane's load, which holds
        # while each element has one owner; a tile smaller than the warps' threads would be copied into
        # several warps with no barrier between them, so the launch takes at most block / 32 warps), and
        # later ones read those alone.
        slots = cand_ptr + row * splits * chunk + begin
        if FROM_CANDIDATES:
            reads = tl.load(count_ptr + row * splits + split)
        else:
            reads = (tl.minimum(begin + chunk, vocab) - begin).to(tl.int32)
        n_cand = tl.zeros((), tl.int32)
        for start in range(0, reads, BLOCK):
            pos = start + tl.arange(0, BLOCK)
            valid = pos < reads
            if FROM_CANDIDATES:
                ids = tl.load(slots + pos, mask=valid, other=0)
            else:
                ids = (begin + pos).to(tl.int32)
            z = load_z(row_logits, mask_ptr, ids, vocab, temperature, HAS_MASK)
            zkey = _key32(z)
            key = tl.where(ties, id_max - ids, zkey)
            u = key ^ flip
            chosen = valid & tl.where(ties, zkey == tie32, zkey >= floor32) & ((u & high) == want)
            if not FIRST:
                keep = valid & tl.where(ties, zkey == tie32, zkey >= keep_from)
                slot = n_cand + tl.cumsum(keep.to(tl.int32), 0) - 1
                tl.store(slots + slot, ids, mask=keep)
                n_cand += tl.sum(keep.to(tl.int32), 0)
            if tl.max(chosen.to(tl.int32), 0) > 0:
                digit = (u >> shift32) & (BUCKETS - 1)
                acc_n += tl.histogram(digit, BUCKETS, mask=chosen)
                tile_lo = tl.min(tl.where(chosen, key, _INT32_MAX), 0)
                tile_hi = tl.max(tl.where(chosen, key, _INT32_MIN), 0)
                if need_mass:
                    # One sum per digit value the tile holds (one bit each, OR-ed over the tile): a dense
                    # pass's tile holds a few of the 16 (the first digit, sign and top exponent bits: about
                    # 4 on logits within +-16, two of each sign).
                    held = tl.reduce(tl.where(chosen, 1 << digit, 0), 0, _bit_or)
                    w = tl.where(chosen, tl.exp(z - m), 0.0)
                    for b in tl.static_range(BUCKETS):
                        if ((held >> b) & 1) != 0:
                            acc_s += tl.where(bucket == b, tl.sum(tl.where(digit == b, w, 0.0), 0), 0.0)
                lo = tl.minimum(lo, tile_lo)
                hi = tl.maximum(hi, tile_hi)
        if not FIRST:
            tl.store(count_ptr + row * splits + split, n_cand)
        mine = (PARITY * rows + row) * splits + split
        tl.store(hist_n_ptr + mine * BUCKETS + bucket, acc_n)
        tl.store(hist_s_ptr + mine * BUCKETS + bucket, acc_s)
        tl.store(set_lo_ptr + mine, lo)
        tl.store(set_hi_ptr + mine, hi)


def _warps(block: int) -> int:
    """Warps of a pass over ``block``-wide tiles: ``PASS_WARPS``, or fewer where a tile would not give every
    thread an element of its own. ``_threshold_pass_kernel``'s in-place candidates need the threads that hold
    one element to stay in step: one thread, or copies within one warp (a tile under 32 elements), whose
    shuffles keep them together; never copies in several warps."""
    return max(1, min(PASS_WARPS, block // 32))


def _search_passes(top_k_on: bool, top_p_on: bool, vocab: int) -> tuple[int, int]:
    """(id_shift, passes): the id search's first digit and the most histogram passes the searches need
    (8 digits of a 32-bit key per search; the ids' digits for the tie cut)."""
    id_digits = max(1, triton.cdiv((vocab - 1).bit_length(), 4))
    return 4 * (id_digits - 1), 8 * top_k_on + (8 + id_digits) * top_p_on


def launch_thresholds(
    logits: torch.Tensor,  # rows of ``vocab`` logits, ``stride`` apart
    mask: torch.Tensor | None,  # [vocab] uint8
    stride: int,
    part_m: torch.Tensor,  # [rows, stats] fp32: the statistics pass's chunk max of z
    part_z: torch.Tensor,  # [rows, stats] fp32: its chunk sum of exp(z - chunk max)
    rows: int,
    vocab: int,
    temperature: float,
    top_k: int,
    top_p: float,
    block: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # row_z fp32, row_t fp32, row_c int64, all [rows]
    """The top-k/top-p threshold of each row (module docstring): a fixed number of pass launches over a
    ``[rows, splits]`` grid of ``block``-wide tiles (no host sync); a row whose searches ended early
    returns at once in the remaining passes."""
    device = logits.device
    stats = part_m.shape[1]
    chunk, splits = chunking(vocab, rows, block, device, per_sm=PROGRAMS_PER_SM)
    top_k_on, top_p_on = 0 < top_k < vocab, top_p < 1.0
    id_shift, passes = _search_passes(top_k_on, top_p_on, vocab)
    state_i = torch.empty(2, rows, _NI.value, dtype=torch.int64, device=device)
    state_f = torch.empty(2, rows, _NF.value, dtype=torch.float32, device=device)
    hist_n = torch.empty(2, rows, splits, _BUCKETS, dtype=torch.int32, device=device)
    hist_s = torch.empty(2, rows, splits, _BUCKETS, dtype=torch.float32, device=device)
    set_lo, set_hi = (torch.empty(2, rows, splits, dtype=torch.int32, device=device) for _ in range(2))
    candidates = torch.empty(rows, splits * chunk, dtype=torch.int32, device=device)
    counts = torch.empty(rows, splits, dtype=torch.int32, device=device)
    done = torch.empty(rows, dtype=torch.int32, device=device)
    row_z = torch.empty(rows, dtype=torch.float32, device=device)
    row_t = torch.empty(rows, dtype=torch.float32, device=device)
    row_c = torch.empty(rows, dtype=torch.int64, device=device)
    mask_arg = logits if mask is None else mask
    for step in range(passes + 1):  # the last launch only reads the last histograms
        _threshold_pass_kernel[(rows, splits)](
            logits, mask_arg, part_m, part_z, state_i, state_f, hist_n, hist_s, set_lo, set_hi, candidates,
            counts, done, row_z, row_t, row_c, rows, vocab, stride, temperature, top_k, 1.0 - top_p, stats,
            chunk, splits, id_shift, STATS_P2=triton.next_power_of_2(stats),
            SPLITS_P2=triton.next_power_of_2(splits), TOP_K=top_k_on, TOP_P=top_p_on, HAS_MASK=mask is not None,
            FIRST=step == 0, FROM_CANDIDATES=step >= 2, PARITY=step % 2, BLOCK=block, BUCKETS=_BUCKETS,
            num_warps=_warps(block), maxnreg=None if step == 0 else PASS_MAXNREG,
        )  # fmt: skip
    return row_z, row_t, row_c
