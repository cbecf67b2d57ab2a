"""Translate a drafted block from the drafter's vocabulary into the target's (direct map; SPEC §2.1, §2.3).

For a row with drafter tokens ``y_1..y_k`` drawn from ``q_1..q_k`` over ``V_d``, and the direct map
``d2t`` (``-1`` where a drafter token has no target token with the same bytes):

    x_j        = d2t[y_j]                                 target id proposed at position j
    m          = the number of leading positions with x_j >= 0 (the draft stops at the first
                 drafter token that does not map)
    q'_j(t)    = sum_{d : d2t[d] = t} q_j(d)   for j < m    proposal probability in the target vocabulary
    q'_j       = 0                             for j >= m   (nothing proposed there)
    span_end_j = j + 1                                    drafter tokens consumed by target positions 1..j+1

Several drafter ids may share one target id (``▁`` and ``<0x20>``), hence the sum. With the drafter's
unmappable ids masked out before sampling (token-level intersection, TLI), every ``q_j`` lives on
mappable ids, ``m = k`` and ``q'_j`` is a normalised distribution, so exact speculative sampling
against ``q'`` is lossless.
"""

from __future__ import annotations

import torch

from .ngram import ngram_lookup_reference

__all__ = ["translate_ngram_reference", "translate_reference"]


