"""Greedy speculative decoding reproduces the target's own greedy generate() token for token."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHITECTURES, left_padded_prompts, perturbed_copy, tiny_model

import omnidraft_fast

VOCAB = 96


@pytest.fixture(scope="module", params=ARCHITECTURES)
def target(request):
    return tiny_model(request.param, VOCAB, seed=0)


def _drafters(target, arch):
    other = "gpt2" if arch != "gpt2" else "llama"
    return {
        "self": target,  # every draft accepted: exercises the bonus token
        "perturbed": perturbed_copy(target, 0.15),  # ragged acceptance across rows
        "other-arch": tiny_model(other, VOCAB, seed=7, layers=1),  # mostly rejected
    }


def _reference(target, ids, mask, max_new_tokens, **kwargs):
    return target.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6, 7, 8])
def test_greedy_matches_target_batch_one(target, k):
    arch = target.config.model_type
    for seed in (0, 1):
        ids, mask = left_padded_prompts(VOCAB, [5 + seed], seed=seed)
        expected = _reference(target, ids, mask, 20)
        for name, drafter in _drafters(target, arch).items():
            out = omnidraft_fast.generate(
                target, ids, attention_mask=mask, drafter=drafter, max_new_tokens=20, num_draft_tokens=k
            )
            assert torch.equal(out, expected), f"{arch}, drafter {name}, k={k}, seed {seed}"


@pytest.mark.parametrize("k", [1, 3, 5, 8])
def test_greedy_matches_target_padded_batch(target, k):
    arch = target.config.model_type
    ids, mask = left_padded_prompts(VOCAB, [9, 4, 1], seed=3)
    expected = _reference(target, ids, mask, 16)
    for name, drafter in _drafters(target, arch).items():
        out = omnidraft_fast.generate(
            target, ids, attention_mask=mask, drafter=drafter, max_new_tokens=16, num_draft_tokens=k
        )
        assert torch.equal(out, expected), f"{arch}, drafter {name}, k={k}"


def test_rows_stop_at_their_own_eos():
    target = tiny_model("llama", VOCAB, seed=0)
    ids, mask = left_padded_prompts(VOCAB, [6, 3, 8], seed=5)
    free_run = _reference(target, ids, mask, 24)
    eos = int(free_run[0, ids.shape[1] + 3])  # a token row 0 emits early
    target.generation_config.eos_token_id = eos
    target.generation_config.pad_token_id = 0
    expected = _reference(target, ids, mask, 24)
    assert (expected[:, ids.shape[1] :] == 0).any(), "the case should pad at least one row"
    drafter = perturbed_copy(target, 0.3)
    for k in (1, 4, 8):
        out = omnidraft_fast.generate(
            target, ids, attention_mask=mask, drafter=drafter, max_new_tokens=24, num_draft_tokens=k
        )
        assert torch.equal(out, expected), f"k={k}"


def test_tied_embeddings_and_mixed_dtypes():
    target = tiny_model("qwen2", VOCAB, seed=2, tied=True)
    assert target.lm_head.weight is target.model.embed_tokens.weight
    drafter = tiny_model("mistral", VOCAB, seed=3, layers=1, dtype=torch.float64)
    ids, mask = left_padded_prompts(VOCAB, [7, 2], seed=1)
    expected = _reference(target, ids, mask, 18)
    out = omnidraft_fast.generate(target, ids, attention_mask=mask, drafter=drafter, max_new_tokens=18)
    assert torch.equal(out, expected)


def test_sliding_window_beyond_the_window():
    target = tiny_model("mistral", VOCAB, seed=4)
    target.config.sliding_window = 6
    ids, mask = left_padded_prompts(VOCAB, [8, 5], seed=2)
    expected = _reference(target, ids, mask, 14)
    out = omnidraft_fast.generate(
        target, ids, attention_mask=mask, drafter=perturbed_copy(target, 0.2), max_new_tokens=14
    )
    assert torch.equal(out, expected)


def test_acceptance_is_counted():
    target = tiny_model("llama", VOCAB, seed=0)
    ids, mask = left_padded_prompts(VOCAB, [6], seed=0)
    out = omnidraft_fast.generate(
        target, ids, attention_mask=mask, drafter=target, max_new_tokens=12, num_draft_tokens=3,
        return_dict_in_generate=True,
    )  # fmt: skip
    stats = out.stats
    assert stats.new_tokens == 12 and stats.accepted == stats.proposed  # self-drafting accepts everything
    assert stats.rounds == 3 and stats.mean_accepted_length == 4.0
    assert stats.target_calls_per_token == pytest.approx((1 + 3) / 12)


def test_models_cast_or_rebound_between_requests_are_followed():
    """An engine reads its models' dtype and device where they hold them at each request (``CausalLM.dtype``,
    ``device``: the first parameter as ``parameters()`` gives it, not kept from an earlier request): a target
    cast to float64 after a request, then its first parameter rebound to a float32 copy, still decodes as the
    target's own greedy generate() does, its attention masks in the model's dtype each time."""
    target = tiny_model("llama", VOCAB, seed=0)
    drafter = perturbed_copy(target, 0.15)
    engine = omnidraft_fast.SpeculativeEngine(target, drafter)
    ids, mask = left_padded_prompts(VOCAB, [7, 3], seed=2)
    assert torch.equal(
        engine.generate(ids, attention_mask=mask, max_new_tokens=8), _reference(target, ids, mask, 8)
    )
    target.to(torch.float64)
    assert engine.target.dtype == torch.float64
    assert torch.equal(
        engine.generate(ids, attention_mask=mask, max_new_tokens=8), _reference(target, ids, mask, 8)
    )
    assert engine.target.cache is None  # released; the request's mask values were float64
    target.to(torch.float32)
    embed = target.get_input_embeddings()
    embed.weight = torch.nn.Parameter(embed.weight.detach().to(torch.float16))  # rebound, another dtype
    assert engine.target.dtype == torch.float16 == next(target.parameters()).dtype
    embed.weight = torch.nn.Parameter(embed.weight.detach().float())
    assert torch.equal(
        engine.generate(ids, attention_mask=mask, max_new_tokens=8), _reference(target, ids, mask, 8)
    )
