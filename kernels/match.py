"""Verification by exact match: lossless for any proposal, whatever probabilities it was drafted with.

For a row with drafted target tokens ``y_1..y_k`` and the target's distributions ``p_1..p_{k+1}``
(after temperature/top-k/top-p: the distributions sampled from; one-hot at the argmax when greedy):

    z_j      ~ p_j                                     one draw per position, independent
    accepted = y_j while z_j == y_j                    stop at the first mismatch j*
    output   = y_1..y_{j*-1}, z_j*                     (z_{k+1}, the bonus, when all k matched)

Every emitted token is a draw from ``p`` given the tokens before it, so the output follows the target
exactly for *any* proposal. The engine verifies this way where the proposal's probabilities are not
exact (``translation="exact"``, after n-gram merges), where there are none (prompt lookup's drafts), and
for every greedy request without a deferral rule (greedy speculative sampling accepts exactly the
drafts equal to the argmax, so it is this rule, with no ``q`` to keep). ``verify.py``'s speculative
sampling accepts more when sampling and ``q`` is known; this rule needs no ``q`` at all. A position with
nothing proposed (``y_j = -1``) never matches.

Draws use the exponential race, ``z_j = argmax_v p_j(v) / E_v`` with ``E ~ Exp(1)`` passed in, so both
implementations draw the same tokens from the same noise. The reference also returns ``p_j(y_j)`` (0
where nothing was proposed; ``[z_j == y_j]`` when greedy), the probability the target gave each draft.

The Triton kernel (``match_triton``) reads the logits once when greedy, twice when sampling (plus the
threshold passes' re-reads with top-k/top-p):

1. ``target_stats.py``'s statistics pass (grid ``[batch (k+1), splits]``): per vocabulary chunk, the online
   softmax at ``T`` (or the first argmax when greedy), the ``T = 1`` max and the NaN/+inf count; with
   top-k/top-p, ``thresholds.py``'s threshold passes on those partials.
2. ``_race_kernel`` (same grid; sampling only): each chunk's winner of ``p / E``, first id on ties.
3. ``_match_kernel`` (one program per row): the winners over the chunks at all ``k+1`` positions at once,
   the match scan, the output tokens, ``p_j(y_j)`` from one logit each, and the invalid flags (positions
   whose logits hold a NaN/+inf or are all -inf).

Greedy rows skip step 2: the argmax partials of step 1 are the draws.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rows import race_step, row_max_sum
from .sampling import nonfinite_rows_reference, sampling_probs_reference
from .target_stats import combine_partials, target_prob, target_stats
from .verify import join_output

__all__ = ["match_reference", "match_triton"]


def match_reference(
    target_logits: torch.Tensor,  # [batch, k+1, V_t]
    draft_ids: torch.Tensor,  # [batch, k] int64 target ids, -1 where nothing was proposed
    noise: torch.Tensor | None,  # [batch, k+1, V_t] fp32 Exp(1); unused when greedy
    temperature: float,
    top_k: int,
    top_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``num_accepted`` [batch], ``output_tokens`` [batch, k+1] (-1 padded), ``target_probs``
    [batch, k] (``p_j(y_j)``) and ``invalid`` [batch, k+1] (positions with unusable target logits)."""
    k = draft_ids.shape[1]
    invalid = nonfinite_rows_reference(target_logits)
    if temperature == 0.0:  # p is one-hot at the argmax: one read of the logits
        z = target_logits.argmax(-1)  # [batch, k+1]
        target_probs = (z[:, :k] == draft_ids).float()
    else:
        p = sampling_probs_reference(target_logits, temperature, top_k, top_p)  # [batch, k+1, V_t]
        proposed = draft_ids >= 0
        target_probs = torch.where(
            proposed, p[:, :k].gather(-1, draft_ids.clamp_min(0)[..., None])[..., 0], 0.0
        )
        z = (p / noise).argmax(-1)  # [batch, k+1] draws from p
    num_accepted = (z[:, :k] == draft_ids).cumprod(-1).sum(-1)  # bool cumprod: int64
    final = z.gather(1, num_accepted[:, None])[:, 0]
    return num_accepted, join_output(draft_ids, num_accepted, final), target_probs, invalid


# ---------------------------------------------------------------------------------------------- Triton


