"""Prompt lookup's draft: the kernel against its torch reference (interpreted on CPU, compiled on CUDA), and
the reference's one-pass rule against the definition it replaces (for each suffix length, longest first,
the leftmost window). ``test_prompt_lookup.py`` checks the op against transformers' own candidates."""

from __future__ import annotations

import pytest
import torch
from omnidraft_fast.kernels.lookup import lookup_reference, lookup_triton

from omnidraft_fast import ops

pytestmark = pytest.mark.kernels
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _definition(tokens, start, lengths, k, max_ngram):
    """The rule as the module docstring states it, one row and one suffix length at a time, in Python."""
    ids, drafted = [], []
    for row, first, length in zip(tokens.tolist(), start.tolist(), lengths.tolist(), strict=True):
        begin, count = 0, 0
        for n in range(max_ngram, 0, -1):
            if length - n < first:
                continue
            suffix = row[length - n : length]
            hit = next((j for j in range(first, length - n) if row[j : j + n] == suffix), None)
            if hit is not None:
                begin = hit + n
                count = min(k, length - begin)
                break
        ids.append([row[min(begin + i, len(row) - 1)] for i in range(k)])
        drafted.append(count)
    return torch.tensor(ids), torch.tensor(drafted)


def _layout(seed: int, batch: int, slots: int, alphabet: int):
    """Rows as the rounds lay them out: left padding (some of it holding ids that would match), stale ids
    past each row's end, contexts of few distinct ids (matches of every length), empty and one-token rows."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, alphabet, (batch, slots), generator=gen)
    start = torch.randint(0, max(1, slots // 3), (batch,), generator=gen)
    lengths = torch.minimum(start + torch.randint(0, slots, (batch,), generator=gen), torch.tensor(slots))
    if batch > 2:
        lengths[0], lengths[1] = start[0], start[1] + 1
    return tokens, start, lengths


@pytest.mark.parametrize(("k", "max_ngram"), [(1, 1), (3, 2), (5, 3), (4, 6), (3, 1000)])
def test_reference_is_the_definition(k, max_ngram):
    """Suffixes longer than any context included: transformers takes any ``max_matching_ngram_size``."""
    for seed in range(40):
        case = _layout(seed, 6, 30, 2 + seed % 4)
        got = lookup_reference(*case, k, max_ngram)
        want = _definition(*case, k, max_ngram)
        assert torch.equal(got[1], want[1]), seed
        assert torch.equal(got[0], want[0]), seed


@pytest.mark.parametrize("splits", [1, 3, None])
@pytest.mark.parametrize(
    ("k", "max_ngram", "block"), [(1, 1, 4), (3, 2, 8), (6, 3, 4), (4, 5, 64), (2, 1000, 8)]
)
def test_kernel_equals_reference(k, max_ngram, block, splits):
    """Tiles smaller than a row put matches across tile edges, and chunks of tiles across programs: the
    winner may sit in any tile of any program (one program a row, three, or the launcher's choice)."""
    for seed in range(12):
        case = _layout(seed, 5, 37, 2 + seed % 3)
        got = lookup_triton(*case, k, max_ngram, block=block, splits=splits)
        want = lookup_reference(*case, k, max_ngram)
        assert torch.equal(got[1], want[1]), seed
        assert torch.equal(got[0], want[0]), seed


def test_programs_of_one_row_meet_whatever_their_number():
    """One long row cut over 1 to more programs than it has tiles (the launcher caps them at one a tile),
    the winning window in the first program's chunk, a middle one's, the last one's, or nowhere."""
    for where in (0, 30, 60, None):  # the suffix (7, 8) planted at slot `where`, or nowhere
        tokens = torch.arange(100, 164)[None].clone()
        tokens[0, -2:] = torch.tensor([7, 8])
        if where is not None:
            tokens[0, where : where + 2] = torch.tensor([7, 8])
        case = (tokens, torch.tensor([0]), torch.tensor([64]), 4, 2)
        want = _definition(*case)
        assert want[1].item() == (0 if where is None else min(4, 62 - where))
        for splits in (1, 2, 5, 16, 40):
            got = lookup_triton(*case, block=4, splits=splits)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (where, splits)


def test_longest_match_beats_an_earlier_shorter_one_in_another_tile():
    """The token 8 alone first occurs in tile 0, the suffix (7, 8) first in tile 2: the pair wins."""
    row = [5, 8, 1, 2, 3, 4, 6, 6, 7, 8, 9, 1, 2, 3, 7, 8]
    tokens, start, lengths = torch.tensor([row]), torch.tensor([0]), torch.tensor([len(row)])
    for implementation in (lookup_reference, lambda *a: lookup_triton(*a, block=4)):
        ids, drafted = implementation(tokens, start, lengths, 3, 2)
        assert ids[0, : drafted[0]].tolist() == [9, 1, 2]
        ids, drafted = implementation(tokens, start, lengths, 3, 1)  # one token: the first "8"
        assert ids[0, : drafted[0]].tolist() == [1, 2, 3]


def test_strided_tokens_and_empty_batch():
    """The rounds' token buffer has a spare slot: a view whose rows are not contiguous in memory."""
    tokens, start, lengths = _layout(3, 4, 21, 3)
    view = torch.cat([tokens, torch.zeros(4, 1, dtype=torch.int64)], 1)[:, :-1]
    assert not view.is_contiguous()
    column_major = tokens.t().contiguous().t()  # slot-major: made contiguous first
    want = lookup_reference(tokens, start, lengths, 4, 2)
    for strided in (view, column_major):
        got = lookup_triton(strided, start, lengths, 4, 2, block=8)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    empty = (
        torch.zeros(0, 5, dtype=torch.int64),
        torch.zeros(0, dtype=torch.int64),
        torch.zeros(0, dtype=torch.int64),
    )
    for implementation in (lookup_reference, lookup_triton):
        ids, drafted = implementation(*empty, 3, 2)
        assert ids.shape == (0, 3) and drafted.shape == (0,)


def test_the_whole_context_less_one_token_can_match():
    """A row of one repeated token that fills every slot: its longest matching suffix is the whole context
    less its first token (``n = L - 1``, the window at 0), so the draft is the one last token; a shorter
    suffix would draft from an earlier slot."""
    tokens, start, lengths = torch.full((1, 6), 7), torch.tensor([0]), torch.tensor([6])
    want = _definition(tokens, start, lengths, 3, 10)
    assert want[1].tolist() == [1]  # n = 5, j = 0: the draft begins at slot 5
    for implementation in (lookup_reference, lambda *a: lookup_triton(*a, block=4)):
        ids, drafted = implementation(tokens, start, lengths, 3, 10)
        assert torch.equal(drafted, want[1]) and torch.equal(ids, want[0])


def test_rows_of_one_slot():
    """A batch of one slot a row (a row of one token or none) drafts nothing: no token precedes a suffix."""
    tokens, start, lengths = torch.tensor([[4], [9]]), torch.tensor([0, 0]), torch.tensor([1, 0])
    want = _definition(tokens, start, lengths, 2, 3)
    assert want[1].tolist() == [0, 0]
    for implementation in (lookup_reference, lookup_triton):
        ids, drafted = implementation(tokens, start, lengths, 2, 3)
        assert torch.equal(drafted, want[1]) and torch.equal(ids, want[0])


def test_tokens_in_any_layout_and_the_default_tile():
    """Token buffers whose slot axis is not unit-stride (every other column of a wider buffer, one token
    broadcast over a row's slots) draft as their contiguous copies do, at the launcher's default tile and
    program count as at a small tile."""
    tokens, start, lengths = _layout(5, 4, 23, 3)
    wide = torch.zeros(4, 46, dtype=torch.int64)
    wide[:, ::2] = tokens
    broadcast = tokens[:, :1].expand(-1, 23)
    for layout in (wide[:, ::2], broadcast):
        assert layout.stride(1) in (0, 2)
        want = lookup_reference(layout.contiguous(), start, lengths, 4, 3)
        for got in (
            lookup_triton(layout, start, lengths, 4, 3),
            lookup_triton(layout, start, lengths, 4, 3, block=8),
        ):
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tokens": torch.zeros(2, 8, dtype=torch.int32)}, "`tokens` must have dtype"),
        ({"start": torch.zeros(3, dtype=torch.int64)}, "`start` must be [batch] = [2]"),
        ({"lengths": torch.zeros(2, dtype=torch.float32)}, "`lengths` must have dtype"),
        ({"k": 0}, "`k` must be an int >= 1"),
        ({"max_ngram": 1.5}, "`max_ngram` must be an int >= 1"),
        ({"tokens": torch.zeros(2, 0, dtype=torch.int64)}, "at least one slot"),
    ],
)
def test_op_checks_its_arguments(change, message):
    arguments = {
        "tokens": torch.zeros(2, 8, dtype=torch.int64),
        "start": torch.zeros(2, dtype=torch.int64),
        "lengths": torch.full((2,), 8, dtype=torch.int64),
        "k": 3,
        "max_ngram": 2,
    }
    with pytest.raises((TypeError, ValueError), match=message.replace("[", r"\[").replace("]", r"\]")):
        ops.lookup(**{**arguments, **change})


@gpu
@needs_cuda
def test_kernel_at_long_contexts_on_cuda():
    """Rows of a long prompt (16k slots), the last tokens repeated once early on and once late."""
    tokens, start, lengths = _layout(7, 8, 16384, 50)
    tokens[:, 9000:9003] = tokens.gather(1, (lengths[:, None] - 3 + torch.arange(3)).clamp_min(0))
    for max_ngram in (1, 2, 3, 4):
        want = lookup_reference(tokens, start, lengths, 10, max_ngram)
        for splits in (None, 1):  # a row's programs meeting in atomics, concurrently; one program a row
            got = lookup_triton(tokens.cuda(), start.cuda(), lengths.cuda(), 10, max_ngram, splits=splits)
            assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
