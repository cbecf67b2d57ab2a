"""Target-side logits processing (repetition_penalty, no_repeat_ngram_size, min_length, min_new_tokens, min_p)
as transformers applies it:
greedy output equal to transformers', sampled output in the processed target's law, scores equal."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from conftest import left_padded_prompts, peaked_pair
from transformers.generation.logits_process import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

from omnidraft_fast import EngineConfig, SpeculativeEngine

VOCAB = 48
NEW = 14


@pytest.fixture(scope="module")
def pair():  # peaked laws: greedy runs repeat tokens, so the penalty changes them
    return peaked_pair(VOCAB, seed=41, head_scale=8, noise=0.3, eos_token_id=2)


def _engine(pair, **config):
    return SpeculativeEngine(*pair, config=EngineConfig(num_draft_tokens=4, **config))


# transformers 5.24 leaves a prompt's left padding out of the penalty (older releases count the pad ids).
_SKIPS_PADDING = "prompt_ignore_length" in inspect.signature(RepetitionPenaltyLogitsProcessor).parameters


@pytest.mark.parametrize("cuda_graphs", [False, True])
@pytest.mark.parametrize(
    "options",
    [
        {"repetition_penalty": 1.5},
        {"repetition_penalty": 0.7},  # < 1 rewards repeats
        {"min_new_tokens": 9},
        {"min_length": 15},
        {"repetition_penalty": 1.3, "min_new_tokens": 5},
        {"no_repeat_ngram_size": 2},
        {"no_repeat_ngram_size": 3, "repetition_penalty": 1.2},
        {"no_repeat_ngram_size": 1},
    ],
)
def test_greedy_equals_transformers(pair, options, cuda_graphs):
    target, _ = pair
    rows = [6, 6] if "repetition_penalty" in options and not _SKIPS_PADDING else [6, 4, 9]
    ids, mask = left_padded_prompts(VOCAB, rows, seed=3)
    # EOS: the third token of row 0's greedy continuation, so that a minimum length holds it back.
    eos = int(target.generate(ids, attention_mask=mask, max_new_tokens=3, pad_token_id=0)[0, -1])
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0, **options)
    plain = target.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
    expected = target.generate(ids, do_sample=False, **kwargs)
    assert not torch.equal(expected, plain), "the option should change this output, or the test proves little"
    engine = _engine(pair, cuda_graphs=cuda_graphs)
    for _ in range(2):  # with cuda_graphs the second request replays the captured round
        assert torch.equal(engine.generate(ids, **kwargs), expected)
    assert engine.stats.accepted > 0


def test_the_minimum_holds_back_an_early_eos(pair):
    """A row whose greedy continuation emits EOS early runs to min_new_tokens first (EOS masked before)."""
    target, _ = pair
    ids = torch.tensor([[5, 9, 13]])
    for eos in range(3, VOCAB):
        out = target.generate(ids, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
        if out.shape[1] - ids.shape[1] < 6:
            break
    else:
        pytest.skip("no token ends this greedy continuation within 6 tokens")
    engine = _engine(pair)
    out = engine.generate(ids, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0, min_new_tokens=8)
    assert out.shape[1] - ids.shape[1] >= 8 and eos not in out[0, ids.shape[1] : ids.shape[1] + 7].tolist()
    assert torch.equal(out, target.generate(ids, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0,
                                            min_new_tokens=8))  # fmt: skip


def test_scores_are_transformers_processed_scores(pair):
    target, _ = pair
    ids = torch.tensor([[5, 9, 13, 5], [7, 7, 1, 20]])
    kwargs = dict(max_new_tokens=NEW, eos_token_id=2, pad_token_id=0, repetition_penalty=1.4, min_new_tokens=6,
                  return_dict_in_generate=True, output_scores=True, output_logits=True)  # fmt: skip
    expected = target.generate(ids, do_sample=False, **kwargs)
    out = _engine(pair).generate(ids, **kwargs)
    assert torch.equal(out.sequences, expected.sequences)
    done = torch.zeros(2, dtype=torch.bool)
    for step, (score, theirs) in enumerate(zip(out.scores, expected.scores, strict=True)):
        torch.testing.assert_close(score[~done], theirs[~done], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(
            out.logits[step][~done], expected.logits[step][~done], atol=1e-4, rtol=1e-4
        )
        if step < 6:
            assert (score[:, 2] == -math.inf).all()  # EOS held back by min_new_tokens
        done |= expected.sequences[:, ids.shape[1] + step] == 2


ROWS = 8000


def test_sampled_law_is_the_processed_targets(pair):
    """The first two sampled tokens (T=0.6) follow the target's law after the repetition penalty (the second
    with the first in its context; 0.3 rewards repeats, which moves this law far) and min_new_tokens (no
    EOS), whatever the drafter: total variation within the bound of tests/test_lossless_sampling.py (delta
    1e-6), and the unprocessed law outside it."""
    target, _ = pair
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(0.3)])

    @torch.no_grad()
    def law(context: torch.Tensor, processed: bool) -> torch.Tensor:  # [n, V] next-token law per context
        logits = target(context).logits[:, -1].float()
        if processed:
            logits = processors(context, logits)
            logits[:, 2] = -math.inf  # min_new_tokens=4: EOS masked at both positions
        return (logits / 0.6).softmax(-1)

    def joint(processed: bool) -> torch.Tensor:
        first = law(prompt, processed)[0]
        continued = torch.cat([prompt.expand(VOCAB, -1), torch.arange(VOCAB)[:, None]], 1)
        return (first[:, None] * law(continued, processed)).flatten().double()

    torch.manual_seed(0)
    out = _engine(pair).generate(
        prompt.expand(ROWS, -1), max_new_tokens=2, do_sample=True, temperature=0.6, top_k=0,
        repetition_penalty=0.3, min_new_tokens=4, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    new = out[:, prompt.shape[1] :]
    empirical = torch.bincount(new[:, 0] * VOCAB + new[:, 1], minlength=VOCAB * VOCAB).double() / ROWS
    exact = joint(True)
    bound = 0.5 * torch.sqrt(exact * (1 - exact) / ROWS).sum().item() + math.sqrt(math.log(1e6) / (2 * ROWS))
    assert 0.5 * (empirical - exact).abs().sum().item() < bound
    assert 0.5 * (joint(False) - exact).abs().sum().item() > 2 * bound  # the processing matters here


def test_min_p_sampling_follows_transformers_law(pair):
    """min_p (with top-k, at T=0.8): the first token's law is transformers' (temperature, top-k, min-p
    warpers) within the total-variation bound, and far from the law without min-p; greedy ignores min_p as
    transformers does; min_p with top_p < 1 is refused (transformers applies top-p first)."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
    )

    target, _ = pair
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        logits = target(prompt).logits[:, -1].float()
    warped = TopKLogitsWarper(12)(None, TemperatureLogitsWarper(0.8)(None, logits))
    exact = MinPLogitsWarper(0.2)(None, warped).softmax(-1)[0].double()
    engine = _engine(pair)
    torch.manual_seed(0)
    out = engine.generate(prompt.expand(ROWS, -1), max_new_tokens=1, do_sample=True, temperature=0.8, top_k=12,
                          min_p=0.2, eos_token_id=2, pad_token_id=0)  # fmt: skip
    empirical = torch.bincount(out[:, -1], minlength=VOCAB).double() / ROWS
    bound = 0.5 * torch.sqrt(exact * (1 - exact) / ROWS).sum().item() + math.sqrt(math.log(1e6) / (2 * ROWS))
    assert 0.5 * (empirical - exact).abs().sum().item() < bound
    assert 0.5 * (warped.softmax(-1)[0].double() - exact).abs().sum().item() > 2 * bound
    assert (empirical[exact == 0] == 0).all()  # nothing min-p removes is ever drawn
    ids = torch.tensor([[5, 9, 13, 5]])
    greedy = target.generate(ids, max_new_tokens=NEW, eos_token_id=2, pad_token_id=0)
    assert torch.equal(
        engine.generate(ids, max_new_tokens=NEW, eos_token_id=2, pad_token_id=0, min_p=0.5), greedy
    )
    with pytest.raises(ValueError, match=r"`min_p`=0.2 with `top_p`=0.9 is not supported"):
        engine.generate(ids, max_new_tokens=4, do_sample=True, top_p=0.9, min_p=0.2)
    with pytest.raises(ValueError, match=r"`min_p` must be in \[0, 1\]"):
        engine.generate(ids, max_new_tokens=4, do_sample=True, min_p=1.5)
