"""Prompt lookup: drafts copied from a row's own context, with no drafter model (transformers'
``prompt_lookup_num_tokens``; Saxena 2023, "prompt lookup decoding").

For a row whose committed tokens are ``c_0..c_{L-1}`` (its prompt, then its new tokens), a round's draft is
found as transformers' ``PromptLookupCandidateGenerator`` finds it: for ``n`` from ``N``
(``max_matching_ngram_size``) down to 1, the first (leftmost) ``j`` with ``c_j..c_{j+n-1} = c_{L-n}..c_{L-1}``
and ``j + n < L``; the largest ``n`` that has one wins, and the draft is ``c_{j+n}..c_{j+n+k-1}`` cut at the
context's end (``min(k, L - j - n)`` tokens). A row with no match drafts nothing, and a round is as wide as
its longest draft (``Rounds.run``): one where no row found a match is one step of the target. A draft is certain (no distribution), so the rounds verify it by exact match against draws from
the target (``kernels/match.py``), lossless for any proposal, as transformers' assisted generation does
with candidates that come without logits. Unlike transformers, a draft is not cut before an EOS id or a
token the request's processors forbid: verification rejects what the target would not emit, and an
accepted EOS ends the row as usual.

Fixed shapes and no host read: for each ``n``, every window of the row's slots is compared with its last
``n`` tokens at once (``[batch, slots, n]``), so the stage can be captured with the rest of the round.
"""

from __future__ import annotations

import torch

__all__ = ["lookup_draft"]


def lookup_draft(
    tokens: torch.Tensor,  # [batch, slots] int64 committed tokens by slot (and stale ones past lengths)
    start: torch.Tensor,  # [batch] int64 each row's first slot
    lengths: torch.Tensor,  # [batch] int64 one past each row's last committed slot
    k: int,  # most tokens drafted
    max_ngram: int,  # N: the longest suffix matched
) -> tuple[torch.Tensor, torch.Tensor]:
    """The draft of the module docstring: ids [batch, k] int64 (valid before ``drafted``; the rest are
    context tokens that are not proposed) and ``drafted`` [batch] int64 in [0, k]."""
    batch, slots = tokens.shape
    device = tokens.device
    found = torch.zeros(batch, dtype=torch.bool, device=device)
    begin = torch.zeros(batch, dtype=torch.int64, device=device)  # the slot of a draft's first token
    for n in range(min(max_ngram, slots - 1), 0, -1):  # a match and its continuation take n + 1 slots
        suffix = tokens.gather(1, (lengths[:, None] - n + torch.arange(n, device=device)).clamp_min(0))
        at = torch.arange(slots - n + 1, device=device)  # each window's first slot
        hit = (
            (tokens.unfold(1, n, 1) == suffix[:, None]).all(-1)  # [batch, slots - n + 1]
            & (at >= start[:, None])
            & (at + n < lengths[:, None])  # inside the context, the continuation too
        )
        first = torch.where(hit, at, slots).amin(1)  # the leftmost hit
        new = hit.any(1) & ~found
        begin = torch.where(new, first + n, begin)
        found |= new
    drafted = torch.where(found, (lengths - begin).clamp(0, k), 0)
    columns = (begin[:, None] + torch.arange(k, device=device)).clamp_max(slots - 1)
    return tokens.gather(1, columns), drafted
