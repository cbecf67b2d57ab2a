"""The n-gram hash table (insert, lookup, duplicates, eviction, persistence) and OmniDraft's redistribution."""

from __future__ import annotations

import pytest
import torch
from omnidraft_fast.kernels.proposal import CrossProposal, target_proposal_reference

from omnidraft_fast import ops
from omnidraft_fast.ngram import NGramTable


def _keys(*runs, n=4):
    return torch.tensor([list(r) + [-1] * (n - len(r)) for r in runs])


def test_insert_lookup_and_duplicates_in_one_batch():
    table = NGramTable(64, 4)
    table.insert(
        _keys((1, 2), (1, 2), (3, 4, 5), (7,), (2, 1), (9, 9, 9, 9)), torch.tensor([10, 10, 11, 12, 13, 14])
    )
    assert int(table.size()) == 4  # (7,) is too short to be a key
    found = table.lookup(_keys((1, 2), (3, 4, 5), (7,), (2, 1), (1, 2, 3), (9, 9, 9, 9), (3, 4)))
    assert found.tolist() == [10, 11, -1, 13, -1, 14, -1]
    slot_of_12 = (table.values == 10).nonzero()[0, 0]
    assert int(table.counts[slot_of_12]) == 2  # the duplicate added its hit
    table.insert(_keys((1, 2)), torch.tensor([10]))
    assert int(table.counts[slot_of_12]) == 3 and int(table.size()) == 4


def test_many_keys_and_collisions_stay_exact():
    table = NGramTable(4096, 3)
    generator = torch.Generator().manual_seed(0)
    runs = torch.randint(0, 50, (1500, 3), generator=generator)
    runs[::3, 2] = -1  # some 2-grams
    runs = torch.unique(runs, dim=0)
    values = torch.arange(runs.shape[0])
    table.insert(runs, values)
    assert int(table.dropped) == 0
    assert torch.equal(table.lookup(runs), values)
    absent = runs.clone()
    absent[:, 0] += 1000
    assert (table.lookup(absent) == -1).all()


def test_eviction_keeps_the_most_used():
    table = NGramTable(16, 2)
    table.insert(_keys(*[(i, i + 1) for i in range(8)], n=2), torch.arange(8))
    table.insert(_keys((0, 1), (0, 1), (0, 1), (5, 6), (5, 6), n=2), torch.tensor([0, 0, 0, 5, 5]))
    table.evict()
    assert int(table.size()) == 4
    assert table.lookup(_keys((0, 1), (5, 6), n=2)).tolist() == [0, 5]
    assert int(table.counts.max()) == 2  # 4 hits, halved


def test_a_seeded_table_keeps_every_seed_through_eviction():
    """More seeds than a quarter of the asked capacity: the table grows so that eviction keeps them all."""
    generator = torch.Generator().manual_seed(1)
    t2ds = torch.randint(0, 30000, (5000, 5), generator=generator)
    t2ds_len = torch.randint(1, 6, (5000,), generator=generator)  # lengths 1 and 5 are not seeded
    t2ds = torch.where(torch.arange(5)[None, :] < t2ds_len[:, None], t2ds, -1)
    seeded = ((t2ds_len >= 2) & (t2ds_len <= 4)).nonzero()[:, 0]
    keys = t2ds[seeded, :4]
    assert torch.unique(keys, dim=0).shape[0] == len(seeded)
    table = NGramTable.seeded(1024, 4, t2ds, t2ds_len, "cpu")
    assert table.capacity >= 4 * len(seeded) and int(table.size()) == len(seeded) and int(table.dropped) == 0
    table.insert(keys[:100], seeded[:100])  # some seeds get used
    table.evict()
    assert torch.equal(table.lookup(keys), seeded)
    assert int(NGramTable.seeded(1 << 16, 4, t2ds, t2ds_len, "cpu").capacity) == 1 << 16  # enough already


