"""Prompt lookup (``kernels/lookup.py``): drafts copied from the context, no drafter model.

The drafts are transformers' own (its ``PromptLookupCandidateGenerator`` is the oracle), greedy output is
the target's, the engine runs them batched, captured and with the request options, and what cannot be done
without a drafter is refused by name. The sampled law is checked in ``test_lossless_sampling.py``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from transformers import GenerationConfig
from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

import omnidraft_fast
from omnidraft_fast import AdaptiveConfig, CascadeConfig, DistillConfig, EngineConfig, SpeculativeEngine, ops

VOCAB = 48


def _transformers_draft(context: list[int], k: int, ngram: int) -> list[int]:
    """The candidates transformers' prompt lookup proposes after ``context`` (no EOS, no processors)."""
    generator = PromptLookupCandidateGenerator(
        num_output_tokens=k, max_matching_ngram_size=ngram, max_length=10**6
    )
    ids = torch.tensor([context])
    candidates, _ = generator.get_candidates(ids)
    return candidates[0, len(context) :].tolist()


@pytest.mark.parametrize(("k", "ngram"), [(1, 1), (3, 2), (5, 3), (8, 4)])
def test_drafts_are_transformers_prompt_lookup_candidates(k, ngram):
    """Rows laid out as the rounds lay them out (a dummy slot, left padding, stale tokens past the end) draft
    what transformers proposes for the row alone, on contexts of few distinct ids (matches of every length,
    several per context, some at the very start or running into the end)."""
    gen = torch.Generator().manual_seed(k * 10 + ngram)
    batch, slots = 64, 40
    tokens = torch.randint(0, VOCAB, (batch, slots), generator=gen)  # stale ids everywhere to begin with
    start = torch.randint(1, 12, (batch,), generator=gen)
    lengths = torch.minimum(start + torch.randint(1, 28, (batch,), generator=gen), torch.tensor(slots))
    contexts = []
    for row in range(batch):
        alphabet = int(torch.randint(2, 5, (1,), generator=gen))  # repeats galore
        n = int(lengths[row] - start[row])
        context = torch.randint(0, alphabet, (n,), generator=gen)
        tokens[row, start[row] : lengths[row]] = context
        contexts.append(context.tolist())
    ids, drafted = ops.lookup(tokens, start, lengths, k, ngram)
    assert ids.shape == (batch, k) and drafted.dtype == torch.int64
    lengths_seen = set()
    for row, context in enumerate(contexts):
        expected = _transformers_draft(context, k, ngram)
        assert ids[row, : drafted[row]].tolist() == expected, (row, context)
        lengths_seen.add(len(expected))
    assert 0 in lengths_seen and k in lengths_seen, lengths_seen  # rows without a match, and full drafts
    if k > 2:
        assert lengths_seen & set(range(1, k)), lengths_seen  # drafts cut at the context's end


def test_longest_suffix_wins_and_the_leftmost_match():
    tokens = torch.tensor([[0, 7, 1, 2, 3, 9, 2, 3, 8, 5, 1, 2, 3]])  # slot 0 is the dummy slot
    start, lengths = torch.tensor([1]), torch.tensor([13])
    # suffix (1, 2, 3) occurs at slot 2: its continuation 9, 2, 3, 8
    ids, drafted = ops.lookup(tokens, start, lengths, 4, 3)
    assert ids[0, : drafted[0]].tolist() == [9, 2, 3, 8]
    # suffix (2, 3) occurs first at slot 3 too: the same continuation; with n = 1, "3" first at slot 4
    assert ops.lookup(tokens, start, lengths, 4, 2)[0][0].tolist() == [9, 2, 3, 8]
    assert ops.lookup(tokens, start, lengths, 2, 1)[0][0].tolist() == [9, 2]
    # the prompt's left padding and the dummy slot are not context
    padded = torch.tensor([[0, 3, 4, 6, 3]])
    assert ops.lookup(padded, torch.tensor([3]), torch.tensor([5]), 2, 1)[1].tolist() == [0]
    assert ops.lookup(padded, torch.tensor([1]), torch.tensor([5]), 2, 1)[0][0].tolist() == [4, 6]


@pytest.fixture(scope="module")
def target():
    model = tiny_model("llama", VOCAB, seed=5, eos_token_id=7)
    with torch.no_grad():  # a peaked target that repeats itself: lookup drafts get accepted
        model.lm_head.weight.mul_(4.0)
    return model


