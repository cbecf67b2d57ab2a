"""NGramTable: the hashed table of drafter-id runs that merge into one target token, as an object.

The table lives on the engine's device (the kernels in ``kernels/ngram.py`` are its operations) and is
filled online: after each verification every emitted target token whose drafter spelling has 2..N
tokens is inserted with one more hit. It can be pre-seeded with the spellings of every target token.
Capacity is fixed; when more than half the slots are used, the least frequently used half is evicted
and the survivors' counts are halved (LFU with ageing), between rounds, so eviction never blocks decoding.
"""

from __future__ import annotations

import torch

from . import ops
from .kernels.ngram import EMPTY, hash_keys_reference
from .memory import check_fits

__all__ = ["NGramTable"]


class NGramTable:
    """Open-addressing hash table: runs of 2..``max_len`` drafter ids -> target id, with hit counts.

    Args:
        capacity: slots; rounded up to a power of two.
        max_len: the longest drafter-id run stored (N, default 4).
        device: where the table lives.
    """

    def __init__(self, capacity: int = 1 << 16, max_len: int = 4, device: torch.device | str = "cpu"):
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"`ngram_capacity` must be an int >= 1, got {capacity!r}")
        if not isinstance(max_len, int) or max_len < 2:
            raise ValueError(f"`ngram_max_len` must be an int >= 2 (runs of 2+ drafter ids), got {max_len!r}")
        slots = 1 << (capacity - 1).bit_length()
        check_fits(
            f"`ngram_capacity`={capacity} with `ngram_max_len`={max_len}",
            slots * (8 + 4 * max_len + 4 + 8),  # the four tensors below, per slot
            f"the n-gram table ({slots:,} slots of {max_len} int32 ids, a value, a hash and a count)",
            (device,),
        )
        capacity = slots
        self.max_len = max_len
        self.hashes = torch.full((capacity,), EMPTY, dtype=torch.int64, device=device)  # insert claim words
        self.key_ids = torch.full((capacity, max_len), -1, dtype=torch.int32, device=device)
        self.values = torch.full((capacity,), -1, dtype=torch.int32, device=device)
        self.counts = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.dropped = torch.zeros((), dtype=torch.int64, device=device)  # inserts that found no slot

    @property
    def capacity(self) -> int:
        return self.key_ids.shape[0]

    def size(self) -> torch.Tensor:  # [] int64 on the table's device (no host sync)
        return (self.key_ids[:, 0] >= 0).sum()

    def insert(self, keys: torch.Tensor, values: torch.Tensor, hits: torch.Tensor | None = None) -> None:
        """Insert runs ``keys`` [Q, max_len] (-1 padded; rows of fewer than 2 ids are skipped) -> ``values``
        [Q], adding ``hits`` [Q] (default 1 each) to their counts. Integer tensors of any width."""
        for name, tensor, ndim in (("keys", keys, 2), ("values", values, 1), ("hits", hits, 1)):
            if tensor is None and name == "hits":
                continue
            if not isinstance(tensor, torch.Tensor) or tensor.ndim != ndim or tensor.is_floating_point():
                got = (
                    f"{tensor.dtype} {tuple(tensor.shape)}"
                    if isinstance(tensor, torch.Tensor)
                    else type(tensor)
                )
                raise TypeError(f"`{name}` must be a {ndim}-D integer tensor, got {got}")
        if values.shape[0] != keys.shape[0] or (hits is not None and hits.shape != values.shape):
            raise ValueError(
                f"`values` and `hits` must have one entry per key ({keys.shape[0]}), got {values.shape[0]} "
                f"and {None if hits is None else hits.shape[0]}"
            )
        hits = torch.ones_like(values, dtype=torch.int64) if hits is None else hits.long()
        self.dropped += ops.ngram_insert(
            self.hashes, self.key_ids, self.values, self.counts, keys.long(), values.long(), hits
        )

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What a lookup reads: ``(key_ids, values)`` (``ops.ngram_lookup``, ``ops.translate``'s table)."""
        return self.key_ids, self.values

    def lookup(self, queries: torch.Tensor) -> torch.Tensor:
        """Target id of each run in ``queries`` [Q, max_len], or -1."""
        return ops.ngram_lookup(*self.tensors, queries)

    def evict(self) -> None:
        """Keep the most used entries, a quarter of the capacity and at least one (about half of them when
        the engine evicts, past half full), counts halved, rehashed into a cleared table."""
        used = torch.nonzero(self.key_ids[:, 0] >= 0)[:, 0]
        keep = used[
            torch.argsort(self.counts[used], descending=True, stable=True)[: max(1, self.capacity // 4)]
        ]
        keys, values, counts = self.key_ids[keep].long(), self.values[keep].long(), self.counts[keep]
        self.hashes.fill_(EMPTY)
        self.key_ids.fill_(-1)
        self.values.fill_(-1)
        self.counts.zero_()
        self.insert(keys, values, torch.clamp_min(counts // 2, 1))

    @classmethod
    def seeded(
        cls,
        capacity: int,
        max_len: int,
        t2ds: torch.Tensor,
        t2ds_len: torch.Tensor,
        device: torch.device | str,
    ) -> NGramTable:
        """A table pre-seeded with the drafter spelling of every target token spelled by 2..max_len drafter ids
        (``VocabBridge.t2ds``), with at least ``capacity`` slots and at least 4 per seed: the seeds then fill
        under a quarter of it, which every eviction keeps, where a smaller table would drop seeds at the
        first eviction by hash order alone (all start at one hit; 117k of them for a Qwen target)."""
        ids = torch.nonzero((t2ds_len >= 2) & (t2ds_len <= max_len))[:, 0]
        table = cls(max(capacity, 4 * len(ids)), max_len, device)
        table.insert(table.keys_of(t2ds[ids]), ids.long())
        return table

    def keys_of(self, spellings: torch.Tensor, learn: torch.Tensor | None = None) -> torch.Tensor:
        """[Q, max_len] keys from whole spellings [Q, width] of at most max_len ids each, -1 after their ids (as
        ``VocabBridge.t2ds`` holds them, and ``Rounds.spell`` gives a spelling its width holds whole): each
        row's ids, -1 padded to max_len; a -1 row where ``learn`` [Q] (bool; None: every row) is False. A row
        of one id stays: inserts skip rows of fewer than 2 ids, as they skip -1 rows."""
        width = spellings.shape[1]
        if width < self.max_len:
            spellings = torch.nn.functional.pad(spellings, (0, self.max_len - width), value=-1)
        keys = spellings[:, : self.max_len].long()
        return keys if learn is None else torch.where(learn[:, None], keys, -1)

    # -- persistence ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The entries, slot by slot; ``hashes`` derive from ``key_ids`` and are rebuilt on load."""
        return {"key_ids": self.key_ids, "values": self.values, "counts": self.counts}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load ``state_dict()``'s entries, all checked before any is copied (a refused state leaves the table
        as it was)."""
        own = self.state_dict()
        if set(state) != set(own):
            raise ValueError(
                f"saved n-gram table has entries {sorted(state)}, expected {sorted(own)}: load a file "
                "written by the engine's save_state"
            )
        for name, tensor in state.items():
            if tensor.shape != own[name].shape or tensor.dtype.is_floating_point or tensor.is_complex():
                raise ValueError(
                    f"saved n-gram table's `{name}` is {tensor.dtype} {tuple(tensor.shape)}, this table's "
                    f"{own[name].dtype} {tuple(own[name].shape)}: build the engine with the same "
                    "ngram_capacity and ngram_max_len"
                )
        for name, tensor in state.items():
            own[name].copy_(tensor)
        used = self.key_ids[:, 0] >= 0
        self.hashes.copy_(torch.where(used, hash_keys_reference(self.key_ids.long()), EMPTY))
