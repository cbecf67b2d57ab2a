"""Drafter sampling: the distribution actually sampled from, and one draw from it.

Maths (speculative sampling, Leviathan et al. 2023, arXiv 2211.17192; the
filters follow transformers' logits warpers so that "top-k/top-p applied to both
models as the papers do" means exactly what ``model.generate`` samples from):

    z      = logits / T, and -inf where ``mask`` is False   (T >= MIN_TEMPERATURE, 1e-30: below it
                                                            fp32 logits / T overflow where |logits| > 3.4e8)
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
A caller that reads only the ids (``probs=False``) gets no ``q``: no ``[rows, vocab]`` buffer is
allocated or written, and greedy is then the argmax alone.

The kept set is a threshold: ``{v : z_v > t} ∪ {v : z_v == t, v >= c}``. With
``m = max z``, ``w_v = exp(z_v - m)`` and ``Z_k`` the mass of the top-k set,
``t_k`` is the largest ``x`` with ``#{z >= x} >= k``; top-p keeps ``v`` iff
``sum_{u: z_u <= z_v} w_u > (1 - top_p) Z_k`` (tie-inclusive), and always the largest ``z``, which gives
``t``; of the group ``z == t`` the sort then drops the ``d`` tokens (the kernel: the ``d``
lowest ids) whose cumulative mass, one tie at a time, stays <= ``(1 - top_p) Z_k``
(``c`` is the id after the d-th). ``q_v = w_v / Z`` on the kept set, ``Z`` its mass.
The reference decides top-p as transformers does, on an fp32 cumulative sum in sorted order; the kernel
sums the same masses upwards from the smallest, in another order, against ``1 - top_p`` in fp32 (so a
``top_p`` within rounding of 1 keeps the tail, and one whose ``top_p Z`` underflows keeps the most likely
token, as transformers' do). Where the boundary falls exactly
on a rounding point the two can keep one token more or less (10 equal logits at ``top_p = 0.1``:
transformers keeps 2 of them, the kernel 1); away from such points they keep the same set.

The Triton kernel (``sample_triton``) splits each row over ``splits`` programs
(grid ``[rows, splits]``, chunks of whole tiles, ``rows.chunking``) and runs in passes
over the vocabulary:

1. ``_stats_kernel``: an online softmax per chunk (running max, rescaled sum);
   greedy instead finds the chunk's argmax (and writes the zero probabilities, unless ids only).
2. top-k/top-p only: ``thresholds.launch_thresholds``, the exact search for ``t``
   and ``c`` in a fixed number of passes over a grid of its own (no host sync).
3. ``_probs_kernel``: writes ``q`` (unless ids only) and each chunk's race winner
   (reads the logits again, mostly from L2, and the noise).
4. ``_finish_kernel`` (one program per row): the first winner over the chunks;
   greedy writes the 1 of the one-hot row (unless ids only).

So greedy is one read of the logits plus the write of ``q``; temperature
sampling reads the logits twice, the noise once and writes ``q``; ids only, neither
writes ``q`` (greedy is then one read of the logits and nothing more); the filters
add up to 8 + 8 + ceil(log16 V) + 1 launches over a grid of their own, of which
two read the whole logits (mostly from L2), the next ones only the candidates
left (``thresholds.py``), and those after a row's searches end return at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .host import eager_cpu
from .rows import chunking, load_z, race_step, row_max_sum
from .thresholds import launch_thresholds

__all__ = [
    "MIN_TEMPERATURE",
    "nonfinite_rows_reference",
    "sample_reference",
    "sample_triton",
    "sampling_probs_reference",
]

# The smallest sampling temperature taken: z = logits / T stays finite in fp32 for |logits| up to 3.4e8
# (at T = 1e-45 every logit overflows, and softmax(z) is NaN).
MIN_TEMPERATURE = 1e-30
# Registers a thread of a filtered probability pass may take (ptxas's ``maxnreg``; None: no cap): 96 keeps
# five 4-warp programs on an SM, so that its grid runs in one wave (uncapped, those variants take up to 128
# on Triton 3.6, four programs an SM: 576 programs over 528 places; benchmarks/TUNING.md, "Occupancy"). The
# unfiltered variants (56-90) go uncapped: a cap lets ptxas take more, up to it (the ids alone 56 -> 80).
PROBS_MAXNREG = 96


def sampling_probs_reference(
    logits: torch.Tensor,  # [rows, vocab]
    temperature: float,
    top_k: int,
    top_p: float,
    mask: torch.Tensor | None = None,  # [vocab] bool, True = allowed
) -> torch.Tensor:  # [rows, vocab] fp32
    """The normalised distribution sampled from: mask, temperature, top-k, top-p (one-hot if T == 0)."""
    if temperature == 0.0:
        return _greedy(logits, mask)[1]
    z = logits.float()
    if mask is not None:
        z = z.masked_fill(~mask, float("-inf"))
    if temperature != 1.0:  # z / 1 is z: an op less at T = 1 (z is only read from here on)
        z = z / temperature
    if 0 < top_k < z.shape[-1]:
        z = z.masked_fill(z < _kth_largest(z, top_k), float("-inf"))
    if top_p < 1.0:
        z = _top_p(z, top_p)
    return z.softmax(-1)


def _greedy(logits: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first argmax of the fp32 logits ([..., 1] int64) and the one-hot ``q`` there, so that a draw needs
    no second argmax, over the one-hot. (bf16/fp16 logits are converted first, though exactly and so to the
    same argmax: torch's CPU argmax of half types is slower than the conversion and an fp32 argmax.)"""
    z = _masked(logits, mask)
    ids = z.argmax(-1, keepdim=True)
    # scatter, not one_hot: one_hot checks its indices on the host
    return ids, torch.zeros_like(z).scatter_(-1, ids, 1.0)