def translate_reference(
    draft_ids: torch.Tensor,  # [batch, k] int64 drafter ids
    draft_probs: torch.Tensor | None,  # [batch, k, V_d] fp32, or None when no probabilities are needed
    d2t: torch.Tensor,  # [V_d] int32
    target_vocab_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Returns target ids [batch, k] (-1 from position m on), lengths m [batch], q' [batch, k, V_t] fp32
    (None if ``draft_probs`` is None) and span ends [batch, k] int64."""
    batch, k = draft_ids.shape
    mapped = d2t[draft_ids].long()  # [batch, k]
    proposed = (mapped >= 0).long().cumprod(-1).bool()  # leading mappable positions
    lengths = proposed.sum(-1)
    target_ids = torch.where(proposed, mapped, -1)
    span_end = torch.arange(1, k + 1, device=draft_ids.device).expand(batch, k)
    if draft_probs is None:
        return target_ids, lengths, None, span_end
    index = d2t.long().clamp_min(0).expand(batch, k, -1)  # [batch, k, V_d]
    mass = draft_probs * (d2t >= 0)  # unmappable drafter ids carry no target mass
    target_probs = draft_probs.new_zeros(batch, k, target_vocab_size).scatter_add_(2, index, mass)
    target_probs *= proposed[..., None]
    return target_ids, lengths, target_probs, span_end


def translate_ngram_reference(
    draft_ids: torch.Tensor,  # [batch, k] int64 drafter ids
    draft_probs: torch.Tensor | None,  # [batch, k, V_d] fp32, or None
    d2t: torch.Tensor,  # [V_d] int32
    target_vocab_size: int,
    key_ids: torch.Tensor,  # [C, N] int32  n-gram table (kernels/ngram.py)
    values: torch.Tensor,  # [C] int32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Direct map plus longest-match n-gram merges, with OmniDraft's probability redistribution.

    Scanning the drafted run left to right, the longest run ``y_i..y_{i+n-1}`` (2 <= n <= N) found in
    the table becomes one target token ``t_ng``; otherwise ``y_i`` maps through ``d2t``; the first token
    that does neither ends the draft. For target position ``j`` starting at drafter position ``i``:

        q'_j          = the direct-mapped q_i (as in ``translate_reference``)
        q'_j(t_ng)    = prod_{u=i}^{i+n-1} q_u(y_u)           if position j is a merge
        q'_j(d2t[y_i]) -= q'_j(t_ng)                            (when y_i maps directly)

    (SPEC §2.3: the paper's approximation; exact only where nothing merges.) Returns target ids
    [batch, k] (-1 padded), lengths [batch], q' [batch, k, V_t] (None without ``draft_probs``) and span
    ends [batch, k] (drafter tokens consumed by target positions 1..j+1).
    """
    batch, k = draft_ids.shape
    n_max = key_ids.shape[1]
    device = draft_ids.device
    mapped = d2t[draft_ids].long()  # [batch, k]

    # Longest table match starting at each drafter position: one batched lookup of every (start, n).
    longest = torch.zeros(batch, k, dtype=torch.int64, device=device)
    merged = torch.full((batch, k), -1, dtype=torch.int64, device=device)
    for n in range(2, min(n_max, k) + 1):
        starts = k - n + 1
        windows = draft_ids.unfold(1, n, 1)  # [batch, starts, n]
        queries = torch.nn.functional.pad(windows, (0, n_max - n), value=-1).reshape(-1, n_max)
        found = ngram_lookup_reference(key_ids, values, queries).view(batch, starts)
        hit = found >= 0
        longest[:, :starts] = torch.where(hit, n, longest[:, :starts])
        merged[:, :starts] = torch.where(hit, found, merged[:, :starts])

    # Left-to-right scan, all rows at once: k steps over fixed shapes.
    target_ids = torch.full((batch, k), -1, dtype=torch.int64, device=device)
    source = torch.zeros(batch, k, dtype=torch.int64, device=device)  # first drafter position of token j
    width = torch.zeros(batch, k, dtype=torch.int64, device=device)  # drafter tokens it spans
    pointer = torch.zeros(batch, dtype=torch.int64, device=device)
    going = torch.ones(batch, dtype=torch.bool, device=device)
    for j in range(k):
        at = pointer.clamp_max(k - 1)[:, None]
        n = longest.gather(1, at)[:, 0]
        direct = mapped.gather(1, at)[:, 0]
        token = torch.where(n >= 2, merged.gather(1, at)[:, 0], direct)
        going &= (pointer < k) & (token >= 0)
        step = torch.where(n >= 2, n, 1)
        target_ids[:, j] = torch.where(going, token, -1)
        source[:, j] = pointer.clamp_max(k - 1)
        width[:, j] = torch.where(going, step, 0)
        pointer = pointer + torch.where(going, step, 0)
    lengths = (target_ids >= 0).sum(-1)
    span_end = source + width
    if draft_probs is None:
        return target_ids, lengths, None, span_end

    q_source = draft_probs.gather(
        1, source[..., None].expand(-1, -1, draft_probs.shape[-1])
    )  # [batch, k, V_d]
    index = d2t.long().clamp_min(0).expand(batch, k, -1)
    target_probs = draft_probs.new_zeros(batch, k, target_vocab_size).scatter_add_(
        2, index, q_source * (d2t >= 0)
    )
    # The merged token's mass: the product of its parts' probabilities along the sampled path.
    q_path = draft_probs.gather(2, draft_ids[..., None])[..., 0]  # [batch, k]: q_u(y_u)
    log_cumulative = torch.cat([q_path.new_zeros(batch, 1), q_path.clamp_min(1e-30).log().cumsum(1)], 1)
    product = (log_cumulative.gather(1, span_end) - log_cumulative.gather(1, source)).exp()  # [batch, k]
    is_merge = width >= 2
    first_direct = mapped.gather(1, source)
    # Gathers and scatters over fixed shapes (no boolean indexing, so no host sync on a GPU).
    subtract = torch.where(is_merge & (first_direct >= 0), product, 0.0)
    target_probs.scatter_add_(2, first_direct.clamp_min(0)[..., None], -subtract[..., None])
    target_probs.clamp_min_(0.0)
    merged_at = target_ids.clamp_min(0)[..., None]
    kept = target_probs.gather(2, merged_at)[..., 0]
    target_probs.scatter_(2, merged_at, torch.where(is_merge, product, kept)[..., None])
    target_probs *= (target_ids >= 0)[..., None]
    return target_ids, lengths, target_probs, span_end