def test_state_dict_round_trip():
    table = NGramTable(32, 3)
    table.insert(_keys((1, 2), (3, 4, 5), n=3), torch.tensor([7, 8]))
    other = NGramTable(32, 3)
    other.load_state_dict({name: tensor.clone() for name, tensor in table.state_dict().items()})
    assert other.lookup(_keys((1, 2), (3, 4, 5), n=3)).tolist() == [7, 8]
    with pytest.raises(ValueError, match="ngram_capacity"):
        NGramTable(64, 3).load_state_dict(table.state_dict())
    state = other.state_dict()
    for bad, message in (
        ({**state, "values": torch.tensor([5], dtype=torch.int32)}, "`values` is torch.int32 \\(1,\\)"),
        ({**state, "counts": state["counts"].double()}, "`counts` is torch.float64"),
        ({"key_ids": state["key_ids"], "values": state["values"]}, "expected \\['counts'"),
        ({**state, "hashes": torch.zeros(32, dtype=torch.int64)}, "'hashes'"),
    ):  # refused whole, before anything is copied
        with pytest.raises(ValueError, match=message):
            other.load_state_dict({name: tensor.clone() for name, tensor in bad.items()})
        assert other.lookup(_keys((1, 2), (3, 4, 5), (1, 3), n=3)).tolist() == [7, 8, -1]
        assert other.counts.sum() == 2


def test_keys_of_takes_whole_spellings_where_learned():
    """The learning step's keys: whole spellings (-1 after their ids) padded or cut to N ids, a -1 row where
    not learned (a position the round did not keep, a spelling cut to its width or longer than N); a row of
    one id stays, and inserts skip it as they skip -1 rows."""
    table = NGramTable(16, 4)
    spellings = torch.tensor([[1, 2, -1], [3, -1, -1], [1, 1, 1], [4, 4, 4], [1, 2, -1]])
    keys = table.keys_of(spellings, torch.tensor([True, True, False, True, False]))
    assert keys.tolist() == [[1, 2, -1, -1], [3, -1, -1, -1], [-1] * 4, [4, 4, 4, -1], [-1] * 4]
    table.insert(keys, torch.tensor([10, 11, 12, 14, 15]))
    assert int(table.size()) == 2 and int(table.counts.sum()) == 2 and int(table.dropped) == 0
    assert table.lookup(_keys((1, 2), (1, 1, 1), (4, 4, 4))).tolist() == [10, -1, 14]
    assert table.keys_of(torch.tensor([[5, 6, 7, 8, -1, -1]], dtype=torch.int32)).tolist() == [[5, 6, 7, 8]]


def test_counts_do_not_wrap_and_tiny_tables_keep_their_most_used_entry():
    table = NGramTable(4, 2)  # eviction keeps one entry: the hottest, whose count is past int32's range
    table.insert(_keys((1, 2), (3, 4), n=2), torch.tensor([7, 8]), torch.tensor([2**31 - 1, 5]))
    table.insert(_keys((1, 2), n=2), torch.tensor([7]), torch.tensor([2**32 + 3]))
    assert int(table.counts.max()) == 2**31 - 1 + 2**32 + 3
    table.evict()
    assert table.lookup(_keys((1, 2), (3, 4), n=2)).tolist() == [7, -1]
    for capacity in (1, 2):  # the engine evicts past half full: the most used entry stays
        table = NGramTable(capacity, 2)
        table.insert(_keys(*[(i, i + 1) for i in range(capacity)], n=2), torch.arange(capacity),
                     torch.arange(capacity) + 1)  # fmt: skip
        table.evict()
        assert int(table.size()) == 1 and table.lookup(_keys((capacity - 1, capacity), n=2)).tolist() == [
            capacity - 1
        ]


def test_bad_table_arguments():
    with pytest.raises(ValueError, match="ngram_capacity"):
        NGramTable(0)
    with pytest.raises(ValueError, match="ngram_max_len"):
        NGramTable(16, 1)


