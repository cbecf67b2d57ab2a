"""The public ops against their definitions: filters as transformers' warpers, samplers, verification, commit."""

from __future__ import annotations

import pytest
import torch
from omnidraft_fast.kernels.proposal import CrossProposal
from omnidraft_fast.kernels.sampling import sampling_probs_reference
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from omnidraft_fast import SamplingParams, ops


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.6, 7, 1.0), (1.4, 0, 0.7), (0.8, 3, 0.5)]
)
@pytest.mark.parametrize("vocab", [7, 33, 1000])
def test_sampling_probs_match_transformers_warpers(temperature, top_k, top_p, vocab):
    logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(vocab)) * 3
    logits[0, :4] = 2.5  # ties at the top-k boundary are kept, as transformers keeps them
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    torch.testing.assert_close(
        sampling_probs_reference(logits, temperature, top_k, top_p), scores.softmax(-1)
    )


def test_sample_maximises_the_race_objective_and_reports_q():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=generator, dtype=torch.float64).to(torch.bfloat16)
    noise = torch.empty(64, 50).exponential_(generator=generator)
    ids, q = ops.sample(logits, noise, temperature=0.9, top_k=10, top_p=0.95)
    assert ids.dtype == torch.int64 and q.dtype == torch.float32
    torch.testing.assert_close(q, sampling_probs_reference(logits, 0.9, 10, 0.95))
    objective = q / noise
    assert torch.equal(objective.gather(1, ids[:, None])[:, 0], objective.max(1).values)
    assert (q.gather(1, ids[:, None]) > 0).all()


@pytest.mark.law
def test_sample_frequencies():
    q = torch.tensor([0.5, 0.25, 0.125, 0.125, 0.0])
    rows = 40_000
    logits = q.log().expand(rows, -1).contiguous()
    noise = torch.empty(rows, 5).exponential_(generator=torch.Generator().manual_seed(1))
    ids, _ = ops.sample(logits, noise, temperature=1.0)
    freq = torch.bincount(ids, minlength=5).double() / rows
    assert (freq - q.double()).abs().max() < 0.015  # 0.015 ~ 6 standard deviations at 40k draws
    assert freq[4] == 0


def test_greedy_sample_is_argmax():
    logits = torch.tensor([[0.0, 3.0, 3.0, -1.0], [9.0, 0.0, 0.0, 0.0]])
    ids, q = ops.sample(logits, None, temperature=0.0)
    assert ids.tolist() == [1, 0]  # first maximum, as torch.argmax and transformers
    assert q.tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]]


def test_verify_greedy_accepts_the_matching_prefix():
    vocab = 6
    target = torch.full((3, 4, vocab), -5.0)
    best = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [5, 5, 5, 5]])
    target.scatter_(2, best[..., None], 5.0)
    drafts = torch.tensor([[1, 2, 3], [1, 0, 3], [0, 5, 5]])
    q = torch.nn.functional.one_hot(drafts, vocab).float()
    accepted, out, a, _, invalid = ops.verify(target, drafts, q, torch.rand(3, 3), None, temperature=0.0)
    assert accepted.tolist() == [3, 1, 0]
    assert out.tolist() == [[1, 2, 3, 4], [1, 2, -1, -1], [5, -1, -1, -1]]
    assert a.tolist() == [[1, 1, 1], [1, 0, 1], [0, 1, 1]]
    assert not invalid.any()


@pytest.mark.law
def test_verify_output_follows_p_for_any_q():
    """One drafted position: the emitted token is distributed as p whatever q was (the theorem)."""
    rows, vocab = 200_000, 5
    generator = torch.Generator().manual_seed(3)
    p = torch.tensor([0.1, 0.4, 0.2, 0.3, 0.0])
    q = torch.tensor([0.5, 0.1, 0.1, 0.1, 0.2])
    drafts = torch.multinomial(q, rows, replacement=True, generator=generator)[:, None]
    target_logits = torch.stack([p, p]).log().expand(rows, -1, -1).contiguous()
    uniforms = torch.rand(rows, 1, generator=generator)
    noise = torch.empty(rows, vocab).exponential_(generator=generator)
    accepted, out, _, _, _ = ops.verify(
        target_logits, drafts, q.expand(rows, 1, -1).contiguous(), uniforms, noise, temperature=1.0
    )
    freq = torch.bincount(out[:, 0], minlength=vocab).double() / rows
    assert (freq - p.double()).abs().max() < 0.006  # ~6 sigma at 200k draws
    expected_acceptance = torch.minimum(p, q).sum()  # P(accept) = sum_v min(p, q)
    assert abs(accepted.double().mean() - expected_acceptance) < 0.006


