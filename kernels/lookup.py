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
- ``lookup_triton``: a row's slots cut into chunks of whole tiles over ``splits`` programs (about
  ``rows.target_programs`` programs in all, so that one long row fills the GPU too). Each program reads
  only the row's context ``c_start..c_{L-2}`` within its chunk, tile by tile, with shifted loads (the same
  cache lines) while some match in the tile goes on, at most ``N``. The row's programs meet in two
  atomics: each takes the maximum of its key into the row's, and the last one done writes the draft.
  One launch for the stage (and a zeroed scratch of two words a row), whatever ``N``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .host import eager_cpu
from .rows import chunking

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
    scratch_ptr,  # [2, batch] int64 zeros: each row's best key so far, and its programs that are done
    batch,
    slots,
    stride_b,
    k,
    max_ngram,
    chunk,  # slots a program covers (whole tiles)
    splits,  # programs a row has
    BLOCK: tl.constexpr,
    K_P2: tl.constexpr,
    SPLIT: tl.constexpr,  # splits > 1
):
    b = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)
    row = tokens_ptr + b * stride_b
    first = tl.load(start_ptr + b)
    length = tl.load(lengths_ptr + b)
    longest = tl.minimum(length - 1 - first, max_ngram)  # no match is longer than the context less one token
    span = slots + 1  # the key's base: m(e) * span + (slots - e)
    best = tl.full((), 0, tl.int64)
    for tile in range(tl.maximum(first, s * chunk), tl.minimum(length - 1, (s + 1) * chunk), BLOCK):
        e = tile + tl.arange(0, BLOCK)
        alive = e < tl.minimum(length - 1, (s + 1) * chunk)
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
    if SPLIT:  # the row's programs meet: the last one done writes the draft from their maximum
        # Scalar atomics: one thread runs each and Triton hands its result to every thread through shared
        # memory (st.shared, bar.sync, ld.shared after each atom in the sm_90 PTX of triton 3.6 and 3.9),
        # so every thread of the last program sees `done` and the maximum. Keep them scalar: triton 3.3 left
        # a [1]-shaped atomic's result on one thread only (triton-lang/triton#7402).
        tl.atomic_max(scratch_ptr + b, best)
        done = tl.atomic_add(scratch_ptr + batch + b, 1)  # acq_rel: the last one sees the others' maxima
        if done == splits - 1:
            best = tl.atomic_max(scratch_ptr + b, 0)  # the row's maximum (an atomic read)
            _write_draft(row, ids_ptr + b * k, drafted_ptr + b, best, length, slots, k, K_P2)
    else:
        _write_draft(row, ids_ptr + b * k, drafted_ptr + b, best, length, slots, k, K_P2)


@triton.jit
def _write_draft(row, ids_ptr, drafted_ptr, best, length, slots, k, K_P2: tl.constexpr):
    """A row's draft from its best key (0: no match), as the reference reads it."""
    found = best > 0
    begin = tl.where(found, slots - best % (slots + 1) + 1, 0)
    drafted = tl.where(found, tl.minimum(tl.maximum(length - begin, 0), k), 0)
    j = tl.arange(0, K_P2)
    ids = tl.load(row + tl.minimum(begin + j, slots - 1), mask=j < k)
    tl.store(ids_ptr + j, ids, mask=j < k)
    tl.store(drafted_ptr, drafted)


def lookup_triton(
    tokens: torch.Tensor,  # [batch, slots] int64
    start: torch.Tensor,  # [batch] int64
    lengths: torch.Tensor,  # [batch] int64
    k: int,
    max_ngram: int,
    *,
    block: int = 1024,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``lookup_reference`` in Triton (module docstring); ``block`` is the tile of a row's context,
    ``splits`` the programs a row's slots are cut over (default: about ``rows.target_programs`` in all)."""
    batch, slots = tokens.shape
    if tokens.stride(1) != 1:
        tokens = tokens.contiguous()
    ids = torch.empty(batch, k, dtype=torch.int64, device=tokens.device)
    drafted = torch.empty(batch, dtype=torch.int64, device=tokens.device)
    if batch == 0:
        return ids, drafted
    if splits is None:
        chunk, splits = chunking(slots, batch, block, tokens.device)
    else:
        chunk = triton.cdiv(triton.cdiv(slots, block), splits) * block
        splits = triton.cdiv(slots, chunk)
    # the rows' best keys and finished programs; one program a row needs none (any pointer will do)
    scratch = torch.zeros(2 * batch, dtype=torch.int64, device=tokens.device) if splits > 1 else drafted
    _lookup_kernel[(batch, splits)](
        tokens, start.contiguous(), lengths.contiguous(), ids, drafted, scratch, batch, slots, tokens.stride(0), k,
        max_ngram, chunk, splits, BLOCK=block, K_P2=triton.next_power_of_2(k), SPLIT=splits > 1,
    )  # fmt: skip
    return ids, drafted
