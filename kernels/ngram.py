"""A GPU-resident open-addressing hash table from runs of drafter ids to a target id (OmniDraft, SPEC §2.2).

Layout (capacity ``C``, a power of two; ``N`` = the longest key):

    key_ids [C, N] int32   the stored key, -1 padded (key_ids[s, 0] == -1: slot s is empty)
    values  [C]    int32   the target id whose bytes are the concatenation of the key's tokens
    counts  [C]    int32   hits: how often the target emitted this token (least-frequently-used eviction)

A key of ``n`` ids (2 <= n <= N) hashes to ``h = mix(... mix(mix(n) * P + a_1 + 1) * P + a_2 + 1 ...)``
(64-bit wrap-around arithmetic, ``mix`` a xor-shift-multiply finaliser); it lives in the first slot of
``(h + i) mod C``, ``i = 0..MAX_PROBES-1``, that holds it or is empty (linear probing). The stored key
makes lookups exact whatever the hash collisions. Probing stops after ``MAX_PROBES`` slots; the owner
keeps the load factor near 1/2 (see ``omnidraft_fast/ngram.py``), where an insert needs more than 16
probes with negligible probability, and counts the inserts that could not be placed.
"""

from __future__ import annotations

import torch

__all__ = ["MAX_PROBES", "hash_keys_reference", "ngram_insert_reference", "ngram_lookup_reference"]

MAX_PROBES = 16
_P = 0x100000001B3  # FNV-1a 64-bit prime
_M = -0x40A7B892E31B1A47  # 0xBF58476D1CE4E5B9 (splitmix64) as a signed int64


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 31)
    x = x * _M
    return x ^ (x >> 29)


def hash_keys_reference(keys: torch.Tensor) -> torch.Tensor:  # keys [Q, N] int64, -1 padded -> [Q] int64
    """The 64-bit hash of each key (its length and ids)."""
    lengths = (keys >= 0).sum(-1)
    h = _mix(lengths.long())
    for column in range(keys.shape[1]):
        step = _mix(h * _P + keys[:, column] + 1)
        h = torch.where(keys[:, column] >= 0, step, h)
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
        slot = (h + probe) & (capacity - 1)
        stored = key_ids[slot].long()  # [Q, N]
        match = open_ & (stored == queries).all(-1)
        found = torch.where(match, values[slot].long(), found)
        open_ &= ~match & (stored[:, 0] >= 0)  # an empty slot ends the chain
        if not _more(open_):
            break
    return found


def ngram_insert_reference(
    key_ids: torch.Tensor,  # [C, N] int32, updated in place
    values: torch.Tensor,  # [C] int32, updated in place
    counts: torch.Tensor,  # [C] int32, updated in place
    keys: torch.Tensor,  # [Q, N] int64, -1 padded; rows shorter than 2 ids are ignored
    new_values: torch.Tensor,  # [Q] int64
    weights: torch.Tensor,  # [Q] int64 hits each row adds
) -> torch.Tensor:  # [] int64: keys that found no slot within MAX_PROBES
    """Insert or count each key; duplicate keys in one batch add up their weights."""
    capacity = key_ids.shape[0]
    keep = (keys >= 0).sum(-1) >= 2
    keys, new_values, weights = keys[keep], new_values[keep], weights[keep]
    unique, inverse = torch.unique(keys, dim=0, return_inverse=True)
    hits = torch.zeros(unique.shape[0], dtype=torch.int64, device=keys.device).index_add_(0, inverse, weights)
    unique_values = torch.zeros(unique.shape[0], dtype=torch.int64, device=keys.device)
    unique_values.scatter_(0, inverse, new_values)
    h = hash_keys_reference(unique)
    pending = torch.ones(unique.shape[0], dtype=torch.bool, device=keys.device)
    order = torch.arange(unique.shape[0], device=keys.device)
    for probe in range(MAX_PROBES):
        slot = (h + probe) & (capacity - 1)
        stored = key_ids[slot].long()
        match = pending & (stored == unique).all(-1)
        counts.index_add_(0, slot[match], hits[match].to(counts.dtype))
        pending &= ~match
        # Empty slots: the lowest-numbered pending key aiming at a slot claims it; the others probe on.
        empty = pending & (stored[:, 0] < 0)
        claimant = torch.full((capacity,), unique.shape[0], dtype=torch.int64, device=keys.device)
        claimant.scatter_reduce_(0, slot[empty], order[empty], reduce="amin")
        won = empty & (claimant[slot] == order)
        key_ids[slot[won]] = unique[won].to(key_ids.dtype)
        values[slot[won]] = unique_values[won].to(values.dtype)
        counts[slot[won]] = hits[won].to(counts.dtype)
        pending &= ~won
        if not _more(pending):
            break
    return pending.sum()


def _more(pending: torch.Tensor) -> bool:
    """Whether probing must go on. On the CPU, stop as soon as every key is resolved (a free check there);
    on a GPU the check would synchronise, so all MAX_PROBES steps run (the results are the same)."""
    return pending.device.type != "cpu" or bool(pending.any())