def test_verify_residual_falls_back_to_p_when_p_equals_q():
    p = torch.tensor([0.25, 0.25, 0.5])
    target_logits = p.log().expand(1, 2, -1).contiguous()
    accepted, out, a, _, _ = ops.verify(
        target_logits,
        torch.tensor([[2]]),
        p.expand(1, 1, -1).contiguous(),
        torch.tensor([[1.0]]),  # u = 1 rejects even with a = 1
        torch.ones(1, 3),
        temperature=1.0,
    )
    assert accepted.tolist() == [0] and out[0, 0] == 2  # argmax of p / 1 once the empty residual falls back
    assert a.tolist() == [[1.0]]


def test_verify_flags_nonfinite_positions():
    logits = torch.zeros(3, 2, 4)
    logits[1, 1, 2] = float("nan")
    logits[2, 0] = float("-inf")
    *_, invalid = ops.verify(
        logits, torch.zeros(3, 1, dtype=torch.int64), torch.full((3, 1, 4), 0.25), torch.rand(3, 1), None,
        temperature=0.0,
    )  # fmt: skip
    assert invalid.tolist() == [[False, False], [False, True], [True, False]]


def test_commit_applies_eos_and_limits():
    tokens = torch.zeros(4, 12, dtype=torch.int64)
    lengths = torch.tensor([3, 3, 3, 3])
    generated = torch.tensor([0, 0, 5, 1])
    done = torch.tensor([False, False, False, True])
    out = torch.tensor([[5, 6, 7, 8], [5, 9, 7, -1], [5, 6, 7, 8], [5, 6, 7, 8]])
    accepted = torch.tensor([3, 2, 3, 3])
    kept = ops.commit(tokens, lengths, generated, done, out, accepted, torch.tensor([9]), max_new_tokens=7)
    assert kept.tolist() == [4, 2, 2, 0]  # all; up to the EOS; the two left of max_new_tokens; done row
    assert tokens[0, 3:7].tolist() == [5, 6, 7, 8]
    assert tokens[1, 3:6].tolist() == [5, 9, 0]
    assert tokens[2, 3:6].tolist() == [5, 6, 0]
    assert tokens[3].tolist() == [0] * 12
    assert lengths.tolist() == [7, 5, 5, 3] and generated.tolist() == [4, 2, 7, 1]
    assert done.tolist() == [False, True, True, True]


def test_empty_batches_on_kernels_and_references(monkeypatch):
    """A batch of no rows gives empty outputs of the right shapes on both paths."""
    for kernels in (False, True):
        monkeypatch.setattr(ops, "runs_kernels", lambda tensor, _on=kernels: _on)
        ids, q = ops.sample(torch.zeros(0, 5), torch.ones(0, 5), temperature=1.0)
        assert ids.shape == (0,) and q.shape == (0, 5)
        out = ops.verify(torch.zeros(0, 3, 5), torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, 2, 5),
                         torch.zeros(0, 2), torch.ones(0, 5), temperature=1.0)  # fmt: skip
        assert [tuple(t.shape) for t in out] == [(0,), (0, 3), (0, 2), (0, 2), (0, 3)]
        assert [t.dtype for t in out] == [torch.int64, torch.int64, torch.float32, torch.bool, torch.bool]
        for noise in (None, torch.ones(0, 3, 5)):  # by exact match, greedy and sampled
            out = ops.verify(torch.zeros(0, 3, 5), torch.zeros(0, 2, dtype=torch.int64), None, torch.zeros(0, 2),
                             noise, temperature=0.0 if noise is None else 1.0, exact_match=True)  # fmt: skip
            assert [tuple(t.shape) for t in out] == [(0,), (0, 3), (0, 2), (0, 2), (0, 3)]
            assert [t.dtype for t in out] == [torch.int64, torch.int64, torch.float32, torch.bool, torch.bool]
        d2t = torch.zeros(4, dtype=torch.int32)
        table = (torch.full((8, 3), -1, dtype=torch.int32), torch.full((8,), -1, dtype=torch.int32))
        splits = (torch.full((4, 2), -1, dtype=torch.int32), torch.ones(4, dtype=torch.int32), 4)
        for shape in ((0, 3), (2, 0)):  # no rows, and rows that drafted nothing
            drafts = torch.zeros(shape, dtype=torch.int64)
            for options in ({}, {"table": table}, {"splits": splits}, {"table": table, "splits": splits}):
                out = ops.translate(drafts, d2t, **options)
                assert [tuple(t.shape) for t in out] == [shape, shape[:1], shape, shape]
                assert (out[1] == 0).all() and all(t.dtype == torch.int64 for t in out)


