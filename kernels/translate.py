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

__all__ = ["translate_reference"]


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