def _masked(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The fp32 logits, -inf where ``mask`` is False: what greedy takes the first argmax of."""
    z = logits.float()
    return z if mask is None else z.masked_fill(~mask, float("-inf"))


def _kth_largest(z: torch.Tensor, k: int) -> torch.Tensor:  # [..., vocab] -> [..., 1]
    """The ``k``-th largest value of each row, ties counted: torch.topk's last value, which numpy's partition
    finds ~8x faster on the CPU (a value, so the same one; -0.0 and +0.0 compare equal)."""
    if eager_cpu(z):
        partitioned = z.detach().clone()
        partitioned.numpy().partition(z.shape[-1] - k, -1)
        return partitioned[..., z.shape[-1] - k, None]
    return torch.topk(z, k, dim=-1).values[..., -1:]


def _top_p(z: torch.Tensor, top_p: float) -> torch.Tensor:
    """``z`` with -inf where top-p drops a token (module docstring): as transformers' ``TopPLogitsWarper``."""
    if not (eager_cpu(z) and z.is_contiguous()):
        return z.masked_fill(_sort_drop(z, top_p), float("-inf"))
    # The same set without torch.sort, which sorts (value, index) pairs ~20x slower than numpy sorts values on
    # the CPU (~0.9 ms for 5 rows of 3072 ids). numpy's ascending values are torch.sort's (up to the order of
    # -0.0 and +0.0, of equal mass), so ``drop_sorted`` is the sort's, bit for bit. Where it marks exactly the
    # positions of the values below the first kept value, the sort drops exactly the tokens below that value,
    # whatever its order among equal values. In the other rows equal logits straddle the boundary (which of
    # them go is torch.sort's order), or the sums did not only grow: those rows are sorted (torch.sort orders
    # each row on its own, so as it orders them among all the rows).
    sorted_z = z.detach().clone()
    sorted_z.numpy().sort(-1)
    drop_sorted = _drop_sorted(sorted_z, top_p)
    first_kept = sorted_z.gather(-1, drop_sorted.sum(-1, keepdim=True))  # the last is kept: an index < vocab
    below = sorted_z < first_kept
    drop = z < first_kept
    if not torch.equal(drop_sorted, below):
        undecided = (drop_sorted != below).any(-1)
        drop[undecided] = _sort_drop(z[undecided], top_p)
    return z.masked_fill(drop, float("-inf"))


def _sort_drop(z: torch.Tensor, top_p: float) -> torch.Tensor:  # [..., vocab] -> bool, True = dropped
    """Top-p's dropped tokens by a full torch.sort, as transformers' ``TopPLogitsWarper`` finds them."""
    sorted_z, order = torch.sort(z, dim=-1, descending=False)
    drop_sorted = _drop_sorted(sorted_z, top_p)
    return drop_sorted.scatter(-1, order, drop_sorted)


def _drop_sorted(sorted_z: torch.Tensor, top_p: float) -> torch.Tensor:  # [..., vocab] ascending -> bool
    """Top-p's dropped positions of ascending ``sorted_z``: an fp32 cumulative mass <= 1 - top_p, never the last."""
    cumulative = sorted_z.softmax(-1).cumsum(-1)
    drop_sorted = cumulative <= 1 - top_p
    drop_sorted[..., -1] = False
    return drop_sorted


def sample_reference(
    logits: torch.Tensor,  # [rows, vocab]
    noise: torch.Tensor | None,  # [rows, vocab] Exp(1) draws; unused when greedy
    temperature: float,
    top_k: int,
    top_p: float,
    mask: torch.Tensor | None = None,  # [vocab] bool, True = allowed
    *,
    probs: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # ids [rows] int64, probs [rows, vocab] fp32 (None: ids only)
    """Sample one token per row from ``sampling_probs_reference``; returns the ids and the distribution
    (None with ``probs=False``: greedy is then the argmax alone, no one-hot built)."""
    if temperature == 0.0:
        if not probs:
            return _masked(logits, mask).argmax(-1), None
        # the argmax the one-hot is built at (the one-hot's own argmax, without a re-read)
        ids, q = _greedy(logits, mask)
        return ids[..., 0], q
    q = sampling_probs_reference(logits, temperature, top_k, top_p, mask)
    return (q / noise).argmax(-1), q if probs else None


def nonfinite_rows_reference(logits: torch.Tensor) -> torch.Tensor:  # logits [..., vocab] -> [...] bool
    """Rows a sampler cannot use: any NaN or +inf, or every entry -inf."""
    if logits.shape[-1] == 0:  # all of nothing is -inf
        return torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)
    # The row's max is NaN where it holds a NaN (max propagates it), else +inf where it holds a +inf, and -inf
    # where every entry is -inf: one reduction instead of three. Then m - m is 0 exactly where m is finite (NaN
    # at an infinity or a NaN): two ops, where ``isfinite`` is four and its negation a fifth.
    m = logits.amax(-1)
    return (m - m) != 0


# ---------------------------------------------------------------------------------------------- Triton


@triton.jit
def _stats_kernel(
    logits_ptr,  # [rows, vocab] fp32/bf16/fp16
    mask_ptr,  # [vocab] uint8 (HAS_MASK)
    probs_ptr,  # [rows, vocab] fp32, zeroed here when WRITE_PROBS (GREEDY only)
    part_m_ptr,  # [rows, splits] fp32: chunk max
    part_aux_ptr,  # [rows, splits]: sum of exp(z - chunk max) fp32, or the chunk argmax int64 (GREEDY)
    vocab,
    stride_logits,
    stride_probs,
    temperature,
    chunk,
    GREEDY: tl.constexpr,
    WRITE_PROBS: tl.constexpr,
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
            z = load_z(row_logits, mask_ptr, offs, vocab, temperature, HAS_MASK)
            if WRITE_PROBS:
                tl.store(
                    probs_ptr + row * stride_probs + offs, tl.zeros((BLOCK,), tl.float32), mask=offs < end
                )
            block_m = tl.max(z, 0)
            best = tl.where(block_m > m, start + tl.argmax(z, 0).to(tl.int64), best)
            m = tl.maximum(m, block_m)
        tl.store(part_aux_ptr + row * splits + split, best)
    else:
        total = tl.zeros((), tl.float32)
        for start in range(begin, end, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            z = load_z(row_logits, mask_ptr, offs, vocab, temperature, HAS_MASK)
            new_m = tl.maximum(m, tl.max(z, 0))
            safe_m = tl.where(new_m == float("-inf"), 0.0, new_m)
            total = total * tl.exp(m - safe_m) + tl.sum(tl.exp(z - safe_m), 0)
            m = new_m
        tl.store(part_aux_ptr + row * splits + split, total)
    tl.store(part_m_ptr + row * splits + split, m)


@triton.jit
def _probs_kernel(
    logits_ptr,  # [rows, vocab]
    mask_ptr,  # [vocab] uint8 (HAS_MASK)
    noise_ptr,  # [rows, vocab] fp32 Exp(1)
    probs_ptr,  # [rows, vocab] fp32 out (WRITE_PROBS)
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
    WRITE_PROBS: tl.constexpr,
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
        z = load_z(row_logits, mask_ptr, offs, vocab, temperature, HAS_MASK)
        q = tl.exp(z - m) * inv_norm
        if FILTERED:
            q = tl.where((z > t) | ((z == t) & (offs >= cut)), q, 0.0)
        if WRITE_PROBS:
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


def sample_triton(
    logits: torch.Tensor,  # [rows, vocab] fp32/bf16/fp16
    noise: torch.Tensor | None,  # [rows, vocab] fp32 Exp(1) draws; unused when greedy
    temperature: float,
    top_k: int,
    top_p: float,
    mask: torch.Tensor | None = None,  # [vocab] bool, True = allowed
    *,
    probs: bool = True,
    block: int = 2048,  # the fastest tile at the goal shapes on an H200 (benchmarks/TUNING.md)
) -> tuple[torch.Tensor, torch.Tensor | None]:  # ids [rows] int64, probs [rows, vocab] fp32 (None: ids only)
    """``sample_reference`` in Triton (see the module docstring); ``block`` is the tile of the vocabulary.
    With ``probs=False`` no distribution is allocated or written (the kernels' ``WRITE_PROBS``/``ONE_HOT``
    off) and None is returned for it."""
    rows, vocab = logits.shape
    device = logits.device
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    greedy = temperature == 0.0
    if not greedy and noise.stride(-1) != 1:
        noise = noise.contiguous()
    q = torch.empty(rows, vocab, dtype=torch.float32, device=device) if probs else None
    ids = torch.empty(rows, dtype=torch.int64, device=device)
    if rows == 0:
        return ids, q
    chunk, splits = chunking(vocab, rows, block, device)
    splits_p2 = triton.next_power_of_2(splits)
    has_mask = mask is not None
    mask_arg = mask.contiguous().view(torch.uint8) if has_mask else logits
    grid = (rows, splits)
    q_arg, stride_q = (q, q.stride(0)) if probs else (ids, 0)  # not written to unless WRITE_PROBS

    part_m = torch.empty(rows, splits, dtype=torch.float32, device=device)
    part_aux = torch.empty(rows, splits, dtype=torch.int64 if greedy else torch.float32, device=device)
    _stats_kernel[grid](
        logits, mask_arg, q_arg, part_m, part_aux, vocab, logits.stride(0), stride_q,
        1.0 if greedy else temperature, chunk, GREEDY=greedy, WRITE_PROBS=greedy and probs, HAS_MASK=has_mask,
        BLOCK=block,
    )  # fmt: skip
    if greedy:
        _finish_kernel[(rows,)](part_m, part_aux, ids, q_arg, stride_q, splits, splits_p2, ONE_HOT=probs)
        return ids, q

    top_k_on = 0 < top_k < vocab
    filtered = top_k_on or top_p < 1.0
    row_z = row_t = row_c = part_aux  # unused unless filtered
    if filtered:
        row_z, row_t, row_c = launch_thresholds(
            logits, mask_arg if has_mask else None, logits.stride(0), part_m, part_aux, rows, vocab, temperature,
            top_k, top_p, block,
        )  # fmt: skip
    win_val = torch.empty(rows, splits, dtype=torch.float32, device=device)
    win_id = torch.empty(rows, splits, dtype=torch.int64, device=device)
    _probs_kernel[grid](
        logits, mask_arg, noise, q_arg, part_m, part_aux, row_z, row_t, row_c, win_val, win_id, vocab,
        logits.stride(0), noise.stride(0), stride_q, temperature, chunk, splits, splits_p2,
        FILTERED=filtered, WRITE_PROBS=probs, HAS_MASK=has_mask, BLOCK=block,
        maxnreg=PROBS_MAXNREG if filtered else None,
    )  # fmt: skip
    _finish_kernel[(rows,)](win_val, win_id, ids, q_arg, stride_q, splits, splits_p2, ONE_HOT=False)
    return ids, q
