"""Sampling is lossless: the joint law of the first tokens equals the target's, whatever the drafter.

One generate() call runs N identical prompts as N rows, so each row is an independent draw. We compare
the empirical distribution of the first two new tokens with the exact one (from the target's logits and
transformers' own warpers) in total variation. With K outcomes, E[TV] <= 0.5 * sum_i sqrt(p_i (1-p_i) / N),
and McDiarmid's inequality (one sample moves TV by at most 1/N) puts TV above that plus
t = sqrt(ln(1/delta) / (2N)) with probability at most delta = 1e-6. Seeds are fixed, so the test is
deterministic; a negative control checks that the bound is tight enough to catch the drafter's law.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from omnidraft_fast import AdaptiveConfig, EngineConfig, SpeculativeEngine

pytestmark = pytest.mark.law

VOCAB = 8
ROWS = 8000
PROMPT = torch.tensor([[3, 1, 4, 1, 5]])
# The prompt padded inside the engine to 8 columns, not the default 64: the same law, and thousands of rows'
# prefills a fraction of the cost.
BUCKET = 8


def _warp(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers(None, logits.float()).softmax(-1)


@torch.no_grad()
def _exact_joint(model, temperature, top_k, top_p, prompt: torch.Tensor = PROMPT) -> torch.Tensor:
    """[VOCAB, VOCAB]: P(first new token = a, second = b) under the warped model."""
    first = _warp(model(prompt).logits[:, -1], temperature, top_k, top_p)[0]  # [V]
    continued = torch.cat([prompt.expand(VOCAB, -1), torch.arange(VOCAB)[:, None]], 1)
    second = _warp(model(continued).logits[:, -1], temperature, top_k, top_p)  # [V, V]
    return first[:, None] * second


def _tv_bound(joint: torch.Tensor, rows: int, delta: float = 1e-6) -> float:
    p = joint.flatten().double()
    expected = 0.5 * torch.sqrt(p * (1 - p) / rows).sum().item()
    return expected + math.sqrt(math.log(1 / delta) / (2 * rows))


@pytest.fixture(scope="module")
def models():
    target = tiny_model("llama", VOCAB, seed=11, hidden=32)
    drafter = tiny_model("gpt2", VOCAB, seed=12, hidden=32, layers=1)
    with torch.no_grad():
        drafter.lm_head.weight.mul_(6.0)  # a confident drafter whose law is far from the target's
    return target, drafter


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p", "k", "threshold"),
    [
        (1.0, 0, 1.0, 1, None),
        (1.0, 0, 1.0, 3, None),
        (0.7, 5, 1.0, 2, None),
        (1.3, 0, 0.8, 2, None),
        (0.9, 6, 0.85, 4, None),
        # rows stop drafting where the drafter is unsure (assistant_confidence_threshold): still lossless
        (1.0, 0, 1.0, 3, 0.6),
        (0.9, 6, 0.85, 4, 0.8),
    ],
)
def test_first_two_tokens_follow_the_target(models, temperature, top_k, top_p, k, threshold):
    target, drafter = models
    torch.manual_seed(1234)
    out = SpeculativeEngine(target, drafter, config=EngineConfig(prompt_bucket=BUCKET)).generate(
        PROMPT.expand(ROWS, -1),
        max_new_tokens=2,
        do_sample=True,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        num_draft_tokens=k,
        assistant_confidence_threshold=threshold,
        return_dict_in_generate=True,
    )
    if threshold is not None:  # the rule stops some rows early and not others
        assert 1 < out.stats.drafted_per_round < k, out.stats.summary()
    new = out.sequences[:, PROMPT.shape[1] :]
    empirical = torch.bincount(new[:, 0] * VOCAB + new[:, 1], minlength=VOCAB * VOCAB).double() / ROWS
    exact = _exact_joint(target, temperature, top_k, top_p).flatten().double()
    bound = _tv_bound(exact, ROWS)
    tv = 0.5 * (empirical - exact).abs().sum().item()
    assert tv < bound, f"TV {tv:.4f} >= bound {bound:.4f}"
    assert out.stats.accepted > 0, "the drafter should get some tokens accepted, or the test proves little"

    # Negative control: the drafter's own law is far outside the bound, so a sampler that leaked it would fail.
    drafter_joint = _exact_joint(drafter, temperature, top_k, top_p).flatten().double()
    assert 0.5 * (drafter_joint - exact).abs().sum().item() > 2 * bound


@pytest.mark.parametrize("stopping", ["confidence", "head"])
def test_rows_that_stop_drafting_propose_nothing_after(stopping):
    """A row that stops drafting early (confidence threshold, acceptance head) proposes nothing at the later
    positions: the token there comes from the target's law, not from a residual against the drafter's
    unused distribution. A drafter of middling confidence stops rows at every step."""
    target = tiny_model("llama", VOCAB, seed=11, hidden=32, layers=1)
    drafter = tiny_model("gpt2", VOCAB, seed=13, hidden=32, layers=1)
    with torch.no_grad():
        target.lm_head.weight.mul_(3.0)
        drafter.lm_head.weight.mul_(2.0)  # (had the later positions' q been left in: TV 0.26)
    rows = 2 * ROWS
    config = (
        EngineConfig(num_draft_tokens=4, confidence_threshold=0.3, prompt_bucket=BUCKET)
        if stopping == "confidence"
        else EngineConfig(
            num_draft_tokens=4,
            adaptive=AdaptiveConfig(gamma=0.75, confidence_input=True),
            prompt_bucket=BUCKET,
        )
    )
    torch.manual_seed(2)
    out = SpeculativeEngine(target, drafter, config=config).generate(
        PROMPT.expand(rows, -1), max_new_tokens=2, do_sample=True, top_k=0, return_dict_in_generate=True
    )
    assert 1 < out.stats.drafted_per_round < 3, out.stats.summary()
    new = out.sequences[:, PROMPT.shape[1] :]
    empirical = torch.bincount(new[:, 0] * VOCAB + new[:, 1], minlength=VOCAB * VOCAB).double() / rows
    exact = _exact_joint(target, 1.0, 0, 1.0).flatten().double()
    tv = 0.5 * (empirical - exact).abs().sum().item()
    assert tv < _tv_bound(exact, rows), f"TV {tv:.4f} >= bound {_tv_bound(exact, rows):.4f}"


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.8, 5, 0.9)])
def test_prompt_lookup_follows_the_target(temperature, top_k, top_p):
    """Prompt lookup (no drafter) proposes copies of the context, certain proposals verified by exact match:
    both tokens follow the target's law. The prompt ends with a token it holds earlier, so the first round
    drafts too."""
    target = tiny_model("llama", VOCAB, seed=11, hidden=32)
    with torch.no_grad():
        target.lm_head.weight.mul_(2.0)
    prompt = torch.tensor([[3, 1, 2, 1]])  # drafts 2, 1 first: 2 is in the top-k/top-p set
    torch.manual_seed(7)
    out = SpeculativeEngine(target, None, config=EngineConfig(prompt_bucket=BUCKET)).generate(
        prompt.expand(ROWS, -1), prompt_lookup_num_tokens=3, max_new_tokens=2, do_sample=True,
        temperature=temperature, top_k=top_k, top_p=top_p, return_dict_in_generate=True,
    )  # fmt: skip
    assert out.stats.accepted > 0.05 * ROWS, out.stats.summary()
    new = out.sequences[:, prompt.shape[1] :]
    empirical = torch.bincount(new[:, 0] * VOCAB + new[:, 1], minlength=VOCAB * VOCAB).double() / ROWS
    exact = _exact_joint(target, temperature, top_k, top_p, prompt).flatten().double()
    tv = 0.5 * (empirical - exact).abs().sum().item()
    assert tv < _tv_bound(exact, ROWS), f"TV {tv:.4f} >= bound {_tv_bound(exact, ROWS):.4f}"
