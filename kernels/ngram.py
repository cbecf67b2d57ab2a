"""A GPU-resident open-addressing hash table from runs of drafter ids to a target id (OmniDraft, SPEC §2.2).

Layout (capacity ``C``, a power of two; ``N`` = the longest key):

    hashes  [C]    int64   the claim word: the stored key's hash, or EMPTY (-1) for a free slot
    key_ids [C, N] int32   the stored key, -1 padded (key_ids[s, 0] == -1 exactly when slot s is free)
    values  [C]    int32   the target id whose bytes are the concatenation of the key's tokens
    counts  [C]    int64   hits: how often the target emitted this token (least-frequently-used eviction;
                           64 bits, so that no count wraps in a server's lifetime)

A key of ``n`` ids (2 <= n <= N) hashes to ``h = mix(... mix(mix(n) * P + a_1 + 1) * P + a_2 + 1 ...)``
(64-bit wrap-around arithmetic, ``mix`` a xor-shift-multiply finaliser), with the sign bit cleared so
that no hash is EMPTY. Its probe sequence is ``(h + i(i+1)/2) mod C``, ``i = 0..MAX_PROBES-1``
(triangular probing). The first steps stay within the home slot's cache lines, the triangular numbers mod
a power of two visit every slot, and unlike linear probing the chains of neighbouring homes do not merge
into long runs (primary clustering): at load 1/2, linear probing within 16 slots left 0.1-0.3% of
inserts without a slot (measured on an H200, ``benchmarks/results/h200-2026-11-30/README.md``); triangular probing
within 32 leaves none in simulations of 2^20 slots up to load 0.6.

Lookup: the first slot of the sequence whose stored key equals the query, exactly, gives the value;
a free slot or the end of the sequence gives -1. The stored key makes lookups exact whatever the hashes.

Insert: a key settles in the first slot of its sequence whose hash equals its own (present: its hits
are added to the count) or that is free (claimed: key, value and hits written). Two keys are the same
key for an insert when their 63-bit hashes are equal. A different key with an equal hash (probability
about ``n_chain * 2^-63`` per insert) adds its hits to the other key's slot and is not stored; a lookup
of it compares the stored ids, misses, and returns -1: never a wrong value. Duplicate keys in one batch
settle in one slot and their hits add up; which duplicate's value is written is unspecified (they
should agree). Probing stops after ``MAX_PROBES`` slots; the owner keeps the load factor near 1/2 (see
``omnidraft_fast/ngram.py``), where an insert needs more than MAX_PROBES probes with negligible
probability, and counts the keys (rows) that could not be placed.

Concurrency (the Triton insert, one key per lane, many programs at once): a slot's hash word goes from
EMPTY to a hash once, by ``atomic_cas``, and never changes again during a launch. So a plain load that
sees a hash is final, and one that sees EMPTY is confirmed or corrected by the CAS, whose return value
is the word's final content: EMPTY (this lane claimed the slot), its own hash (the same key, claimed by
another lane: add hits) or another hash (probe on). The claimer is the only writer of the slot's key
and value; every settler adds its hits with ``atomic_add``. Nothing reads key ids or values during an
insert, so no ordering between the plain stores and the atomics is needed; lookups run in later
launches. The outcome is that of the reference up to which of the keys racing for a free slot takes
it (the reference: the lowest row): the same entries, possibly in other slots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .host import eager_cpu

__all__ = [
    "EMPTY",
    "MAX_PROBES",
    "hash_keys_reference",
    "ngram_insert_reference",
    "ngram_insert_triton",
    "ngram_lookup_reference",
    "ngram_lookup_triton",
]

MAX_PROBES = 32
EMPTY = -1  # the hash word of a free slot
_P = 0x100000001B3  # FNV-1a 64-bit prime
_M = -0x40A7B892E31B1A47  # 0xBF58476D1CE4E5B9 (splitmix64) as a signed int64
_SIGN_OFF = 0x7FFFFFFFFFFFFFFF
_BLOCK = 256  # keys per program


# -- torch references (the definition) -----------------------------------------------------------------
def _mix_(x: torch.Tensor) -> torch.Tensor:
    """The hash's ``mix`` (module docstring), in place: ``x`` is a temporary."""
    x ^= x >> 31
    x *= _M
    x ^= x >> 29
    return x


