"""Adaptive draft length from the drafter's confidence (EngineConfig.confidence_threshold, transformers'
``assistant_confidence_threshold``): rows stop drafting after a token their drafter was unsure of."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import left_padded_prompts, peaked_pair

from omnidraft_fast import AdaptiveConfig, EngineConfig, SpeculativeEngine
from omnidraft_fast.adaptive import AcceptanceHead, DraftLength

VOCAB = 64
NEW = 16


@pytest.fixture(scope="module")
def pair():  # confident enough that the drafter's confidence varies
    return peaked_pair(VOCAB, seed=31, head_scale=40, noise=0.4, eos_token_id=3)


def _engine(pair, **config):
    target, drafter = pair
    return SpeculativeEngine(target, copy.deepcopy(drafter), config=EngineConfig(**config))


def _run(engine, **kwargs) -> tuple[torch.Tensor, float]:
    """The output of three left-padded prompts (greedy: checked against the target's) and the drafted tokens
    per row and round."""
    target = engine.target.model
    ids, mask = left_padded_prompts(VOCAB, [5, 9, 7], seed=2)
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=NEW, **kwargs)
    if not kwargs.get("do_sample"):
        expected = target.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
        assert torch.equal(out, expected)
    stats = engine.last_stats
    return out, stats.drafted_per_round


def _drafted_per_row_round(engine, **kwargs) -> float:
    return _run(engine, **kwargs)[1]


def test_draft_length_state_by_hand():
    length = DraftLength(None, 3, gamma=1.0, k_min=1, device=torch.device("cpu"), confidence=0.5)
    length.reset(torch.tensor([False, False, True]))  # the third row is done: stopped from the start
    length.step(1, None, torch.tensor([0.9, 0.4, 0.1]))
    assert length.stopped.tolist() == [False, True, True] and length.drafted.tolist() == [1, 1, 0]
    length.step(2, None, torch.tensor([0.5, 0.99, 0.99]))  # 0.5 is not below 0.5; stopped rows stay stopped
    assert length.stopped.tolist() == [False, True, True] and length.drafted.tolist() == [2, 1, 0]
    length.step(3, None, torch.tensor([0.2, 0.99, 0.99]))
    assert length.stopped.tolist() == [True, True, True] and length.drafted.tolist() == [3, 1, 0]
    # With a head too, a row stops at the first rule that says so (here the head's prior 0.3 at gamma 0.5).
    both = DraftLength(AcceptanceHead(8, prior=0.3), 2, gamma=0.5, k_min=1, device=torch.device("cpu"),
                       confidence=0.5)  # fmt: skip
    both.reset(torch.tensor([False, False]))
    both.step(1, torch.zeros(2, 8), torch.tensor([0.9, 0.1]))
    assert both.stopped.tolist() == [True, True]
    with pytest.raises(ValueError, match="needs a stopping rule"):
        DraftLength(None, 1, gamma=1.0, k_min=1, device=torch.device("cpu"))


@pytest.mark.parametrize("do_sample", [False, True])
def test_rows_draft_less_the_higher_the_threshold(pair, do_sample):
    """Greedy output stays the target's; the drafted tokens per row and round fall from k (off) to 1 (at
    threshold 1, every token but a certain one ends the draft)."""
    k = 6
    sampling = {"do_sample": True, "temperature": 1.0, "top_k": 0} if do_sample else {}
    per_round = []
    for threshold in (None, 0.3, 0.7, 1.0):
        torch.manual_seed(0)
        engine = _engine(pair, num_draft_tokens=k, confidence_threshold=threshold)
        per_round.append(_drafted_per_row_round(engine, **sampling))
    assert per_round[0] == k and per_round[-1] == 1.0, per_round
    assert k > per_round[1] > per_round[2] > 1.0, per_round


def test_a_request_sets_or_clears_the_threshold(pair):
    k = 5
    engine = _engine(pair, num_draft_tokens=k, confidence_threshold=1.0)
    assert _drafted_per_row_round(engine) == 1.0
    assert _drafted_per_row_round(engine, assistant_confidence_threshold=0.0) == k  # 0: off for this request
    plain = _engine(pair, num_draft_tokens=k)
    assert _drafted_per_row_round(plain) == k
    assert _drafted_per_row_round(plain, assistant_confidence_threshold=1.0) == 1.0
    assert _drafted_per_row_round(plain) == k  # per request: the next one drafts k again


def test_with_a_head_captured_and_several_rounds_per_read(pair):
    """Confidence with an acceptance head, in captured stages (ReplayGraph on the CPU) and with several
    rounds per host read (every round then drafts k steps, rows stop proposing): greedy outputs are the
    target's, sampled ones equal eager mode's."""
    requests = [{}, {"do_sample": True, "temperature": 0.8, "top_k": 0}]
    outputs = []
    for extra in ({}, {"cuda_graphs": True}, {"rounds_per_sync": 3}):
        engine = _engine(pair, num_draft_tokens=4, confidence_threshold=0.6,
                         adaptive=AdaptiveConfig(interval=1_000_000, prior=0.9, gamma=0.5), **extra)  # fmt: skip
        outs = []
        for sampling in requests:
            torch.manual_seed(7)
            out, drafted = _run(engine, **sampling)
            assert 1 <= drafted < 4
            outs.append(out)
        outputs.append(outs)
    for eager, captured in zip(outputs[0], outputs[1], strict=True):
        assert torch.equal(eager, captured)


def test_cross_vocabulary_greedy_is_exact(cross_pair):
    """Across vocabularies a row proposes only target tokens whose drafted tokens it drafted before it
    stopped; greedy output stays the target's for every translation."""
    target, drafter, target_tokenizer, drafter_tokenizer = cross_pair
    ids = target_tokenizer(["def f(x):\n    return x", "a = 1"], return_tensors="pt", padding=True,
                           padding_side="left")  # fmt: skip
    expected = target.generate(**ids, max_new_tokens=NEW, do_sample=False)
    for translation in ("omnidraft", "tli", "exact"):
        engine = SpeculativeEngine(target, drafter, target_tokenizer=target_tokenizer,
                                   drafter_tokenizer=drafter_tokenizer,
                                   config=EngineConfig(num_draft_tokens=5, translation=translation,
                                                       confidence_threshold=0.5))  # fmt: skip
        assert torch.equal(engine.generate(**ids, max_new_tokens=NEW), expected), translation
        assert engine.last_stats.drafter_proposed < 5 * engine.last_stats.row_rounds


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), "0.5", True])
def test_bad_thresholds(pair, value):
    with pytest.raises(ValueError, match=r"`confidence_threshold` must be a probability in \[0, 1\]"):
        EngineConfig(confidence_threshold=value)
    engine = _engine(pair)
    with pytest.raises(
        ValueError, match=r"`assistant_confidence_threshold` must be a probability in \[0, 1\]"
    ):
        engine.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, assistant_confidence_threshold=value)
    assert _drafted_per_row_round(engine) == 4  # the engine still works