@triton.jit
def _race_kernel(
    logits_ptr,  # [batch, k+1, vocab] fp32/bf16/fp16
    noise_ptr,  # [batch, k+1, vocab] fp32 Exp(1)
    part_m_ptr,  # [batch * (k+1), splits] fp32: chunk max of z = logits / T
    part_z_ptr,  # [batch * (k+1), splits] fp32: sum of exp(z - chunk max)
    row_z_ptr,  # [batch * (k+1)] fp32 (FILTERED): the kept set's normaliser
    row_t_ptr,  # [batch * (k+1)] fp32 (FILTERED): the threshold on z
    row_c_ptr,  # [batch * (k+1)] int64 (FILTERED): the first kept id at the threshold
    win_val_ptr,  # [batch * (k+1), splits] fp32 out: the chunk's best p / E
    win_id_ptr,  # [batch * (k+1), splits] int64 out: its id
    vocab,
    width,
    stride_lb,
    stride_lj,
    stride_nb,
    stride_nj,
    temperature,
    chunk,
    SPLITS_P2: tl.constexpr,
    FILTERED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    b, j = row // width, row % width
    row_logits = logits_ptr + b * stride_lb + j * stride_lj
    row_noise = noise_ptr + b * stride_nb + j * stride_nj
    m, norm = row_max_sum(part_m_ptr, part_z_ptr, row, splits, SPLITS_P2)
    t = m  # unused unless FILTERED
    cut = row  # unused unless FILTERED
    if FILTERED:
        norm = tl.load(row_z_ptr + row)
        t = tl.load(row_t_ptr + row)
        cut = tl.load(row_c_ptr + row)
    begin = split * chunk
    end = tl.minimum(begin + chunk, vocab)
    best = tl.full((), -1.0, tl.float32)
    best_id = begin.to(tl.int64)
    for start in range(begin, end, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < end
        x = tl.load(row_logits + offs, mask=inside, other=float("-inf")).to(tl.float32)
        p = target_prob(x, offs, inside, m, norm, t, cut, temperature, False, FILTERED)
        noise = tl.load(row_noise + offs, mask=inside, other=1.0)
        race = tl.where(inside & (p == p), p / noise, -1.0)  # NaN only in invalid rows: no NaN winners
        best, best_id = race_step(best, best_id, race, start)
    tl.store(win_val_ptr + row * splits + split, best)
    tl.store(win_id_ptr + row * splits + split, best_id)


@triton.jit
def _match_kernel(
    logits_ptr,  # [batch, k+1, vocab]
    draft_ids_ptr,  # [batch, k] int64 target ids
    part_m1_ptr,  # [batch * (k+1), splits] fp32: chunk max at T = 1
    part_bad_ptr,  # [batch * (k+1), splits] int32: NaN/+inf count
    part_m_ptr,  # [batch * (k+1), splits] fp32
    part_aux_ptr,  # [batch * (k+1), splits] fp32 normaliser partials, or int64 argmax (GREEDY)
    row_z_ptr,  # [batch * (k+1)] fp32 (FILTERED)
    row_t_ptr,  # [batch * (k+1)] fp32 (FILTERED)
    row_c_ptr,  # [batch * (k+1)] int64 (FILTERED)
    win_val_ptr,  # [batch * (k+1), splits] fp32 (not GREEDY)
    win_id_ptr,  # [batch * (k+1), splits] int64 (not GREEDY)
    num_accepted_ptr,  # [batch] int64 out
    output_ptr,  # [batch, k+1] int64 out
    target_probs_ptr,  # [batch, k] fp32 out
    invalid_ptr,  # [batch, k+1] uint8 out
    k,
    stride_lb,
    stride_lj,
    temperature,
    splits,
    W_P2: tl.constexpr,
    SPLITS_P2: tl.constexpr,
    GREEDY: tl.constexpr,
    FILTERED: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, W_P2)
    valid = j <= k
    rows = b * (k + 1) + j
    s = tl.arange(0, SPLITS_P2)
    offs = rows[:, None] * splits + s[None, :]
    mask = valid[:, None] & (s < splits)[None, :]
    m, aux = combine_partials(part_m_ptr, part_aux_ptr, rows, valid, splits, SPLITS_P2, GREEDY)
    if GREEDY:
        z = aux  # the first argmax
    else:
        val = tl.load(win_val_ptr + offs, mask=mask, other=float("-inf"))
        win = tl.load(win_id_ptr + offs, mask=mask, other=0)
        first = tl.min(
            tl.where(val == tl.max(val, 1)[:, None], s[None, :], SPLITS_P2), 1
        )  # first chunk wins ties
        z = tl.sum(tl.where(s[None, :] == first[:, None], win, 0), 1)
    drafted = j < k
    y = tl.load(draft_ids_ptr + b * k + j, mask=drafted, other=-1)
    num = tl.min(tl.where(drafted & (z != y), j, k), 0)
    final = tl.sum(tl.where(j == num, z, 0), 0)
    tl.store(num_accepted_ptr + b, num)
    tl.store(output_ptr + b * (k + 1) + j, tl.where(j < num, y, tl.where(j == num, final, -1)), mask=valid)
    # p_j(y_j), from the one logit of each draft.
    proposed = drafted & (y >= 0)
    x = tl.load(logits_ptr + b * stride_lb + j * stride_lj + tl.maximum(y, 0), mask=proposed, other=0.0)
    thr = m  # unused unless FILTERED
    cut = y  # unused unless FILTERED
    if FILTERED:
        aux = tl.load(row_z_ptr + rows, mask=valid, other=1.0)
        thr = tl.load(row_t_ptr + rows, mask=valid, other=0.0)
        cut = tl.load(row_c_ptr + rows, mask=valid, other=0)
    p_y = target_prob(x.to(tl.float32), y, proposed, m, aux, thr, cut, temperature, GREEDY, FILTERED)
    tl.store(target_probs_ptr + b * k + j, p_y, mask=drafted)
    bad = tl.sum(tl.load(part_bad_ptr + offs, mask=mask, other=0), 1) > 0
    empty = tl.max(tl.load(part_m1_ptr + offs, mask=mask, other=float("-inf")), 1) == float("-inf")
    tl.store(invalid_ptr + b * (k + 1) + j, (bad | empty).to(tl.uint8), mask=valid)


def match_triton(
    target_logits: torch.Tensor,  # [batch, k+1, V_t] fp32/bf16/fp16
    draft_ids: torch.Tensor,  # [batch, k] int64 target ids, -1 where nothing was proposed
    noise: torch.Tensor | None,  # [batch, k+1, V_t] fp32 Exp(1); unused when greedy
    temperature: float,
    top_k: int,
    top_p: float,
    *,
    block: int = 2048,  # the fastest tile at the goal shapes on an H200 (benchmarks/TUNING.md)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``match_reference`` in Triton (module docstring); ``block`` is the tile of the vocabulary."""
    batch, width, vocab = target_logits.shape
    k = width - 1
    device = target_logits.device
    greedy = temperature == 0.0
    draft_ids = draft_ids.contiguous()
    if not greedy and noise.stride(-1) != 1:
        noise = noise.contiguous()
    num_accepted = torch.empty(batch, dtype=torch.int64, device=device)
    output_tokens = torch.empty(batch, width, dtype=torch.int64, device=device)
    target_probs = torch.empty(batch, k, dtype=torch.float32, device=device)
    invalid = torch.empty(batch, width, dtype=torch.uint8, device=device)
    if batch == 0:
        return num_accepted, output_tokens, target_probs, invalid.view(torch.bool)
    stats = target_stats(target_logits, temperature, top_k, top_p, block)
    target_logits, splits = stats.logits, stats.splits
    splits_p2 = triton.next_power_of_2(splits)
    stride_lb, stride_lj = target_logits.stride(0), target_logits.stride(1)
    thresholds = (stats.row_z, stats.row_t, stats.row_c)
    win_val, win_id = stats.part_m, stats.part_aux  # unused when greedy
    if not greedy:
        win_val = torch.empty(batch * width, splits, dtype=torch.float32, device=device)
        win_id = torch.empty(batch * width, splits, dtype=torch.int64, device=device)
        _race_kernel[(batch * width, splits)](
            target_logits, noise, stats.part_m, stats.part_aux, *thresholds, win_val, win_id, vocab, width,
            stride_lb, stride_lj, noise.stride(0), noise.stride(1), temperature, stats.chunk, SPLITS_P2=splits_p2,
            FILTERED=stats.filtered, BLOCK=block,
        )  # fmt: skip
    _match_kernel[(batch,)](
        target_logits, draft_ids, stats.part_m1, stats.part_bad, stats.part_m, stats.part_aux, *thresholds,
        win_val, win_id, num_accepted, output_tokens, target_probs, invalid, k, stride_lb, stride_lj,
        1.0 if greedy else temperature, splits, W_P2=triton.next_power_of_2(width), SPLITS_P2=splits_p2,
        GREEDY=greedy, FILTERED=stats.filtered,
    )  # fmt: skip
    return num_accepted, output_tokens, target_probs, invalid.view(torch.bool)