def _offset(probe: int) -> int:
    """Where probe ``probe`` lands, relative to the home slot (``_offset_tl`` in the kernels)."""
    return probe * (probe + 1) // 2


def _slot(h: torch.Tensor, probe: int, capacity: int) -> torch.Tensor:
    """[Q] the slot probe ``probe`` of hashes ``h`` reads (the home slot at probe 0, with no offset to add)."""
    return (h + _offset(probe) if probe else h) & (capacity - 1)


def hash_keys_reference(keys: torch.Tensor) -> torch.Tensor:  # keys [Q, N] int64, -1 padded -> [Q] int64
    """The 63-bit hash of each key (its length and ids), >= 0."""
    present = keys >= 0
    return _hash(keys, present, present.sum(-1))


def _hash(
    keys: torch.Tensor,  # [Q, N] int64, -1 padded
    present: torch.Tensor,  # [Q, N] bool: keys >= 0
    length: torch.Tensor,  # [Q] int64: present ids per key
) -> torch.Tensor:  # [Q] int64
    """``hash_keys_reference`` given each key's present ids and their count (an insert has them already),
    which it mixes in place."""
    h = _mix_(length)
    shifted = keys + 1
    for ids, here in zip(shifted.unbind(1), present.unbind(1), strict=True):
        step = torch.add(ids, h, alpha=_P)  # h * P + (id + 1) in one op, wrapping alike
        h = torch.where(here, _mix_(step), h)
    h &= _SIGN_OFF
    return h


def ngram_lookup_reference(
    key_ids: torch.Tensor,  # [C, N] int32
    values: torch.Tensor,  # [C] int32
    queries: torch.Tensor,  # [Q, N] int64, -1 padded
) -> torch.Tensor:  # [Q] int64: the value, or -1 when the key is absent
    capacity = key_ids.shape[0]
    h = hash_keys_reference(queries)
    found = torch.full_like(h, -1)
    open_ = torch.ones_like(h, dtype=torch.bool)  # still probing
    for probe in range(MAX_PROBES):
        slot = _slot(h, probe, capacity)
        stored = key_ids[slot]  # [Q, N] int32, compared with the int64 queries as they are
        match = open_ & (stored == queries).all(-1)
        found = torch.where(match, values[slot], found)  # int32 values into the int64 result
        open_ ^= match  # a match ends the chain (match is within open_)
        open_ &= stored[:, 0] >= 0  # and so does a free slot
        if not _more(open_):
            break
    return found


