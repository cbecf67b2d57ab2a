"""The n-gram hash-table kernels against their torch references (interpreted on CPU, compiled on CUDA)."""

from __future__ import annotations

import pytest
import torch
from omnidraft_fast.kernels.ngram import (
    EMPTY,
    MAX_PROBES,
    hash_keys_reference,
    ngram_insert_reference,
    ngram_insert_triton,
    ngram_lookup_reference,
    ngram_lookup_triton,
)

from omnidraft_fast import ops
from omnidraft_fast.ngram import NGramTable

pytestmark = pytest.mark.kernels
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _table(capacity: int, n: int = 4, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """(hashes, key_ids, values, counts) of an empty table."""
    return (
        torch.full((capacity,), EMPTY, dtype=torch.int64, device=device),
        torch.full((capacity, n), -1, dtype=torch.int32, device=device),
        torch.full((capacity,), -1, dtype=torch.int32, device=device),
        torch.zeros(capacity, dtype=torch.int64, device=device),
    )


def _random_keys(rows: int, n: int = 4, vocab: int = 6, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    """[rows, n] keys of 1..n ids (-1 padded), drawn from a small vocabulary so that many repeat."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randint(0, vocab, (rows, n), generator=generator)
    lengths = torch.randint(1, n + 1, (rows,), generator=generator)
    return torch.where(torch.arange(n) < lengths[:, None], keys, -1).to(device)


def _value_of(keys: torch.Tensor) -> torch.Tensor:  # one value per key, so duplicates agree
    return (hash_keys_reference(keys) % 1000).long()


def _entries(table: tuple[torch.Tensor, ...]) -> set[tuple]:
    """The table's contents as a set of (key, value, count), slots aside."""
    hashes, key_ids, values, counts = (t.cpu() for t in table)
    used = hashes != EMPTY
    assert torch.equal(used, key_ids[:, 0] >= 0)
    assert torch.equal(hashes[used], hash_keys_reference(key_ids[used].long()))
    return {
        (tuple(k), v, c)
        for k, v, c in zip(key_ids[used].tolist(), values[used].tolist(), counts[used].tolist(), strict=True)
    }


def _colliding_keys(capacity: int, count: int) -> torch.Tensor:
    """[count, 4] distinct keys whose probe sequences all start at the same slot."""
    candidates = torch.unique(_random_keys(20000, vocab=40, seed=1), dim=0)
    candidates = candidates[(candidates >= 0).sum(-1) >= 2]
    home = hash_keys_reference(candidates) & (capacity - 1)
    crowded = torch.bincount(home).argmax()
    chosen = candidates[home == crowded]
    assert chosen.shape[0] >= count
    return chosen[:count]


def test_lookup_matches_reference_present_absent_padded():
    table = _table(64)
    keys = _random_keys(60, seed=2)
    ngram_insert_reference(*table, keys, _value_of(keys), torch.ones(60, dtype=torch.int64))
    queries = torch.cat(
        [keys, _random_keys(40, seed=3), torch.full((3, 4), -1), torch.tensor([[5, -1, -1, -1]])]
    )
    found = ngram_lookup_triton(table[1], table[2], queries)
    assert torch.equal(found, ngram_lookup_reference(table[1], table[2], queries))
    long_enough = (keys >= 0).sum(-1) >= 2
    assert torch.equal(found[:60][long_enough], _value_of(keys)[long_enough])
    assert (found[:60][~long_enough] == -1).all() and (found[-4:] == -1).all()


def test_collisions_fill_the_probe_chain():
    table = _table(64)
    keys = _colliding_keys(64, MAX_PROBES + 2)
    values = torch.arange(keys.shape[0])
    ones = torch.ones(keys.shape[0], dtype=torch.int64)
    dropped = ngram_insert_triton(*table, keys, values, ones)
    assert dropped.shape == () and dropped.dtype == torch.int64 and int(dropped) == 2
    expected = _table(64)
    assert int(ngram_insert_reference(*expected, keys, values, ones)) == 2
    assert all(torch.equal(a, b) for a, b in zip(table, expected, strict=True))  # one program: same slots
    found = ngram_lookup_triton(table[1], table[2], keys)
    assert found.tolist() == [*range(MAX_PROBES), -1, -1]  # the last stored key sits at the last probe
    assert torch.equal(found, ngram_lookup_reference(table[1], table[2], keys))


@pytest.mark.parametrize("rows", [40, 700])  # one program; several (duplicates across programs)
def test_insert_matches_reference(rows):
    keys = _random_keys(rows, seed=4)
    values = _value_of(keys)
    hits = torch.randint(1, 5, (rows,), generator=torch.Generator().manual_seed(5))
    triton_table, reference_table = _table(1024), _table(1024)
    for batch in (slice(0, rows // 2), slice(rows // 4, rows)):  # the second batch repeats some keys
        dropped = ngram_insert_triton(*triton_table, keys[batch], values[batch], hits[batch])
        expected = ngram_insert_reference(*reference_table, keys[batch], values[batch], hits[batch])
        assert int(dropped) == int(expected) == 0
    entries = _entries(triton_table)
    assert entries == _entries(reference_table)
    # Every key once, with the hits of all its rows.
    stored = (keys >= 0).sum(-1) >= 2
    assert len(entries) == torch.unique(keys[stored], dim=0).shape[0]
    total = {}
    for key, repeat in zip(keys[: rows // 2].tolist() + keys[rows // 4 :].tolist(), torch.cat([hits[: rows // 2], hits[rows // 4 :]]).tolist(), strict=True):  # fmt: skip
        total[tuple(key)] = total.get(tuple(key), 0) + repeat
    assert all(count == total[key] for key, _, count in entries)
    assert torch.equal(ngram_lookup_triton(*triton_table[1:3], keys), torch.where(stored, values, -1))


def test_duplicates_in_one_batch_take_one_slot():
    keys = torch.tensor([[1, 2, -1, -1]] * 5 + [[2, 1, -1, -1], [1, 2, 3, -1], [2, 1, -1, -1]])
    table = _table(64)
    ngram_insert_triton(
        *table, keys, torch.tensor([7] * 5 + [8, 9, 8]), torch.tensor([1, 2, 3, 4, 5, 1, 1, 1])
    )
    assert _entries(table) == {((1, 2, -1, -1), 7, 15), ((2, 1, -1, -1), 8, 2), ((1, 2, 3, -1), 9, 1)}


def test_full_table_counts_rows_not_placed():
    keys = _colliding_keys(16, 20)  # 20 distinct keys, 16 slots
    for insert in (ngram_insert_triton, ngram_insert_reference):
        table = _table(16)
        dropped = insert(
            *table, torch.cat([keys, keys[-1:]]), torch.arange(21), torch.ones(21, dtype=torch.int64)
        )
        assert int(dropped) == 5 and len(_entries(table)) == 16  # 4 keys, one of them twice


def test_no_queries_and_no_keys_launch_nothing():
    """An empty batch returns at once, alike in kernel and reference: no value found, no row dropped, the
    table unchanged."""
    table = _table(16)
    keys = _random_keys(6)
    ngram_insert_triton(*table, keys, _value_of(keys), torch.ones(6, dtype=torch.int64))
    before = [t.clone() for t in table]
    none = torch.zeros(0, 4, dtype=torch.int64)
    for lookup in (ngram_lookup_triton, ngram_lookup_reference):
        assert lookup(table[1], table[2], none).shape == (0,)
    for insert in (ngram_insert_triton, ngram_insert_reference):
        dropped = insert(*table, none, none[:, 0], none[:, 0])
        assert dropped.shape == () and int(dropped) == 0
        assert all(torch.equal(a, b) for a, b in zip(before, table, strict=True))


def test_one_key_alone():
    """A batch of one key is a batch like any other: inserted alone it is stored, looked up alone it is found,
    and an absent key alone is -1 (kernel and reference alike)."""
    key, other = torch.tensor([[3, 1, 4, -1]]), torch.tensor([[2, 7, -1, -1]])
    for insert, lookup in ((ngram_insert_triton, ngram_lookup_triton), (ngram_insert_reference, ngram_lookup_reference)):  # fmt: skip
        table = _table(16)
        assert int(insert(*table, key, torch.tensor([9]), torch.tensor([2]))) == 0
        assert _entries(table) == {((3, 1, 4, -1), 9, 2)}
        assert lookup(table[1], table[2], key).tolist() == [9]
        assert lookup(table[1], table[2], other).tolist() == [-1]


def test_reference_has_fixed_shapes():
    """No data-dependent shape anywhere (so no host sync on a GPU): the references run on the meta device."""
    table = _table(64, device="meta")
    keys = torch.zeros(10, 4, dtype=torch.int64, device="meta")
    assert ngram_insert_reference(*table, keys, keys[:, 0], keys[:, 0]).shape == ()
    assert ngram_lookup_reference(table[1], table[2], keys).shape == (10,)


def test_loaded_table_rebuilds_its_hashes():
    table = NGramTable(32, 3)
    keys = torch.tensor([[1, 2, -1], [3, 4, 5], [0, 6, -1]])  # a key may begin with id 0
    table.insert(keys, torch.tensor([7, 8, 9]))
    other = NGramTable(32, 3)
    other.load_state_dict({name: tensor.clone() for name, tensor in table.state_dict().items()})
    assert torch.equal(other.hashes, table.hashes)
    other.insert(keys[::2], torch.tensor([7, 9]))  # found, not stored twice
    assert int(other.size()) == 3 and int(other.counts.sum()) == 5


# -- GPU: large tables, many concurrent inserts of overlapping keys ---------------------------------------
@gpu
@needs_cuda
@pytest.mark.parametrize("capacity", [1 << 16, 1 << 20])
def test_concurrent_inserts_and_lookups_at_half_load(capacity):
    device = "cuda"
    distinct = torch.unique(_random_keys(capacity, vocab=1000, seed=6), dim=0)
    distinct = distinct[(distinct >= 0).sum(-1) >= 2][: capacity // 2]  # load factor 1/2
    generator = torch.Generator().manual_seed(7)
    rows = torch.randint(0, distinct.shape[0], (4 * distinct.shape[0],), generator=generator)
    keys = distinct[rows].to(device)  # every key about 4 times, spread over all programs
    values, hits = _value_of(keys), torch.randint(1, 4, (keys.shape[0],), generator=generator).to(device)
    triton_table, reference_table = _table(capacity, device=device), _table(capacity, device=device)
    torch.cuda.set_sync_debug_mode("error")  # neither implementation may synchronise
    try:
        dropped = ops.ngram_insert(*triton_table, keys, values, hits)
        expected = ngram_insert_reference(*reference_table, keys, values, hits)
        found = ops.ngram_lookup(triton_table[1], triton_table[2], keys)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert int(dropped) == int(expected) == 0
    assert _entries(triton_table) == _entries(reference_table)
    assert torch.equal(found, values)
    queries = torch.cat([keys, _random_keys(100_000, vocab=1000, seed=8, device=device)])
    assert torch.equal(
        ngram_lookup_triton(triton_table[1], triton_table[2], queries),
        ngram_lookup_reference(triton_table[1], triton_table[2], queries),
    )


@gpu
@needs_cuda
def test_ngram_table_on_cuda_matches_cpu():
    keys = _random_keys(5000, vocab=30, seed=9)
    values = _value_of(keys)
    tables = {device: NGramTable(1 << 13, 4, device=device) for device in ("cpu", "cuda")}
    for device, table in tables.items():
        table.insert(keys.to(device), values.to(device))
        table.insert(keys[:2000].to(device), values[:2000].to(device))
    assert _entries(tuple(getattr(tables["cuda"], n) for n in ("hashes", "key_ids", "values", "counts"))) == (
        _entries(tuple(getattr(tables["cpu"], n) for n in ("hashes", "key_ids", "values", "counts")))
    )
    assert torch.equal(tables["cuda"].lookup(keys.cuda()).cpu(), tables["cpu"].lookup(keys))


def _crowded_batch(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rows`` keys for a 64-slot table, shuffled: up to MAX_PROBES + 2 colliding in one chain, the rest
    random; their values and hits."""
    crowded = min(rows // 2, MAX_PROBES + 2)
    keys = torch.cat([_colliding_keys(64, crowded), _random_keys(rows - crowded, seed=seed)])
    keys = keys[torch.randperm(rows, generator=torch.Generator().manual_seed(rows))]
    return keys, _value_of(keys), torch.arange(1, rows + 1)


@pytest.mark.parametrize("rows", [6, 80])
def test_insert_reference_claims_alike_row_against_row_and_through_a_buffer(monkeypatch, rows):
    """The insert reference finds which row claims a free slot row against row for a few keys and through
    a slot-indexed buffer for many: the same tables either way, slots included (crowded keys, duplicates,
    a table that already holds some of them, a chain that runs out)."""
    from omnidraft_fast.kernels import ngram

    keys, values, hits = _crowded_batch(rows, seed=5)
    tables = []
    for pairwise in (True, False):
        monkeypatch.setattr(ngram, "_pairwise", lambda _rows, _capacity, pairwise=pairwise: pairwise)
        table = _table(64)
        ngram_insert_reference(*table, keys[::3], values[::3], hits[::3])
        dropped = ngram_insert_reference(*table, keys, values, hits)
        tables.append((*table, dropped))
    assert (int(tables[0][-1]) > 0) == (rows > 2 * MAX_PROBES)
    assert all(torch.equal(a, b) for a, b in zip(*tables, strict=True))


@pytest.mark.parametrize("rows", [6, 80])
def test_insert_reference_early_exits_change_nothing(monkeypatch, rows):
    """On an eager CPU tensor the insert reference stops probing once every key settled, skips the claims
    of a probe where no key sees a free slot and, for many keys, probes on with the pending ones only
    (host.eager_cpu); forced to run every probe and claim on every key, it builds the same tables, slots
    included, over batches of keys present, new, duplicated and crowded."""
    from omnidraft_fast.kernels import ngram

    keys, values, hits = _crowded_batch(rows, seed=6)
    tables = []
    for eager in (True, False):
        monkeypatch.setattr(ngram, "eager_cpu", lambda tensor, eager=eager: eager)
        table, dropped = _table(64), []
        for batch in (slice(0, rows, 3), slice(0, rows // 2), slice(rows // 3, rows), slice(0, rows // 2)):
            dropped.append(ngram_insert_reference(*table, keys[batch], values[batch], hits[batch]))
        tables.append((*table, *dropped))
    assert all(torch.equal(a, b) for a, b in zip(*tables, strict=True))
