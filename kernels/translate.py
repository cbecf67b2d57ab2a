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

Splits (ours; the paper stops the draft at a drafter token with no target twin): translating with
``units`` (``VocabBridge.units``) instead of ``d2t`` maps such a token ``y`` to the marker ``V_t + y``, so
the scan goes on past it, and ``split_reference`` then writes each marker out as the target tokens that
spell its bytes (``d2ts[y]``), cut at ``k`` positions. The pieces of ``y_u`` all have ``source = u``;
``span_end`` counts the drafter tokens consumed through each position, so it is ``u`` at every piece
but the last, ``u + 1`` at the last. Their proposal probabilities are in ``kernels/proposal.py``.

The stop. ``drafted`` (optional, per row) is how many drafted tokens a row may translate: a row whose
draft-length control stopped it early translates only those, and no merge reaches past them. Past the
last proposed position ``m``, every position has ``source = c``, the drafter position the draft stopped
at (clamped to ``k - 1``), and ``span_end = c``, except position ``m`` itself when the draft stopped at a
drafted token that does not translate (``c < drafted``): there ``span_end = c + 1``, for verification
draws that position's token against the drafter's law at ``c`` (``kernels/proposal.py``). A draft that
ran out (``c = drafted``) proposed nothing more.

``translate_triton`` computes either op in one launch, one program (one warp) per row, with no host sync;
k <= 16 and N <= 8 keep the whole row in registers. The program reads the row's ids and their direct
map, puts each window ``y_i..y_{i+n-1}`` (every start i, every 2 <= n <= N) in a lane of its own, hashes
it as ``kernels/ngram.py`` does and probes the table for all windows at once with the lookup kernel's
``_lookup_rows`` (one probe loop, not one per n); the longest hit per start is a max over
``(n << 32) + value``. The left-to-right scan is then k register steps, each picking the entry at the
pointer by a masked reduction, and the four outputs are written once. On an H200, batch 64 and k = 8
take 48 us, 100x the eager reference and 1.8x ``torch.compile`` of it (``benchmarks/bench_translate.py``,
``benchmarks/results/h200-2026-11-30``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .host import eager_cpu
from .ngram import _P_TL, _SIGN_OFF_TL, MAX_PROBES, _lookup_rows, _mix_tl, ngram_lookup_reference
from .ragged import ragged_layout

__all__ = ["split_reference", "translate_ngram_reference", "translate_reference", "translate_triton"]


def translate_reference(
    draft_ids: torch.Tensor,  # [batch, k] int64 drafter ids
    d2t: torch.Tensor,  # [V_d] int32
    drafted: torch.Tensor | None = None,  # [batch] int64 each row's draft length (None: k)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns target ids [batch, k] (-1 from position m on), lengths m [batch], source and span ends
    [batch, k] int64 (past position m: the stop, see the module docstring)."""
    batch, k = draft_ids.shape
    positions = torch.arange(k, device=draft_ids.device)
    row_end = _row_end(drafted, batch, k, draft_ids.device)
    mapped = d2t[draft_ids].long()  # [batch, k]
    proposed = ((mapped >= 0) & (positions < row_end[:, None])).cumprod(-1).bool()  # leading ones
    m = proposed.sum(-1)
    stop = _stop(positions.expand(batch, k), positions + 1, m, m.clamp_max(k - 1), m < row_end)
    return torch.where(proposed, mapped, -1), m, *stop


def _row_end(drafted: torch.Tensor | None, batch: int, k: int, device: torch.device) -> torch.Tensor:
    """[batch] int64: the drafter positions each row may translate."""
    return (
        torch.full((batch,), k, dtype=torch.int64, device=device) if drafted is None else drafted.clamp(0, k)
    )


def _stop(
    source: torch.Tensor,  # [batch, k] int64, valid before position m
    span_end: torch.Tensor,  # [batch, k] int64, valid before position m
    m: torch.Tensor,  # [batch] int64 target positions proposed
    at: torch.Tensor,  # [batch] int64 the drafter position the draft stopped at (clamped to k - 1)
    unmapped: torch.Tensor,  # [batch] bool it stopped at a drafted token that does not translate
) -> tuple[torch.Tensor, torch.Tensor]:
    """Source and span ends with the stop written past position m (module docstring)."""
    j = torch.arange(source.shape[1], device=source.device)
    m, at = m[:, None], at[:, None]
    past = j >= m
    width = (j == m) & unmapped[:, None]  # one drafter token where True (a bool adds as 0 or 1)
    return torch.where(past, at, source), torch.where(past, at + width, span_end)


def translate_ngram_reference(
    draft_ids: torch.Tensor,  # [batch, k] int64 drafter ids
    d2t: torch.Tensor,  # [V_d] int32
    key_ids: torch.Tensor,  # [C, N] int32  n-gram table (kernels/ngram.py)
    values: torch.Tensor,  # [C] int32
    drafted: torch.Tensor | None = None,  # [batch] int64 each row's draft length (None: k)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct map plus longest-match n-gram merges (module docstring). Returns target ids [batch, k]
    (-1 padded), lengths [batch], source and span ends [batch, k] int64 (``span_end - source >= 2`` at a
    merge; the stop past the last proposed position)."""
    batch, k = draft_ids.shape
    n_max = key_ids.shape[1]
    device = draft_ids.device
    row_end = _row_end(drafted, batch, k, device)[:, None]  # [batch, 1]
    mapped = d2t[draft_ids].long()  # [batch, k]

    # Longest table match starting at each drafter position: one lookup of every window (start i, length n),
    # windows running past the draft's end cut short (a key of fewer ids, which never stands for n).
    lengths = torch.arange(2, max(n_max, 2) + 1, device=device)  # [L] candidate n
    positions = torch.arange(max(k + 1, n_max), device=device)  # drafter positions (k: the end), key columns
    padded = torch.nn.functional.pad(draft_ids, (0, n_max - 1), value=-1)  # -1 past the draft's end
    windows = padded.unfold(1, n_max, 1)  # [batch, k, N]: ids i..i+N-1
    inside = positions[:n_max] < lengths[:, None]  # [L, N]
    queries = torch.where(inside, windows[:, :, None], -1)  # [batch, k, L, N]
    found = ngram_lookup_reference(key_ids, values, queries.reshape(-1, n_max)).view(batch, k, -1)
    ends = positions[:k, None] + lengths  # [k, L] one past each window
    hit = (found >= 0) & (ends <= row_end[..., None])  # [batch, k, L]: the window fits in the row's draft
    longest = (lengths * hit).amax(-1)  # [batch, k] (0: no merge)
    merged = found.gather(2, (longest - 2).clamp_min(0)[..., None])[..., 0]

    # Left-to-right scan, all rows at once. From drafter position i the scan emits `token` and moves on by
    # `step` while it may (`ok`); where it may not, it stops there for good. So the positions it visits are
    # a chain through `after` (k steps of one gather each, position k standing for the end of the draft):
    # target position j is proposed where the pointer moved on from it, and what it emits is read off the
    # chain at once.
    token = torch.where(longest >= 2, merged, mapped)  # [batch, k]
    step = longest.clamp_min(1)  # longest is 0 or 2..N
    ok = (positions[:k] < row_end) & (token >= 0)
    after = torch.where(ok, positions[:k] + step, positions[:k])
    after = torch.nn.functional.pad(after, (0, 1), value=k)  # [batch, k + 1]: the end stays the end
    visited = [torch.zeros(batch, 1, dtype=torch.int64, device=device)]  # the pointer before each step
    for _ in range(k):
        visited.append(after.gather(1, visited[-1]))
    chain = torch.cat(visited, 1)  # [batch, k + 1]
    pointer, following = chain[:, :k], chain[:, 1:]
    going = following > pointer  # [batch, k] leading ones: the proposed positions
    source = pointer.clamp_max(k - 1)  # first drafter position of token j
    target_ids = torch.where(going, token.gather(1, source), -1)
    m = going.sum(-1)
    # The stop (module docstring). Past position m the pointer stays where the scan stopped, so `source` is
    # already the stop's drafter position there (clamped); it is one drafter token wide at m when the scan
    # stopped at a drafted token that does not translate (before the row's end).
    unmapped = (positions[:k] == m[:, None]) & (chain[:, k:] < row_end)
    return target_ids, m, source, torch.where(going, following, source + unmapped)


def split_reference(
    target_ids: torch.Tensor,  # [batch, k] int64 from a translation with `units`: -1 padded, >= V_t marks a split
    source: torch.Tensor,  # [batch, k] int64
    span_end: torch.Tensor,  # [batch, k] int64
    d2ts: torch.Tensor,  # [V_d, S'] int32 target spelling of each drafter token, -1 padded
    d2ts_len: torch.Tensor,  # [V_d] int32
    vocab_t: int,  # V_t
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each split marker ``V_t + y`` written out as ``d2ts[y]`` (module docstring), cut at ``k`` target
    positions; fixed shapes, no host read. Returns target ids (-1 padded), lengths, source, span_end.

    A block with no marker is its own write-out (the translation's ids, source and span ends, its stop
    included): on an eager CPU tensor (``host.eager_cpu``), where checking that costs nothing, such a block is
    returned as it is, without the layout."""
    if eager_cpu(target_ids) and not bool((target_ids >= vocab_t).any()):
        return target_ids, (target_ids >= 0).sum(-1), source, span_end
    k = target_ids.shape[1]
    split = target_ids >= vocab_t
    drafter_id = (target_ids - vocab_t).clamp_min(0)
    count = torch.where(target_ids < 0, 0, torch.where(split, d2ts_len[drafter_id].long(), 1))  # [batch, k]
    unit, piece, valid = ragged_layout(count, k)  # [batch, k] each
    at_split = split.gather(1, unit)
    pieces = d2ts[drafter_id.gather(1, unit), piece.clamp(0, d2ts.shape[1] - 1)].long()
    ids = torch.where(valid, torch.where(at_split, pieces, target_ids.gather(1, unit)), -1)
    first = source.gather(1, unit)
    last_piece = ~at_split | (piece == count.gather(1, unit) - 1)
    end = torch.where(valid & last_piece, span_end.gather(1, unit), first)
    # The translation's stop (at its first -1 position) moves to the first position past the pieces.
    stopped = (target_ids >= 0).sum(-1).clamp_max(k - 1)[:, None]
    at = source.gather(1, stopped)[:, 0]
    unmapped = (target_ids.gather(1, stopped)[:, 0] < 0) & (span_end.gather(1, stopped)[:, 0] > at)
    m = valid.sum(-1)
    return ids, m, *_stop(first, end, m, at, unmapped)


# -- Triton kernel ----------------------------------------------------------------------------------------
@triton.jit
def _pick(vector, positions, at):  # vector, positions [K_POW2]; at a scalar position -> vector[at]
    return tl.sum(tl.where(positions == at, vector, 0), axis=0)


@triton.jit
def _translate_kernel(
    draft_ids,  # [batch, k] int64
    d2t,  # [V_d] int32
    key_ids,  # [C, N] int32 (HAS_TABLE)
    values,  # [C] int32 (HAS_TABLE)
    target_ids,  # [batch, k] int64 out
    lengths,  # [batch] int64 out
    source,  # [batch, k] int64 out
    span_end,  # [batch, k] int64 out
    drafted,  # [batch] int64 each row's draft length (HAS_DRAFTED)
    k,
    C,
    HAS_TABLE: tl.constexpr,
    HAS_DRAFTED: tl.constexpr,
    N: tl.constexpr,
    N_POW2: tl.constexpr,
    K_POW2: tl.constexpr,
    SIZES: tl.constexpr,  # window sizes 2..N, rounded up to a power of two
    MAX_PROBES: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    draft = draft_ids + row * k
    positions = tl.arange(0, K_POW2).to(tl.int64)  # [K_POW2] drafter positions
    in_draft = positions < k
    row_end = k
    if HAS_DRAFTED:
        row_end = tl.minimum(tl.maximum(tl.load(drafted + row), 0), k)
    mapped = tl.load(d2t + tl.load(draft + positions, mask=in_draft, other=0), mask=in_draft, other=-1)
    mapped = mapped.to(tl.int64)  # [K_POW2]
    out = row * k + positions
    if HAS_TABLE:
        # Every window y_i..y_{i+n-1} (2 <= n <= N) in a lane of its own, all probed at once.
        lanes = tl.arange(0, SIZES * K_POW2)  # lane (n - 2) * K_POW2 + i
        start = (lanes % K_POW2).to(tl.int64)
        n = (lanes // K_POW2 + 2).to(tl.int64)
        fits = (n <= N) & (start + n <= row_end)  # [SIZES * K_POW2]
        columns = tl.arange(0, N_POW2)
        window = tl.load(
            draft + start[:, None] + columns[None, :],
            mask=fits[:, None] & (columns[None, :] < n[:, None]),
            other=-1,
        )  # [SIZES * K_POW2, N_POW2], -1 padded like a table key
        h = _mix_tl(n)  # the key hash of kernels/ngram.py
        for column in tl.static_range(N):
            y = tl.load(draft + start + column, mask=fits & (column < n), other=-1)
            h = tl.where(y >= 0, _mix_tl(h * _P_TL + y + 1), h)
        found = _lookup_rows(key_ids, values, window, h & _SIGN_OFF_TL, fits, C, N, N_POW2, MAX_PROBES)
        # The longest hit at each start: (n, value) packed into one int64 and maximised over n.
        best = tl.max(tl.reshape(tl.where(found >= 0, (n << 32) + found, -1), [SIZES, K_POW2]), axis=0)
        longest = tl.where(best >= 0, best >> 32, 0)  # [K_POW2]
        merged = best & 0xFFFFFFFF  # [K_POW2], the value where longest >= 2
        # Left-to-right scan: target position j takes the longest merge at the pointer, else its direct map.
        # A stopped draft stays stopped: the pointer no longer moves, so the same test fails again.
        ids = tl.full([K_POW2], -1, tl.int64)
        first = tl.zeros([K_POW2], tl.int64)
        width = tl.zeros([K_POW2], tl.int64)
        pointer = tl.zeros([], tl.int64)
        for j in range(k):
            at = tl.minimum(pointer, k - 1)
            span = _pick(longest, positions, at)  # 0 or 2..N
            token = tl.where(span >= 2, _pick(merged, positions, at), _pick(mapped, positions, at))
            step = tl.where((pointer < row_end) & (token >= 0), tl.maximum(span, 1), 0)
            ids = tl.where(positions == j, tl.where(step > 0, token, -1), ids)
            first = tl.where(positions == j, at, first)
            width = tl.where(positions == j, step, width)
            pointer += step
        m = tl.sum((ids >= 0).to(tl.int64), axis=0)
    else:
        # Direct map: the leading positions that map.
        pointer = tl.min(tl.where((positions < row_end) & (mapped < 0), positions, row_end), axis=0)
        m = pointer
        ids = tl.where(positions < m, mapped, -1)
        first = positions
        width = tl.full([K_POW2], 1, tl.int64)
    tl.store(lengths + row, m)
    # Past position m, the stop (module docstring): where the draft stopped, one drafter token wide at m
    # when it stopped at a drafted token that does not translate.
    at = tl.minimum(pointer, k - 1)
    past = positions >= m
    first = tl.where(past, at, first)
    width = tl.where(past, ((positions == m) & (pointer < row_end)).to(tl.int64), width)
    tl.store(target_ids + out, ids, mask=in_draft)
    tl.store(source + out, first, mask=in_draft)
    tl.store(span_end + out, first + width, mask=in_draft)


def translate_triton(
    draft_ids: torch.Tensor,  # [batch, k] int64 drafter ids in [0, V_d)
    d2t: torch.Tensor,  # [V_d] int32
    key_ids: torch.Tensor | None = None,  # [C, N] int32 n-gram table, contiguous
    values: torch.Tensor | None = None,  # [C] int32
    drafted: torch.Tensor | None = None,  # [batch] int64 each row's draft length (None: k)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``translate_ngram_reference`` with a table, ``translate_reference`` without: one launch, one program
    per row, no host sync."""
    batch, k = draft_ids.shape
    draft_ids, d2t = draft_ids.contiguous(), d2t.contiguous()
    drafted = None if drafted is None else drafted.contiguous()
    target_ids = torch.empty_like(draft_ids)
    source, span_end = torch.empty_like(draft_ids), torch.empty_like(draft_ids)
    lengths = torch.zeros(batch, dtype=torch.int64, device=draft_ids.device)
    if batch == 0 or k == 0:
        return target_ids, lengths, source, span_end
    capacity, n = (1, 1) if key_ids is None else key_ids.shape
    _translate_kernel[(batch,)](
        draft_ids, d2t, key_ids, values, target_ids, lengths, source, span_end, drafted, k, capacity,
        HAS_TABLE=key_ids is not None, HAS_DRAFTED=drafted is not None, N=n, N_POW2=triton.next_power_of_2(n),
        K_POW2=triton.next_power_of_2(k), SIZES=triton.next_power_of_2(max(n - 1, 1)), MAX_PROBES=MAX_PROBES,
        num_warps=1,
    )  # fmt: skip
    return target_ids, lengths, source, span_end