def ngram_insert_reference(
    hashes: torch.Tensor,  # [C] int64, updated in place
    key_ids: torch.Tensor,  # [C, N] int32, updated in place
    values: torch.Tensor,  # [C] int32, updated in place
    counts: torch.Tensor,  # [C] int64, updated in place
    keys: torch.Tensor,  # [Q, N] int64, -1 padded; rows shorter than 2 ids are ignored
    new_values: torch.Tensor,  # [Q] int64, >= 0
    hits: torch.Tensor,  # [Q] int64 hits each row adds
) -> torch.Tensor:  # [] int64: rows that found no slot within MAX_PROBES
    """Insert or count each key; duplicate keys in one batch settle in one slot and add up their hits.

    Fixed shapes only (no host sync on a GPU): a masked write to a free slot is a ``scatter_reduce`` with
    ``amax`` of -1 for the rows that do not write, since a free slot holds -1 in hashes, key ids and values.
    On an eager CPU tensor (``host.eager_cpu``) a large insert probes on with its pending rows only (a table's
    seeds: 0.23 -> 0.05 s for a Llama-3 target's 96k).
    """
    capacity, rows = key_ids.shape[0], keys.shape[0]
    present = keys >= 0
    length = present.sum(-1)
    pending = length >= 2
    if not _more(pending):  # nothing to insert (the CPU's early exit, as in the probe loop)
        return pending.sum()
    h = _hash(keys, present, length)
    # Which row claims a free slot: for a few rows, each row against the rows before it ([Q, Q]); for
    # many, a slot-indexed scratch buffer of the lowest row (reset after each use), as a [Q, Q] would
    # outgrow the table. The same winners either way. What a claim needs is made at the first one (most
    # rounds' keys are in the table already).
    pairwise = _pairwise(rows, capacity)
    claiming = None
    for probe in range(MAX_PROBES):
        slot = _slot(h, probe, capacity)
        # A free slot goes to the lowest pending row aiming at it (no claim where no row sees one: the writes
        # would change nothing).
        stored = hashes[slot]
        free = pending & (stored == EMPTY)
        if _more(free):
            if claiming is None:
                order = torch.arange(keys.shape[0], device=keys.device)  # the rows still in play
                if pairwise:
                    before, scratch = order[None, :] < order[:, None], None  # [Q, Q]: row j before row i
                else:
                    before, scratch = None, torch.full_like(hashes, rows)  # [C] int64
                claiming = order, before, scratch, keys.to(key_ids.dtype), new_values.to(values.dtype)
            order, before, claimant, new_keys, new_vals = claiming
            if pairwise:
                earlier = (slot[:, None] == slot[None, :]) & free[None, :] & before
                won = free & ~earlier.any(1)
            else:
                claimant.scatter_reduce_(0, slot, torch.where(free, order, rows), reduce="amin")
                won = free & (claimant[slot] == order)
                claimant.index_fill_(0, slot, rows)
            hashes.scatter_reduce_(0, slot, torch.where(won, h, EMPTY), reduce="amax")
            key_ids.scatter_reduce_(
                0, slot[:, None].expand_as(new_keys), torch.where(won[:, None], new_keys, -1), reduce="amax"
            )
            values.scatter_reduce_(0, slot, torch.where(won, new_vals, -1), reduce="amax")
            stored = hashes[slot]
        # Every row whose slot now holds its hash (claimed just now, by a duplicate, or earlier) settles.
        settled = pending & (stored == h)
        counts.index_add_(0, slot, (hits * settled).to(counts.dtype))
        pending ^= settled  # settled is within pending
        if not _more(pending):
            break
        if not pairwise and eager_cpu(pending):  # the CPU's shortcut for a large insert (seeds, an eviction):
            # the next probes see the rows still pending only (about 1 in 10 after the first probe of a table
            # under a quarter full), in their order, so the same rows claim the same slots
            left = pending.nonzero()[:, 0]
            h, hits, keys, new_values, pending = (t[left] for t in (h, hits, keys, new_values, pending))
            if claiming is not None:  # `rows` stays the claimants' sentinel: above every row's order
                order, before, claimant, new_keys, new_vals = claiming
                claiming = order[left], before, claimant, new_keys[left], new_vals[left]
    return pending.sum()


def _pairwise(rows: int, capacity: int) -> bool:
    """Whether an insert of ``rows`` keys finds each free slot's claimant row against row ([Q, Q]) rather
    than through a scratch buffer of ``capacity`` slots (what a round inserts: a few keys into a large table)."""
    return rows * rows <= capacity


def _more(pending: torch.Tensor) -> bool:
    """Whether any row is ``pending``: whether probing must go on, or a probe has a free slot to claim. On an
    eager CPU tensor (``host.eager_cpu``) the answer (a free check there) stops the probes as soon as every key
    is resolved and skips a claim no row makes; elsewhere the check would synchronise a GPU, or fix the
    probe count of a recording or a trace, so all MAX_PROBES steps run, each with its claim (the results are
    the same)."""
    return not eager_cpu(pending) or bool(pending.any())