def test_ops_check_metadata():
    d2t = torch.zeros(5, dtype=torch.int32)
    drafts = torch.zeros(1, 2, dtype=torch.int64)
    table = (torch.full((8, 3), -1, dtype=torch.int32), torch.full((8,), -1, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"`table` must be the n-gram table's `\(key_ids, values\)`"):
        ops.translate(drafts, d2t, table=(table[0], table[0], table[1], table[1]))
    with pytest.raises(ValueError, match="capacity must be a power of two"):
        ops.ngram_lookup(torch.zeros(0, 3, dtype=torch.int32), torch.zeros(0, dtype=torch.int32),
                         torch.zeros(1, 3, dtype=torch.int64))  # fmt: skip
    for rows, lengths in ((2, 5), (5, 2)):
        with pytest.raises(ValueError, match="one row per drafter id"):
            splits = (torch.full((rows, 2), -1, dtype=torch.int32), torch.ones(lengths, dtype=torch.int32), 4)
            ops.translate(drafts, d2t, splits=splits)
    with pytest.raises(ValueError, match="draft_ids"):
        ops.verify(torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3, 5),
                   torch.zeros(2, 3), None, temperature=0.0)  # fmt: skip
    with pytest.raises(TypeError, match="draft_ids"):
        ops.verify(torch.zeros(2, 3, 5), torch.zeros(2, 2), torch.zeros(2, 2, 5), torch.zeros(2, 2), None,
                   temperature=0.0)  # fmt: skip
    with pytest.raises(ValueError, match="noise"):
        ops.sample(torch.zeros(2, 5), None, temperature=1.0)
    with pytest.raises(ValueError, match="top_p"):
        ops.sample(torch.zeros(2, 5), None, temperature=0.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        ops.sample(torch.zeros(2, 5), torch.ones(2, 5), temperature=float("nan"))
    with pytest.raises(TypeError, match="`probs` must be a bool"):  # a tensor's truth would sync the GPU
        ops.sample(torch.zeros(2, 5), None, temperature=0.0, probs=torch.tensor(False))
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=float("nan"))
    with pytest.raises(ValueError, match="exact_match"):
        ops.verify(torch.zeros(1, 2, 5), torch.zeros(1, 1, dtype=torch.int64), None, torch.zeros(1, 1), None,
                   temperature=0.0, rule=torch.tensor([1]), alpha=torch.tensor([1.0]), exact_match=True)  # fmt: skip
    with pytest.raises(ValueError, match="output_tokens"):  # one row for three would broadcast
        ops.commit(torch.zeros(3, 8, dtype=torch.int64), torch.full((3,), 2), torch.zeros(3, dtype=torch.int64),
                   torch.zeros(3, dtype=torch.bool), torch.tensor([[7, 8, 9]]), torch.full((3,), 2),
                   torch.zeros(0, dtype=torch.int64), max_new_tokens=4)  # fmt: skip