def test_redistribution_hand_computed():
    """Drafter vocab: 0 'snow', 1 'f', 2 'la', 3 'ke', 4 'x'; target vocab: 0 'snow', 1 'flake', 2 'f', 3 'y'.
    The drafted run snow, f, la, ke merges to snow, flake; 'la' and 'ke' do not map directly."""
    d2t = torch.tensor([0, 2, -1, -1, -1], dtype=torch.int32)
    table = NGramTable(16, 3)
    table.insert(_keys((1, 2, 3), n=3), torch.tensor([1]))
    draft = torch.tensor([[0, 1, 2, 3]])
    q = torch.tensor(
        [
            [
                [0.6, 0.2, 0.1, 0.05, 0.05],
                [0.1, 0.5, 0.2, 0.1, 0.1],
                [0.1, 0.1, 0.4, 0.2, 0.2],
                [0.0, 0.1, 0.1, 0.8, 0.0],
            ]
        ]
    )
    ids, lengths, source, span_end = ops.translate(draft, d2t, table=table.tensors)
    assert ids.tolist() == [[0, 1, -1, -1]] and lengths.tolist() == [2]
    assert source[0, :2].tolist() == [0, 1] and span_end[0, :2].tolist() == [1, 4]
    t2d = torch.tensor([0, -1, 1, -1], dtype=torch.int32)  # snow <- 0, f <- 1
    q_t = target_proposal_reference(q, ids, CrossProposal(draft, source, span_end, d2t, t2d))
    # Position 0: direct map of q_0: snow 0.6, f 0.2.
    torch.testing.assert_close(q_t[0, 0], torch.tensor([0.6, 0.0, 0.2, 0.0]))
    # Position 1 (merge of f, la, ke from drafter positions 1..3): flake gets 0.5 * 0.4 * 0.8 = 0.16, taken
    # from 'f' (0.5 - 0.16 = 0.34); 'snow' keeps its direct value 0.1.
    torch.testing.assert_close(q_t[0, 1], torch.tensor([0.1, 0.16, 0.34, 0.0]))
    assert (q_t[0, 2:] == 0).all()
    # Without the table the draft stops at 'la' (no direct map).
    ids, lengths, _, _ = ops.translate(draft, d2t)
    assert ids.tolist() == [[0, 2, -1, -1]] and lengths.tolist() == [2]


def test_merges_raise_acceptance_where_the_target_wants_the_merged_token():
    """The target's greedy choices are snow, flake, y: with merges the drafted run is accepted up to
    flake; with the direct map only, 'f' is proposed where the target wants 'flake' and is rejected."""
    d2t = torch.tensor([0, 2, -1, -1, -1], dtype=torch.int32)
    table = NGramTable(16, 3)
    table.insert(_keys((1, 2, 3), n=3), torch.tensor([1]))
    draft = torch.tensor([[0, 1, 2, 3]])
    q = torch.nn.functional.one_hot(draft, 5).float()
    wanted = torch.tensor([[0, 1, 3, 3, 3]])  # target argmax per position
    target_logits = torch.nn.functional.one_hot(wanted, 4).float() * 10
    accepted = {}
    t2d = torch.tensor([0, -1, 1, -1], dtype=torch.int32)
    for name, kwargs in (("direct", {}), ("merged", {"table": table.tensors})):
        ids, _, source, span_end = ops.translate(draft, d2t, **kwargs)
        cross = CrossProposal(draft, source, span_end, d2t, t2d)
        n, out, *_ = ops.verify(target_logits, ids, q, torch.zeros(1, 4), None, temperature=0.0, cross=cross)
        accepted[name] = int(n[0])
        assert out[0, int(n[0])] == wanted[0, int(n[0])]
    assert accepted == {"direct": 1, "merged": 2}


def test_insert_refuses_what_it_would_truncate_and_names_its_own_arguments():
    """Float values would be cut to ints and a short ``values`` misread: refused under the table's own names,
    and the table is unchanged; integer tensors of any width are taken."""
    table = NGramTable(16, 2)
    keys = _keys((1, 2), (3, 4), n=2)
    for values, hits, error, match in (
        (torch.tensor([7.5, 8.0]), None, TypeError, "`values` must be a 1-D integer tensor"),
        (torch.tensor([7]), None, ValueError, r"`values` and `hits` must have one entry per key \(2\)"),
        (torch.tensor([7, 8]), torch.tensor([1]), ValueError, "one entry per key"),
        ([7, 8], None, TypeError, "`values` must be a 1-D integer tensor"),
        (torch.tensor([7, 8]), torch.tensor([1.5, 2.0]), TypeError, "`hits` must be a 1-D integer tensor"),
    ):
        with pytest.raises(error, match=match):
            table.insert(keys, values, hits)
    with pytest.raises(TypeError, match="`keys` must be a 2-D integer tensor"):
        table.insert(keys.float(), torch.tensor([7, 8]))
    assert int(table.size()) == 0
    table.insert(keys.int(), torch.tensor([7, 8], dtype=torch.int32), torch.tensor([1, 2], dtype=torch.int16))
    assert table.lookup(keys).tolist() == [7, 8] and table.counts.sum().item() == 3