# -- Triton kernels ---------------------------------------------------------------------------------------
_P_TL = tl.constexpr(_P)
_M_TL = tl.constexpr(_M)
_SIGN_OFF_TL = tl.constexpr(_SIGN_OFF)
_EMPTY_TL = tl.constexpr(EMPTY)


@triton.jit
def _mix_tl(x):  # _mix_
    x = x ^ (x >> 31)
    x = x * _M_TL
    return x ^ (x >> 29)


@triton.jit
def _offset_tl(probe):  # _offset
    return probe * (probe + 1) // 2


@triton.jit
def _hash_rows(keys, rows, live, N: tl.constexpr):  # keys [Q, N] int64; rows, live [BLOCK] -> h, length
    length = tl.zeros_like(rows)
    for column in tl.static_range(N):
        length += (tl.load(keys + rows * N + column, mask=live, other=-1) >= 0).to(tl.int64)
    h = _mix_tl(length)
    for column in tl.static_range(N):
        key = tl.load(keys + rows * N + column, mask=live, other=-1)
        h = tl.where(key >= 0, _mix_tl(h * _P_TL + key + 1), h)
    return h & _SIGN_OFF_TL, length


@triton.jit
def _lookup_rows(
    key_ids,  # [C, N] int32
    values,  # [C] int32
    query,  # [BLOCK, N_POW2] int64 keys, -1 padded (also past N)
    h,  # [BLOCK] int64 their hashes
    live,  # [BLOCK] bool rows to look up
    C,
    N: tl.constexpr,
    N_POW2: tl.constexpr,
    MAX_PROBES: tl.constexpr,
):  # -> [BLOCK] int64: the value of each live row's key, or -1
    columns = tl.arange(0, N_POW2)
    in_key = columns[None, :] < N  # [1, N_POW2]
    value = tl.zeros_like(h) - 1
    open_ = live
    for probe in range(MAX_PROBES):
        if tl.max(open_.to(tl.int32), axis=0) > 0:
            slot = (h + _offset_tl(probe)) & (C - 1)
            stored = tl.load(
                key_ids + slot[:, None] * N + columns[None, :], mask=open_[:, None] & in_key, other=-1
            ).to(tl.int64)  # [BLOCK, N_POW2]
            match = open_ & (tl.sum((stored != query).to(tl.int32), axis=1) == 0)
            value = tl.where(match, tl.load(values + slot, mask=match, other=-1).to(tl.int64), value)
            first = tl.sum(tl.where(columns[None, :] == 0, stored, 0), axis=1)
            open_ = open_ & ~match & (first >= 0)
    return value


