"""Translate a drafted block from the drafter's vocabulary into the target's (SPEC §2.1, §2.2).

For a row with drafter tokens ``y_1..y_k`` and the direct map ``d2t`` (``-1`` where a drafter token has
no target token with the same bytes), ``translate_reference`` maps token by token:

    x_j        = d2t[y_j]                                 target id proposed at position j
    m          = the number of leading positions with x_j >= 0 (the draft stops at the first
                 drafter token that does not map)
    source_j   = j,  span_end_j = j + 1                   drafter tokens y_{source_j}..y_{span_end_j - 1}
                                                          stand behind target position j

``translate_ngram_reference`` also merges runs of drafter tokens into one target token through the
n-gram table (``kernels/ngram.py``): scanning left to right, the longest run ``y_i..y_{i+n-1}``
(2 <= n <= N) found in the table becomes one target token, otherwise ``y_i`` maps directly, and the first
token that does neither ends the draft. The proposal probabilities in the target vocabulary follow from
``source``/``span_end`` (``kernels/proposal.py``); translation itself needs no probabilities.
"""

from __future__ import annotations

import torch

from .ngram import ngram_lookup_reference

__all__ = ["translate_ngram_reference", "translate_reference"]


def translate_reference(
    draft_ids: torch.Tensor,  # [batch, k] int64 drafter ids
    d2t: torch.Tensor,  # [V_d] int32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns target ids [batch, k] (-1 from position m on), lengths m [batch], source and span ends
    [batch, k] int64."""
    batch, k = draft_ids.shape
    mapped = d2t[draft_ids].long()  # [batch, k]
    proposed = (mapped >= 0).long().cumprod(-1).bool()  # leading mappable positions
    source = torch.arange(k, device=draft_ids.device).expand(batch, k)
    return torch.where(proposed, mapped, -1), proposed.sum(-1), source, source + 1


def translate_ngram_reference(
    draft_ids: torch.Tensor,  # [batch, k] int64 drafter ids
    d2t: torch.Tensor,  # [V_d] int32
    key_ids: torch.Tensor,  # [C, N] int32  n-gram table (kernels/ngram.py)
    values: torch.Tensor,  # [C] int32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct map plus longest-match n-gram merges (module docstring). Returns target ids [batch, k]
    (-1 padded), lengths [batch], source and span ends [batch, k] int64 (``span_end - source >= 2`` at a
    merge; ``== 0`` past the draft's end)."""
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
    return target_ids, (target_ids >= 0).sum(-1), source, source + width
