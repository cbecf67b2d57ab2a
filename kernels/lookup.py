"""Prompt lookup: drafts copied from a row's own context, with no drafter model (transformers'
``prompt_lookup_num_tokens``; Saxena 2023, "prompt lookup decoding").

For a row whose committed tokens are ``c_0..c_{L-1}`` (its prompt, then its new tokens), a round's draft is
found as transformers' ``PromptLookupCandidateGenerator`` finds it: for ``n`` from ``N``
(``max_matching_ngram_size``) down to 1, the first (leftmost) ``j`` with ``c_j..c_{j+n-1} = c_{L-n}..c_{L-1}``
and ``j + n < L``; the largest ``n`` that has one wins, and the draft is ``c_{j+n}..c_{j+n+k-1}`` cut at the
context's end (``min(k, L - j - n)`` tokens). A row with no match drafts nothing. Slots before a row's
first slot (left padding) are not part of its context.

Both implementations find it in one pass over the context, by where a match ends: for ``e < L - 1``, let
``m(e)`` be how many of the context's last tokens, up to ``N``, equal the tokens ending at ``e``
(``c_{e-t} = c_{L-1-t}`` for ``t < m(e)``, within the row). A window of ``n`` tokens at ``j`` matches exactly
when ``m(j + n - 1) >= n``, so the winning ``n`` is the largest ``m(e)``, and its leftmost window ends at
the first ``e`` that reaches it: the draft begins at that ``e + 1``. Both are one maximum of the key
``m(e) * (slots + 1) + (slots - e)`` over the row (0 where ``m(e) = 0``).

Fixed shapes and no host read, so the stage is captured with the rest of a round:

- ``lookup_reference``: up to ``N`` shifted comparisons of ``[batch, slots]`` (on an eager CPU tensor, only
  while some match goes on) and one max;
- ``lookup_triton``: one program per row, which reads only that row's context ``c_start..c_{L-2}``, tile by
  tile, with shifted loads (the same cache lines) while some match in the tile goes on, at most ``N``, and
  writes the draft: one launch for the stage, whatever ``N``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .host import eager_cpu

__all__ = ["lookup_reference", "lookup_triton"]


def lookup_reference(
    tokens: torch.Tensor,  # [batch, slots] int64 committed token ids by slot (stale ones past lengths)
    start: torch.Tensor,  # [batch] int64 each row's first slot
    lengths: torch.Tensor,  # [batch] int64 one past each row's last committed slot
    k: int,  # most tokens drafted
    max_ngram: int,  # N: the longest suffix matched
) -> tuple[torch.Tensor, torch.Tensor]:
    """The draft of the module docstring: ids [batch, k] int64 (the ``k`` slots from the draft's first, the
    last slot repeated past the end; slot 0 on where nothing matched) and ``drafted`` [batch] int64 in
    [0, k], the tokens proposed."""
    batch, slots = tokens.shape
    device = tokens.device
    longest = max(1, min(max_ngram, slots - 1))  # no match is longer than a row's context less one token
    at = torch.arange(slots, device=device)
    # Slots outside the row's context never match: -2 there, -1 for a suffix token before the row's start.
    context = torch.where(at >= start[:, None], tokens, -2)
    shifted = torch.nn.functional.pad(context, (longest - 1, 0), value=-2)
    back = lengths[:, None] - 1 - torch.arange(longest, device=device)  # c_{L-1-t}
    suffix = torch.where(back >= start[:, None], tokens.gather(1, back.clamp_min(0)), -1)
    alive = at < (lengths - 1)[:, None]  # a match must leave its continuation inside the context
    matched = torch.zeros(batch, slots, dtype=torch.int64, device=device)  # m(e)
    for t in range(longest):
        alive = alive & (shifted[:, longest - 1 - t : longest - 1 - t + slots] == suffix[:, t, None])
        matched += alive
        if eager_cpu(tokens) and not alive.any():  # no match goes on (a host read: eager CPU tensors only)
            break
    best = torch.where(matched > 0, matched * (slots + 1) + (slots - at), 0).amax(1)
    found = best > 0
    begin = torch.where(found, slots - best % (slots + 1) + 1, 0)
    drafted = torch.where(found, (lengths - begin).clamp(0, k), 0)
    columns = (begin[:, None] + torch.arange(k, device=device)).clamp_max(slots - 1)
    return tokens.gather(1, columns), drafted


# ---------------------------------------------------------------------------------------------- Triton


@triton.jit
def _lookup_kernel(
    tokens_ptr,  # [batch, slots] int64
    start_ptr,  # [batch] int64
    lengths_ptr,  # [batch] int64
    ids_ptr,  # [batch, k] int64 out
    drafted_ptr,  # [batch] int64 out
    slots,
    stride_b,
    k,
    max_ngram,
    BLOCK: tl.constexpr,
    K_P2: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    row = tokens_ptr + b * stride_b
    first = tl.load(start_ptr + b)
    length = tl.load(lengths_ptr + b)
    longest = tl.minimum(length - 1 - first, max_ngram)  # no match is longer than the context less one token
    span = slots + 1  # the key's base: m(e) * span + (slots - e)
    best = tl.full((), 0, tl.int64)
    for tile in range(first, length - 1, BLOCK):
        e = tile + tl.arange(0, BLOCK)
        alive = e < length - 1
        matched = tl.zeros((BLOCK,), tl.int64)
        t = tl.full((), 0, tl.int64)
        while (t < longest) & (tl.max(alive.to(tl.int32), 0) > 0):  # until no match in the tile goes on
            back = length - 1 - t
            suffix = tl.load(row + tl.maximum(back, 0))
            suffix = tl.where(back >= first, suffix, -1)
            x = tl.load(row + e - t, mask=alive & (e - t >= first), other=-2)
            alive = alive & (x == suffix)
            matched += alive.to(tl.int64)
            t += 1
        key = tl.where(matched > 0, matched * span + (slots - e), 0)
        best = tl.maximum(best, tl.max(key, 0))
    found = best > 0
    begin = tl.where(found, slots - best % span + 1, 0)
    drafted = tl.where(found, tl.minimum(tl.maximum(length - begin, 0), k), 0)
    j = tl.arange(0, K_P2)
    ids = tl.load(row + tl.minimum(begin + j, slots - 1), mask=j < k)
    tl.store(ids_ptr + b * k + j, ids, mask=j < k)
    tl.store(drafted_ptr + b, drafted)


def lookup_triton(
    tokens: torch.Tensor,  # [batch, slots] int64
    start: torch.Tensor,  # [batch] int64
    lengths: torch.Tensor,  # [batch] int64
    k: int,
    max_ngram: int,
    *,
    block: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``lookup_reference`` in Triton (module docstring); ``block`` is the tile of a row's context."""
    batch, slots = tokens.shape
    if tokens.stride(1) != 1:
        tokens = tokens.contiguous()
    ids = torch.empty(batch, k, dtype=torch.int64, device=tokens.device)
    drafted = torch.empty(batch, dtype=torch.int64, device=tokens.device)
    if batch == 0:
        return ids, drafted
    _lookup_kernel[(batch,)](
        tokens, start.contiguous(), lengths.contiguous(), ids, drafted, slots, tokens.stride(0), k, max_ngram,
        BLOCK=block, K_P2=triton.next_power_of_2(k),
    )  # fmt: skip
    return ids, drafted