@triton.jit
def _ngram_lookup_kernel(
    key_ids,  # [C, N] int32
    values,  # [C] int32
    queries,  # [Q, N] int64
    found,  # [Q] int64 out
    Q,
    C,
    N: tl.constexpr,
    N_POW2: tl.constexpr,
    BLOCK: tl.constexpr,
    MAX_PROBES: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    live = rows < Q
    columns = tl.arange(0, N_POW2)
    in_key = columns[None, :] < N  # [1, N_POW2]
    query = tl.load(queries + rows[:, None] * N + columns[None, :], mask=live[:, None] & in_key, other=-1)
    h, _ = _hash_rows(queries, rows, live, N)
    value = _lookup_rows(key_ids, values, query, h, live, C, N, N_POW2, MAX_PROBES)
    tl.store(found + rows, value, mask=live)


@triton.jit
def _ngram_insert_kernel(
    hashes,  # [C] int64
    key_ids,  # [C, N] int32
    values,  # [C] int32
    counts,  # [C] int64
    keys,  # [Q, N] int64
    new_values,  # [Q] int64
    hits,  # [Q] int64
    dropped,  # [] int64 out, zeroed
    Q,
    C,
    N: tl.constexpr,
    N_POW2: tl.constexpr,
    BLOCK: tl.constexpr,
    MAX_PROBES: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    live = rows < Q
    columns = tl.arange(0, N_POW2)
    in_key = columns[None, :] < N
    h, length = _hash_rows(keys, rows, live, N)
    pending = live & (length >= 2)
    empty = tl.full([BLOCK], _EMPTY_TL, tl.int64)
    never = tl.full([BLOCK], _EMPTY_TL - 1, tl.int64)  # a CAS comparand no hash word holds: no swap
    for probe in range(MAX_PROBES):
        if tl.max(pending.to(tl.int32), axis=0) > 0:
            slot = (h + _offset_tl(probe)) & (C - 1)
            word = tl.load(hashes + slot, mask=pending, other=_EMPTY_TL)  # a hash seen here is final
            free = pending & (word == _EMPTY_TL)
            if tl.max(free.to(tl.int32), axis=0) > 0:
                old = tl.atomic_cas(hashes + slot, tl.where(free, empty, never), h, sem="relaxed")
                won = free & (old == _EMPTY_TL)
                key = tl.load(keys + rows[:, None] * N + columns[None, :], mask=won[:, None] & in_key)
                tl.store(
                    key_ids + slot[:, None] * N + columns[None, :],
                    key.to(tl.int32),
                    mask=won[:, None] & in_key,
                )
                tl.store(values + slot, tl.load(new_values + rows, mask=won).to(tl.int32), mask=won)
                word = tl.where(won, h, tl.where(free, old, word))
            settled = pending & (word == h)
            tl.atomic_add(counts + slot, tl.load(hits + rows, mask=settled), mask=settled, sem="relaxed")
            pending = pending & ~settled
    unplaced = tl.sum(pending.to(tl.int64), axis=0)
    if unplaced > 0:
        tl.atomic_add(dropped, unplaced, sem="relaxed")


def ngram_lookup_triton(
    key_ids: torch.Tensor,  # [C, N] int32, contiguous
    values: torch.Tensor,  # [C] int32
    queries: torch.Tensor,  # [Q, N] int64, -1 padded
) -> torch.Tensor:  # [Q] int64: the value, or -1
    capacity, n = key_ids.shape
    queries = queries.contiguous()
    found = torch.empty(queries.shape[0], dtype=torch.int64, device=queries.device)
    if queries.shape[0] == 0:
        return found
    grid = (triton.cdiv(queries.shape[0], _BLOCK),)
    _ngram_lookup_kernel[grid](
        key_ids, values, queries, found, queries.shape[0], capacity,
        N=n, N_POW2=triton.next_power_of_2(n), BLOCK=_BLOCK, MAX_PROBES=MAX_PROBES,
    )  # fmt: skip
    return found


def ngram_insert_triton(
    hashes: torch.Tensor,  # [C] int64, updated in place
    key_ids: torch.Tensor,  # [C, N] int32, contiguous, updated in place
    values: torch.Tensor,  # [C] int32, updated in place
    counts: torch.Tensor,  # [C] int64, updated in place
    keys: torch.Tensor,  # [Q, N] int64, -1 padded
    new_values: torch.Tensor,  # [Q] int64
    hits: torch.Tensor,  # [Q] int64
) -> torch.Tensor:  # [] int64: rows that found no slot (no host sync)
    capacity, n = key_ids.shape
    keys, new_values, hits = keys.contiguous(), new_values.contiguous(), hits.contiguous()
    dropped = torch.zeros((), dtype=torch.int64, device=keys.device)
    if keys.shape[0] == 0:
        return dropped
    grid = (triton.cdiv(keys.shape[0], _BLOCK),)
    _ngram_insert_kernel[grid](
        hashes, key_ids, values, counts, keys, new_values, hits, dropped, keys.shape[0], capacity,
        N=n, N_POW2=triton.next_power_of_2(n), BLOCK=_BLOCK, MAX_PROBES=MAX_PROBES,
    )  # fmt: skip
    return dropped