def _bad_calls():
    """(call, error type, message) for each argument check of ops' public functions that a valid call does not
    reach: every one names the argument."""
    i64, i32 = torch.int64, torch.int32
    logits, noise = torch.zeros(2, 5), torch.ones(2, 5)
    drafts = torch.zeros(2, 3, dtype=i64)
    cross = CrossProposal(drafts, drafts, drafts + 1, torch.zeros(6, dtype=i32), torch.zeros(5, dtype=i32))
    rows = (
        torch.zeros(2, 8, dtype=i64),
        torch.full((2,), 2),
        torch.zeros(2, dtype=i64),
        torch.zeros(2, dtype=torch.bool),
    )
    key_ids, values = torch.full((8, 3), -1, dtype=i32), torch.full((8,), -1, dtype=i32)
    hashes, counts, keys = torch.zeros(8, dtype=i64), torch.zeros(8, dtype=i64), torch.zeros(2, 3, dtype=i64)

    def verify(**changes):  # a valid greedy verification, but for `changes`
        valid = {
            "target": torch.zeros(2, 4, 5),
            "drafts": drafts,
            "q": torch.zeros(2, 3, 5),
            "uniforms": torch.zeros(2, 3),
            "noise": None,
        }
        args = [changes.pop(name, value) for name, value in valid.items()]
        return lambda: ops.verify(*args, **{"temperature": 0.0, **changes})

    def commit(*changed, max_new_tokens=4):  # a valid commit, but for its first arguments
        valid = (*rows, torch.zeros(2, 3, dtype=i64), torch.full((2,), 2), torch.zeros(0, dtype=i64))
        return lambda: ops.commit(*changed, *valid[len(changed) :], max_new_tokens=max_new_tokens)

    def insert(*changed):  # a valid insert, but for its first arguments
        valid = (hashes, key_ids, values, counts, keys, torch.zeros(2, dtype=i64), torch.ones(2, dtype=i64))
        return lambda: ops.ngram_insert(*changed, *valid[len(changed) :])

    return [
        (
            lambda: ops.sample([[0.0]], None, temperature=0.0),
            TypeError,
            "`logits` must be a torch.Tensor, got list",
        ),
        (
            lambda: ops.sample(torch.zeros(5), None, temperature=0.0),
            ValueError,
            r"`logits` must be 2-D, got shape \(5,\)",
        ),
        (lambda: ops.sample(logits.long(), None, temperature=0.0), TypeError, "`logits` must have dtype in"),
        (
            lambda: ops.sample(logits, noise.to("meta"), temperature=1.0),
            ValueError,
            "`noise` is on meta, expected cpu",
        ),
        (
            lambda: ops.sample(logits, torch.ones(2, 4), temperature=1.0),
            ValueError,
            r"`noise` must have the shape of `logits` \(2, 5\)",
        ),
        (
            lambda: ops.sample(logits, None, temperature=0.0, top_k=-1),
            ValueError,
            r"`top_k` must be >= 0 \(0 = off\), got -1",
        ),
        (
            lambda: ops.sample(logits, None, temperature=0.0, mask=torch.ones(4, dtype=torch.bool)),
            ValueError,
            r"`mask` must have one entry per vocabulary id \(5\), got 4",
        ),
        (
            verify(cross=cross._replace(t2d=torch.zeros(4, dtype=i32))),
            ValueError,
            "`cross.t2d` must have the target's 5 ids, got 4",
        ),
        (
            verify(cross=cross._replace(span_end=torch.ones(2, 2, dtype=i64))),
            ValueError,
            r"`cross.span_end` must be \[batch, k\] = \(2, 3\)",
        ),
        (
            verify(q=torch.zeros(2, 3, 4)),
            ValueError,
            r"`draft_probs` must be \[batch, k, V\] = \(2, 3, 5\), got \(2, 3, 4\)",
        ),
        (verify(q=None), ValueError, "`draft_probs` is required unless exact_match=True"),
        (verify(uniforms=torch.zeros(2, 2)), ValueError, r"`uniforms` must be \[batch, k\] = \(2, 3\)"),
        (verify(rule=torch.zeros(2, dtype=i64)), ValueError, "`rule` and `alpha` go together"),
        (verify(support_only=True), ValueError, "`support_only` restricts what the deferral rules read"),
        (
            verify(rule=torch.zeros(3, dtype=i64), alpha=torch.zeros(3)),
            ValueError,
            r"`rule` and `alpha` must have one entry per row \(2\)",
        ),
        (
            verify(temperature=1.0),
            ValueError,
            r"`noise` \(\[2, 5\] Exp\(1\) draws\) is required when temperature > 0",
        ),
        (
            verify(temperature=1.0, noise=torch.ones(2, 4)),
            ValueError,
            r"`noise` must be \[2, 5\], got \[2, 4\]",
        ),
        (
            verify(temperature=1.0, q=None, exact_match=True, noise=torch.ones(2, 4, 4)),
            ValueError,
            r"`noise` must be \[2, 4, 5\], got \[2, 4, 4\]",
        ),
        (
            commit(rows[0], torch.full((3,), 2)),
            ValueError,
            r"`lengths` must be \[batch\] = \[2\], got \(3,\)",
        ),
        (commit(*rows, torch.zeros(2, 3, dtype=i32)), TypeError, "`output_tokens` must have dtype in"),
        (commit(max_new_tokens=0), ValueError, "`max_new_tokens` must be >= 1, got 0"),
        (
            lambda: ops.nonfinite_rows(torch.zeros(2, 3, dtype=i64)),
            TypeError,
            "`logits` must be a floating-point",
        ),
        (
            lambda: ops.translate(drafts, torch.zeros(6, dtype=i32), drafted=torch.ones(3, dtype=i64)),
            ValueError,
            r"`drafted` must have 2 rows, got \(3,\)",
        ),
        (
            lambda: ops.translate(
                drafts, torch.zeros(6, dtype=i32), table=(key_ids.to("meta"), values.to("meta"))
            ),
            ValueError,
            "the n-gram table is on meta, the drafts on cpu",
        ),
        (
            lambda: ops.commit_drafter(
                rows[0],
                rows[1],
                drafts,
                torch.zeros(2, dtype=i64),
                torch.zeros(2, 1, dtype=i64),
                torch.zeros(3, dtype=i64),
                rows[3],
            ),
            ValueError,
            r"`spelling_len` must have 2 rows, got \(3,\)",
        ),
        (
            lambda: ops.lookup(rows[0], rows[1], torch.zeros(3, dtype=i64), 2, 2),
            ValueError,
            r"`lengths` must be \[batch\] = \[2\]",
        ),
        (lambda: ops.lookup(rows[0], rows[1], rows[1], 0, 2), ValueError, "`k` must be an int >= 1, got 0"),
        (
            lambda: ops.lookup(rows[0], rows[1], rows[1], 2, True),
            ValueError,
            "`max_ngram` must be an int >= 1, got True",
        ),
        (
            lambda: ops.lookup(torch.zeros(2, 0, dtype=i64), rows[1], rows[1], 2, 2),
            ValueError,
            "`tokens` must have at least one slot",
        ),
        (
            lambda: ops.ngram_lookup(key_ids.t().contiguous().t(), values, keys),
            ValueError,
            "must be contiguous",
        ),
        (
            lambda: ops.ngram_lookup(key_ids, values, torch.zeros(2, 4, dtype=i64)),
            ValueError,
            r"`queries` must have 3 columns \(the table's N\), got 4",
        ),
        (
            insert(torch.zeros(16, dtype=i64)[::2]),
            ValueError,
            r"`hashes` must be contiguous with one entry per slot \(8\)",
        ),
        (
            insert(hashes, key_ids, values, torch.zeros(7, dtype=i64)),
            ValueError,
            r"`counts` must be contiguous with one entry per slot",
        ),
        (
            insert(hashes, key_ids, values, counts, torch.zeros(2, 4, dtype=i64)),
            ValueError,
            r"`keys` must have 3 columns",
        ),
        (
            insert(
                hashes, key_ids, values, counts, keys, torch.zeros(2, dtype=i64), torch.ones(3, dtype=i64)
            ),
            ValueError,
            r"`hits` must have one entry per key \(2\), got 3",
        ),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_ops_name_the_argument_they_refuse(index):
    call, error, message = _bad_calls()[index]
    with pytest.raises(error, match=message):
        call()


def test_verify_told_the_rules_held():
    """``rules`` promises the rule ids of ``rule``: the reference computes only those, with the outputs of
    every rule computed (``rules`` all of them); a bad promise is refused."""
    generator = torch.Generator().manual_seed(8)
    target = torch.randn(3, 4, 50, generator=generator)
    q = torch.randn(3, 3, 50, generator=generator).softmax(-1)
    drafts = torch.multinomial(q.view(-1, 50), 1, generator=generator).view(3, 3)
    uniforms, noise = (
        torch.rand(3, 3, generator=generator),
        torch.empty(3, 50).exponential_(generator=generator),
    )
    for rule in (torch.tensor([5, 5, 5]), torch.tensor([1, 7, 1])):
        args = (target, drafts, q, uniforms, noise)
        kwargs = dict(temperature=0.9, rule=rule, alpha=torch.full((3,), 0.3))
        want = ops.verify(*args, **kwargs, rules=range(8))
        got = ops.verify(*args, **kwargs, rules=set(rule.tolist()))
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="`rules` must be rule ids"):
        ops.verify(*args, **kwargs, rules=[8])
    with pytest.raises(ValueError, match="with `rule` only"):
        ops.verify(*args, temperature=0.9, rules=[0])