def _prompts(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch of repetitive prompts."""
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(10, 16, (n,), generator=gen).repeat(3) for n in (4, 7, 3)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return ids, mask


@pytest.mark.parametrize(("k", "ngram"), [(1, 2), (4, 2), (10, 3)])
def test_greedy_output_is_the_targets(target, k, ngram):
    ids, mask = _prompts()
    expected = target.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0)
    out = omnidraft_fast.generate(
        target, ids, attention_mask=mask, prompt_lookup_num_tokens=k, max_matching_ngram_size=ngram,
        max_new_tokens=30, pad_token_id=0, return_dict_in_generate=True,
    )  # fmt: skip
    assert torch.equal(out.sequences, expected)
    stats = out.stats
    assert stats.accepted > 0 and stats.proposed > stats.accepted, stats.summary()
    assert 0 < stats.drafted_per_round <= k
    # one row alone, as transformers' own prompt lookup runs it
    one = target.generate(ids[:1, -12:], max_new_tokens=30, do_sample=False, prompt_lookup_num_tokens=k,
                          max_matching_ngram_size=ngram, pad_token_id=0)  # fmt: skip
    assert torch.equal(omnidraft_fast.generate(target, ids[:1, -12:], max_new_tokens=30, pad_token_id=0,
                                               prompt_lookup_num_tokens=k, max_matching_ngram_size=ngram), one)  # fmt: skip


def test_rows_without_a_match_propose_nothing(target):
    """A prompt of distinct ids and one token to generate: nothing to copy, so nothing proposed, and the
    round's target forward is two positions wide (the pending token and one unproposed), not k + 1."""
    engine = SpeculativeEngine(target, None, config=EngineConfig(num_draft_tokens=6))
    widths = []
    handle = target.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        out = engine.generate(torch.arange(10, 20)[None], max_new_tokens=1, return_dict_in_generate=True)
    finally:
        handle.remove()
    assert widths[1:] == [2], widths  # after the prefill
    assert out.stats.proposed == 0 and out.stats.drafted_per_round == 0
    assert torch.equal(
        out.sequences, target.generate(torch.arange(10, 20)[None], max_new_tokens=1, do_sample=False)
    )


@pytest.mark.parametrize("rounds_per_sync", [1, 3])
def test_captured_rounds_equal_eager_ones(target, rounds_per_sync):
    """The lookup stage has fixed shapes and no host read: the CPU graph recorder captures and replays it,
    sampled too, with the same outputs as eager rounds; a second request replays the kept graphs. (A round
    is as wide as its longest draft, read between the stages, except inside a unit of rounds_per_sync
    rounds: there every round verifies k positions, so sampled draws differ from rounds read one by one.)"""
    ids, mask = _prompts(1)
    eager = SpeculativeEngine(
        target, None, config=EngineConfig(num_draft_tokens=5, rounds_per_sync=rounds_per_sync)
    )
    captured = SpeculativeEngine(
        target,
        None,
        config=EngineConfig(num_draft_tokens=5, cuda_graphs=True, rounds_per_sync=rounds_per_sync),
    )
    for sampling in ({}, {"do_sample": True, "top_k": 0}):
        outs = []
        for engine in (eager, captured, captured):
            torch.manual_seed(3)
            outs.append(
                engine.generate(ids, attention_mask=mask, max_new_tokens=24, pad_token_id=0, **sampling)
            )
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_request_options_apply(target):
    """Processors, EOS, stop at max_new_tokens and num_return_sequences, as with a drafter."""
    ids, mask = _prompts(2)
    options = dict(max_new_tokens=20, repetition_penalty=1.3, no_repeat_ngram_size=3, pad_token_id=0)
    expected = target.generate(ids, attention_mask=mask, do_sample=False, **options)
    out = omnidraft_fast.generate(target, ids, attention_mask=mask, prompt_lookup_num_tokens=4, **options)
    assert torch.equal(out, expected)
    torch.manual_seed(0)
    sampled = omnidraft_fast.generate(
        target, ids, attention_mask=mask, prompt_lookup_num_tokens=4, do_sample=True, num_return_sequences=2,
        max_new_tokens=12, pad_token_id=0,
    )  # fmt: skip
    assert sampled.shape[0] == 2 * ids.shape[0]


def test_the_draft_length_comes_from_prompt_lookup_num_tokens(target):
    ids, mask = _prompts()
    engine = SpeculativeEngine(target, None, config=EngineConfig(num_draft_tokens=2))
    drafted = {}
    for kwargs, most in (({}, 2), ({"prompt_lookup_num_tokens": 6}, 6), ({"num_draft_tokens": 3}, 3)):
        out = engine.generate(ids, attention_mask=mask, max_new_tokens=30, pad_token_id=0,
                              return_dict_in_generate=True, **kwargs)  # fmt: skip
        drafted[most] = out.stats.drafted_per_round
        assert 0 < drafted[most] <= most
    assert drafted[2] < drafted[3] < drafted[6], drafted
    # from a generation_config, the model's or the call's, as transformers reads it
    config = GenerationConfig(prompt_lookup_num_tokens=3, max_matching_ngram_size=1, max_new_tokens=8)
    expected = target.generate(ids[:1], do_sample=False, generation_config=config, pad_token_id=0)
    assert torch.equal(
        omnidraft_fast.generate(target, ids[:1], generation_config=config, pad_token_id=0), expected
    )
    # max_matching_ngram_size=0 is transformers' default, 2 (its generate() reads `... or 2`)
    config = GenerationConfig(prompt_lookup_num_tokens=3, max_matching_ngram_size=0, max_new_tokens=8)
    expected = target.generate(ids[:1], do_sample=False, generation_config=config, pad_token_id=0)
    out = omnidraft_fast.generate(target, ids[:1], generation_config=config, pad_token_id=0,
                                  return_dict_in_generate=True)  # fmt: skip
    assert torch.equal(out.sequences, expected)
    two = omnidraft_fast.generate(target, ids[:1], generation_config=config, pad_token_id=0,
                                  max_matching_ngram_size=2, return_dict_in_generate=True)  # fmt: skip
    assert out.stats.proposed == two.stats.proposed and out.stats.accepted == two.stats.accepted
    # any longest suffix transformers takes, longer than every context too
    big = omnidraft_fast.generate(target, ids[:1], generation_config=config, pad_token_id=0,
                                  max_matching_ngram_size=10**6)  # fmt: skip
    assert torch.equal(big, expected)


def test_what_prompt_lookup_cannot_do_is_refused(target):
    drafter = tiny_model("llama", VOCAB, seed=6, layers=1)
    ids = torch.tensor([[1, 2, 3, 1, 2]])
    with pytest.raises(ValueError, match=r"prompt_lookup_num_tokens.*drafts with its drafter"):
        omnidraft_fast.generate(target, ids, drafter=drafter, prompt_lookup_num_tokens=4)
    with pytest.raises(ValueError, match=r"max_matching_ngram_size.*drafts with its drafter"):
        SpeculativeEngine(target, drafter).generate(ids, max_matching_ngram_size=2)
    with pytest.raises(ValueError, match=r"no drafter.*prompt_lookup_num_tokens"):
        omnidraft_fast.generate(target, ids)
    engine = SpeculativeEngine(target, None)
    for kwargs, match in (
        ({"prompt_lookup_num_tokens": 0}, "prompt_lookup_num_tokens"),
        ({"max_matching_ngram_size": -1}, "max_matching_ngram_size"),
        ({"max_matching_ngram_size": 1.5}, "max_matching_ngram_size"),
        ({"assistant_confidence_threshold": 0.4}, "assistant_confidence_threshold.*no drafter"),
        ({"cascade": CascadeConfig("chow", 0.2)}, "cascade.*no drafter"),
    ):
        with pytest.raises(ValueError, match=match):
            engine.generate(ids, max_new_tokens=4, **kwargs)
    assert engine.generate(ids, max_new_tokens=4).shape == (1, 9)  # still usable
    for config, match in (
        (EngineConfig(distill=DistillConfig()), "distill"),
        (EngineConfig(adaptive=AdaptiveConfig()), "adaptive"),
        (EngineConfig(confidence_threshold=0.4), "confidence_threshold"),
        (EngineConfig(cascade=CascadeConfig("diff", 0.1)), "cascade"),
    ):
        with pytest.raises(ValueError, match=match):
            SpeculativeEngine(target, None, config=config)
    with pytest.raises(ValueError, match="drafter_tokenizer"):
        SpeculativeEngine(target, None, drafter_tokenizer=object())


def test_bad_logits_name_the_model_alone():
    """Without a drafter, the error for NaN logits names the model only, and the engine serves on."""
    model = tiny_model("llama", VOCAB, seed=8)
    engine = SpeculativeEngine(model, None)
    ids = torch.tensor([[11, 12, 11, 12]])
    weight = model.lm_head.weight.data.clone()
    model.lm_head.weight.data.fill_(float("nan"))
    try:
        with pytest.raises(ValueError, match=r"^the model produced NaN"):
            engine.generate(ids, max_new_tokens=4)
    finally:
        model.lm_head.weight.data.copy_(weight)
    assert torch.equal(
        engine.generate(ids, max_new_tokens=4), model.generate(ids, max_new_tokens=4, do_sample=False)
    )