@pytest.mark.parametrize(("capacity", "max_len"), [(10**12, 4), (2**70, 2), (16, 10**12)])
def test_a_table_larger_than_the_device_is_refused_by_name(capacity, max_len):
    """Sizes whose tensors outgrow the device's memory: an error naming both settings, not the allocator's."""
    with pytest.raises(
        ValueError, match=rf"`ngram_capacity`={capacity} with `ngram_max_len`={max_len} needs"
    ):
        NGramTable(capacity, max_len)


@pytest.mark.parametrize(("capacity", "max_len"), [(100, 3), (16, 2), (1, 7)])
def test_the_size_checked_is_the_tables_size(monkeypatch, capacity, max_len):
    """The bytes a table is checked against the device's memory for are those of the tensors it allocates
    (hashes, key ids, values, counts at the rounded-up capacity), so a table that fits is never refused."""
    import omnidraft_fast.ngram

    asked = []
    monkeypatch.setattr(
        omnidraft_fast.ngram, "check_fits", lambda setting, needed, what, devices: asked.append(needed)
    )
    table = NGramTable(capacity, max_len)
    tensors = (table.hashes, table.key_ids, table.values, table.counts)
    assert asked == [sum(t.numel() * t.element_size() for t in tensors)]


def test_free_slots_hold_the_free_layout_and_look_up_nothing():
    """A new table, and the slots an eviction clears, hold the free layout of ``kernels/ngram.py`` (hash word
    EMPTY, key ids and value -1, count 0), so a query of no ids (all -1) or of one id, which no insert stores,
    looks up -1; the entries an eviction keeps have their counts halved, but at least 1."""
    from omnidraft_fast.kernels.ngram import EMPTY

    table = NGramTable(16, 3)
    for free_slots in (16, 14):  # new; after an insert of two keys and an eviction
        free = table.key_ids[:, 0] < 0
        assert int(free.sum()) == free_slots
        assert (table.hashes[free] == EMPTY).all() and (table.key_ids[free] == -1).all()
        assert (table.values[free] == -1).all() and (table.counts[free] == 0).all()
        if free_slots == 16:
            table.insert(_keys((1, 2), (3, 4), (5,), n=3), torch.tensor([7, 8, 9]), torch.tensor([5, 1, 1]))
            table.evict()  # keeps a quarter of 16 slots: both entries, counts 5 // 2 and max(1 // 2, 1)
            assert sorted(table.counts[table.key_ids[:, 0] >= 0].tolist()) == [1, 2]
        assert table.lookup(_keys((), (5,), (1, 2), n=3)).tolist() == [-1, -1, 7]


def test_dropped_counts_the_keys_a_full_table_could_not_place():
    """``dropped`` counts up the inserted keys that found no slot: 20 distinct keys into 16 slots (whose
    probe chains visit every slot) leave 4 out, and a second such insert 4 more."""
    table = NGramTable(16, 2)
    keys = _keys(*((a, b) for a in range(4) for b in range(5)), n=2)
    table.insert(keys, torch.arange(20))
    assert int(table.size()) == 16 and int(table.dropped) == 4
    table.insert(keys, torch.arange(20))
    assert int(table.dropped) == 8


@pytest.mark.parametrize(("seeds", "slots"), [(4, 16), (5, 32)])
def test_a_seeded_table_has_four_slots_per_seed(seeds, slots):
    """The seeds are the spellings of 2..max_len drafter ids (not those of one id, nor longer ones), and the
    table has at least 4 slots per seed (rounded up to a power of two): 4 seeds 16 slots, 5 seeds 32."""
    spellings = [[6], [1, 2, 3, 4, 5], [4], *[[1, 2], [3, 4, 5], [7, 8], [2, 1], [9, 9, 9, 9]][:seeds]]
    t2ds = torch.tensor([s + [-1] * (5 - len(s)) for s in spellings], dtype=torch.int32)
    t2ds_len = torch.tensor([len(s) for s in spellings], dtype=torch.int32)
    table = NGramTable.seeded(2, 4, t2ds, t2ds_len, "cpu")
    assert table.capacity == slots and int(table.size()) == seeds
    seeded = [i for i, s in enumerate(spellings) if 2 <= len(s) <= 4]
    assert table.lookup(table.keys_of(t2ds[seeded])).tolist() == seeded
