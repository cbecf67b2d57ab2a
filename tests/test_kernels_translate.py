"""The translation kernel (direct map, and longest-match n-gram merges) against its torch references
(interpreted on CPU, compiled on CUDA)."""

from __future__ import annotations

import pytest
import torch
from omnidraft_fast.kernels.ngram import EMPTY, ngram_insert_reference, ngram_insert_triton
from omnidraft_fast.kernels.translate import (
    split_reference,
    translate_ngram_reference,
    translate_reference,
    translate_triton,
)

from omnidraft_fast import ops

pytestmark = pytest.mark.kernels
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
V_D, V_T = 12, 40  # drafter ids are drawn from a small vocabulary, so that drafted runs repeat


def _d2t(seed: int, vocab: int = V_D, unmapped: float = 0.3, device: str = "cpu") -> torch.Tensor:
    """[vocab] int32: a direct map with about ``unmapped`` of the drafter ids mapping to nothing (-1)."""
    generator = torch.Generator().manual_seed(seed)
    d2t = torch.randint(0, V_T, (vocab,), generator=generator, dtype=torch.int32)
    return torch.where(torch.rand(vocab, generator=generator) < unmapped, -1, d2t).to(device)


def _empty(capacity: int, n_max: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """(hashes, key_ids, values, counts) of an empty table."""
    return (
        torch.full((capacity,), EMPTY, dtype=torch.int64, device=device),
        torch.full((capacity, n_max), -1, dtype=torch.int32, device=device),
        torch.full((capacity,), -1, dtype=torch.int32, device=device),
        torch.zeros(capacity, dtype=torch.int32, device=device),
    )


def _table(
    drafts: torch.Tensor,  # [batch, k] int64
    n_max: int,
    capacity: int,
    windows: int,
    random: int,
    seed: int,
    vocab: int = V_D,
    insert=ngram_insert_reference,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(key_ids, values) holding runs of 2..n_max ids: ``windows`` random windows of the drafts (so that
    nested and overlapping runs are present) and ``random`` random runs over ``vocab``."""
    generator = torch.Generator().manual_seed(seed)
    batch, k = drafts.shape
    keys = windows + random
    lengths = torch.randint(2, n_max + 1, (keys,), generator=generator)
    rows = torch.randint(0, batch, (windows,), generator=generator)
    starts = (torch.rand(windows, generator=generator) * (k - lengths[:windows] + 1).clamp_min(1)).long()
    columns = torch.arange(n_max)
    runs = torch.cat(
        [
            drafts.cpu()[rows[:, None], (starts[:, None] + columns).clamp_max(k - 1)],
            torch.randint(0, vocab, (random, n_max), generator=generator),
        ]
    )
    runs = torch.where(columns < lengths[:, None], runs, -1).to(drafts.device)
    table = _empty(capacity, n_max, drafts.device)
    new_values = torch.randint(0, V_T, (keys,), generator=generator).to(drafts.device)
    insert(*table, runs, new_values, torch.ones_like(new_values))
    return table[1:3]


def _assert_same(got, expected) -> None:
    for name, a, b in zip(("target_ids", "lengths", "source", "span_end"), got, expected, strict=True):
        assert a.dtype == b.dtype == torch.int64 and torch.equal(a, b), name


def _drafts(batch: int, k: int, seed: int, device: str = "cpu") -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, V_D, (batch, k), generator=generator).to(device)


@pytest.mark.parametrize(
    ("batch", "k", "n_max"),
    [(1, 1, 2), (3, 1, 4), (5, 3, 4), (2, 3, 3), (4, 8, 4), (1, 8, 2), (3, 8, 6), (2, 8, 8)],
)
def test_matches_reference(batch, k, n_max):
    drafts, d2t = _drafts(batch, k, seed=k), _d2t(seed=batch)
    table = _table(drafts, n_max, capacity=64, windows=12, random=12, seed=batch + k)
    got = translate_triton(drafts, d2t, *table)
    _assert_same(got, translate_ngram_reference(drafts, d2t, *table))
    _assert_same(translate_triton(drafts, d2t), translate_reference(drafts, d2t))
    if k > 1:  # the cases exercise merges
        assert ((got[3] - got[2]) >= 2).any()


def test_crowded_table_and_early_stops():
    """A table past its load limit (long probe chains, keys that found no slot) and a direct map that
    leaves most ids unmapped, so that rows stop early, some at position 0."""
    drafts, d2t = _drafts(5, 8, seed=3), _d2t(seed=4, unmapped=0.7)
    table = _table(drafts, 4, capacity=16, windows=20, random=20, seed=5)
    assert (table[0][:, 0] >= 0).all()  # full
    got = translate_triton(drafts, d2t, *table)
    _assert_same(got, translate_ngram_reference(drafts, d2t, *table))
    assert (got[1] == 0).any() and ((got[3] - got[2]) >= 2).any()


def test_hand_written():
    """Drafter: 0 'snow', 1 'f', 2 'la', 3 'ke', 4 's'; target: 0 'snow', 1 'flake', 2 'f', 3 'fla', 4 'kes'.
    Nested runs (f la < f la ke): the longest wins; an overlapping run (ke s) loses to the earlier merge."""
    d2t = torch.tensor([0, 2, -1, -1, -1], dtype=torch.int32)
    keys = torch.tensor([[1, 2, -1], [1, 2, 3], [3, 4, -1]])
    full = _empty(16, 3)
    ngram_insert_reference(*full, keys, torch.tensor([3, 1, 4]), torch.ones(3, dtype=torch.int64))
    table = full[1:3]
    drafts = torch.tensor([[0, 1, 2, 3, 4], [1, 2, 0, 3, 4], [2, 0, 0, 0, 0]])
    expected = (
        torch.tensor([[0, 1, -1, -1, -1], [3, 0, 4, -1, -1], [-1] * 5]),
        torch.tensor([2, 3, 0]),
        torch.tensor([[0, 1, 4, 4, 4], [0, 2, 3, 4, 4], [0] * 5]),
        # Past the proposals, the stop: one drafter token wide where a drafted token does not translate
        # ('s' at 4 in row 0, 'la' at 0 in row 2), none where the draft ran out (row 1).
        torch.tensor([[1, 4, 5, 4, 4], [2, 3, 5, 4, 4], [1, 0, 0, 0, 0]]),
    )
    for translate in (translate_triton, translate_ngram_reference):
        _assert_same(translate(drafts, d2t, *table), expected)
    _assert_same(ops.translate(drafts, d2t, table=table), expected)
    direct = (
        torch.tensor([[0, 2, -1, -1, -1], [2, -1, -1, -1, -1], [-1] * 5]),
        torch.tensor([2, 1, 0]),
        torch.tensor([[0, 1, 2, 2, 2], [0, 1, 1, 1, 1], [0] * 5]),
        torch.tensor([[1, 2, 3, 2, 2], [1, 2, 1, 1, 1], [1, 0, 0, 0, 0]]),
    )
    _assert_same(translate_triton(drafts, d2t), direct)
    _assert_same(ops.translate(drafts, d2t), direct)


@pytest.mark.parametrize("la", [2, 0], ids=["la_2", "la_0"])
def test_split_tokens_hand_written(la, monkeypatch):
    """The snowflake vocabularies, with target tokens 5 'l', 6 'a', 7 'k', 8 'e' (V_t = 9): 'la' and 'ke'
    have no twin but split into two target tokens each; 's' has neither. Merges still win over splits, a
    split goes on drafting, pieces are cut at k positions, and a token with no spelling still stops. Also
    with 'la' and 'snow' swapped, so that drafter id 0 splits (its marker is V_t itself), through the CPU
    shortcut's check and the general path alike."""
    import omnidraft_fast.kernels.translate as translate_module

    vocab_t = 9
    relabel = torch.tensor([la, 1, 2 - la, 3, 4])  # old drafter id -> new (identity, or 0 and 2 swapped)
    old_units = torch.tensor([0, 2, vocab_t + 2, vocab_t + 3, -1])
    old_units = torch.where(
        old_units >= vocab_t, vocab_t + relabel[(old_units - vocab_t).clamp_min(0)], old_units
    )
    units = torch.empty(5, dtype=torch.int32)
    units[relabel] = old_units.int()
    d2ts, d2ts_len = torch.empty(5, 2, dtype=torch.int32), torch.empty(5, dtype=torch.int32)
    d2ts[relabel] = torch.tensor([[0, -1], [2, -1], [5, 6], [7, 8], [-1, -1]], dtype=torch.int32)
    d2ts_len[relabel] = torch.tensor([1, 1, 2, 2, 0], dtype=torch.int32)
    full = _empty(16, 3)
    keys = torch.tensor([[1, 2, -1], [1, 2, 3], [3, 4, -1]])
    ngram_insert_reference(*full, torch.where(keys >= 0, relabel[keys.clamp_min(0)], -1), torch.tensor([3, 1, 4]),
                           torch.ones(3, dtype=torch.int64))  # fmt: skip
    table = full[1:3]
    drafts = relabel[torch.tensor([[0, 1, 2, 3, 4], [2, 0, 3, 3, 0], [2, 2, 2, 4, 0], [4, 0, 0, 0, 0]])]
    expected = (
        torch.tensor([[0, 1, -1, -1, -1], [5, 6, 0, 7, 8], [5, 6, 5, 6, 5], [-1] * 5]),
        torch.tensor([2, 5, 5, 0]),
        torch.tensor([[0, 1, 4, 4, 4], [0, 0, 1, 2, 2], [0, 0, 1, 1, 2], [0] * 5]),
        torch.tensor([[1, 4, 5, 4, 4], [0, 1, 2, 2, 3], [0, 1, 1, 2, 2], [1, 0, 0, 0, 0]]),
    )
    for translate in (translate_triton, translate_ngram_reference):
        ids, _, source, span_end = translate(drafts, units, *table)
        _assert_same(split_reference(ids, source, span_end, d2ts, d2ts_len, vocab_t), expected)
    _assert_same(ops.translate(drafts, units, table=table, splits=(d2ts, d2ts_len, vocab_t)), expected)
    # Without a table (direct map and splits only) the row with no merge translates the same.
    ids, _, source, span_end = translate_reference(drafts[1:2], units)
    got = split_reference(ids, source, span_end, d2ts, d2ts_len, vocab_t)
    _assert_same(got, tuple(t[1:2] for t in expected))
    # row 2's only split is 'la': with la_0, its marker is V_t itself, which the CPU shortcut must see
    only_la = ops.translate(drafts[2:3], units, table=table, splits=(d2ts, d2ts_len, vocab_t))
    _assert_same(only_la, tuple(t[2:3] for t in expected))
    monkeypatch.setattr(translate_module, "eager_cpu", lambda tensor: False)  # the general path
    _assert_same(ops.translate(drafts, units, table=table, splits=(d2ts, d2ts_len, vocab_t)), expected)


def test_a_block_without_split_markers_is_its_own_write_out(monkeypatch):
    """split_reference on a translation with no marker (no split drafted: most rounds) returns the
    translation as it is, stops included; its CPU shortcut, which skips the layout for such a block, gives
    the general path's outputs bit for bit."""
    import omnidraft_fast.kernels.translate as translate_module

    d2ts = torch.randint(0, V_T, (V_D, 3), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    d2ts_len = torch.randint(1, 4, (V_D,), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    cases = []
    for seed in range(60):
        batch, k, n_max = 1 + seed % 4, 1 + seed % 7, 2 + seed % 3
        drafts, d2t = _drafts(batch, k, seed=seed), _d2t(seed=seed, unmapped=0.2)
        drafted = torch.randint(0, k + 1, (batch,), generator=torch.Generator().manual_seed(seed))
        drafted = drafted if seed % 2 else None
        if seed % 3:
            table = _table(drafts, n_max, capacity=64, windows=6, random=6, seed=seed)
            cases.append(translate_ngram_reference(drafts, d2t, *table, drafted=drafted))
        else:
            cases.append(translate_reference(drafts, d2t, drafted=drafted))
    shortcut = [split_reference(ids, source, end, d2ts, d2ts_len, V_T) for ids, _, source, end in cases]
    monkeypatch.setattr(translate_module, "eager_cpu", lambda tensor: False)
    for case, got in zip(cases, shortcut, strict=True):
        ids, _, source, end = case
        _assert_same(got, case)
        _assert_same(split_reference(ids, source, end, d2ts, d2ts_len, V_T), case)


def test_a_row_translates_only_its_own_draft():
    """``drafted``: row 0 drafted 2 of 4 tokens, so the merge [1, 2] (it would end past them) gives way to
    the direct map of 1, and the draft runs out after it; row 1 stops at 'la' inside its 3 tokens; row 2
    drafted nothing. The snowflake vocabularies of ``test_hand_written``."""
    d2t = torch.tensor([0, 2, -1, -1, -1], dtype=torch.int32)
    full = _empty(16, 3)
    ngram_insert_reference(
        *full, torch.tensor([[1, 2, -1]]), torch.tensor([3]), torch.ones(1, dtype=torch.int64)
    )
    table = full[1:3]
    drafts = torch.tensor([[0, 1, 2, 0], [0, 0, 2, 0], [0, 1, 2, 0]])
    drafted = torch.tensor([2, 3, 0])
    expected = (
        torch.tensor([[0, 2, -1, -1], [0, 0, -1, -1], [-1] * 4]),
        torch.tensor([2, 2, 0]),
        torch.tensor([[0, 1, 2, 2], [0, 1, 2, 2], [0] * 4]),
        torch.tensor([[1, 2, 2, 2], [1, 2, 3, 2], [0] * 4]),
    )
    for translate in (translate_triton, translate_ngram_reference):
        _assert_same(translate(drafts, d2t, *table, drafted=drafted), expected)
    for translate in (translate_triton, translate_reference):
        _assert_same(translate(drafts, d2t, drafted=drafted), expected)
    _assert_same(ops.translate(drafts, d2t, table=table, drafted=drafted), expected)
    # A whole draft is the default.
    full_length = torch.full((3,), 4)
    _assert_same(
        translate_triton(drafts, d2t, *table, drafted=full_length), translate_triton(drafts, d2t, *table)
    )


@pytest.mark.parametrize(("batch", "k", "n_max"), [(5, 3, 4), (4, 8, 4), (3, 8, 6)])
def test_draft_lengths_match_reference(batch, k, n_max):
    drafts, d2t = _drafts(batch, k, seed=k + 1), _d2t(seed=batch + 1, unmapped=0.15)
    table = _table(drafts, n_max, capacity=64, windows=12, random=12, seed=batch + k + 1)
    drafted = torch.randint(0, k + 1, (batch,), generator=torch.Generator().manual_seed(k))
    got = translate_triton(drafts, d2t, *table, drafted=drafted)
    _assert_same(got, translate_ngram_reference(drafts, d2t, *table, drafted=drafted))
    _assert_same(
        translate_triton(drafts, d2t, drafted=drafted), translate_reference(drafts, d2t, drafted=drafted)
    )
    assert (torch.maximum(got[2], got[3] - 1)[got[0] >= 0] < drafted.repeat_interleave(got[1])).all()


# -- GPU: a realistic table (2^16 slots at load 1/2), batch 256 ------------------------------------------
@gpu
@needs_cuda
@pytest.mark.parametrize(("k", "n_max"), [(8, 4), (16, 8)])
def test_large_batch_on_cuda(k, n_max):
    drafts, d2t = _drafts(256, k, seed=10, device="cuda"), _d2t(seed=11, device="cuda")
    table = _table(
        drafts, n_max, 1 << 16, 4096, (1 << 15) - 2048, seed=12, vocab=1 << 20, insert=ngram_insert_triton
    )
    assert 0.45 < float((table[0][:, 0] >= 0).float().mean()) < 0.55  # load factor about 1/2
    drafted = torch.randint(0, k + 1, (256,), generator=torch.Generator().manual_seed(13)).cuda()
    torch.cuda.set_sync_debug_mode("error")  # the kernel must not synchronise
    try:
        got = ops.translate(drafts, d2t, table=table)
        direct = ops.translate(drafts, d2t)
        got_own = ops.translate(drafts, d2t, table=table, drafted=drafted)
        direct_own = ops.translate(drafts, d2t, drafted=drafted)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    _assert_same(got, translate_ngram_reference(drafts, d2t, *table))
    _assert_same(direct, translate_reference(drafts, d2t))
    _assert_same(got_own, translate_ngram_reference(drafts, d2t, *table, drafted=drafted))
    _assert_same(direct_own, translate_reference(drafts, d2t, drafted=drafted))
    assert ((got[3] - got[2]) >= 2).any()
