"""The likelihood score of produced text against the target's law (omnidraft_fast.fidelity)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model

from omnidraft_fast.fidelity import TargetScore, score_against_target

VOCAB = 16


class _FixedLaw(torch.nn.Module):
    """A "target" whose next-token logits are the same at every position."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("law", torch.tensor(logits, dtype=torch.float32))

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.law.expand(*input_ids.shape, -1))


def test_the_score_by_hand():
    target = _FixedLaw([math.log(0.75), math.log(0.25)])  # p = (3/4, 1/4)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    variance = 0.75 * math.log(0.75) ** 2 + 0.25 * math.log(0.25) ** 2 - entropy**2
    score = score_against_target(target, torch.tensor([[0, 0, 1, 0]]), prompt=1)
    assert score.tokens == 3 and score.greedy == 2
    assert score.log_likelihood == pytest.approx(2 * math.log(0.75) + math.log(0.25))
    assert score.surprise == pytest.approx(score.log_likelihood + 3 * entropy)
    assert score.variance == pytest.approx(3 * variance)
    assert score.z == pytest.approx(score.surprise / math.sqrt(3 * variance))
    # At T=2 the law is softmax(logits / 2) = (sqrt 3, 1) / (sqrt 3 + 1); the log-likelihood stays at T=1.
    hot = score_against_target(target, torch.tensor([[0, 1]]), prompt=1, temperature=2.0)
    q = 1 / (math.sqrt(3) + 1)
    hot_entropy = -((1 - q) * math.log(1 - q) + q * math.log(q))
    assert hot.surprise == pytest.approx(math.log(q) + hot_entropy)
    assert hot.log_likelihood == pytest.approx(math.log(0.25))
    # A law with ruled-out tokens: 0 * log 0 adds nothing; a certain token has nothing to score.
    certain = score_against_target(_FixedLaw([0.0, -math.inf]), torch.tensor([[0, 0, 0]]), prompt=1)
    assert (certain.surprise, certain.variance, certain.z) == (0.0, 0.0, 0.0)
    assert score_against_target(_FixedLaw([0.0, -math.inf]), torch.tensor([[0, 1]]), prompt=1).z == -math.inf


def test_scores_add():
    total = TargetScore()
    total += TargetScore(tokens=2, log_likelihood=-1.0, surprise=0.5, variance=1.0, greedy=1)
    total += TargetScore(tokens=3, log_likelihood=-2.0, surprise=-1.5, variance=3.0, greedy=3)
    assert total == TargetScore(tokens=5, log_likelihood=-3.0, surprise=-1.0, variance=4.0, greedy=4)
    assert (total.mean_log_likelihood, total.agreement, total.z) == (-0.6, 0.8, -0.5)
    assert TargetScore().z == 0.0 and TargetScore().agreement == 0.0


@pytest.fixture(scope="module")
def target():
    model = tiny_model("llama", VOCAB, seed=5, hidden=32)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)  # laws far from uniform, as a trained model's are
    return model


def _sampled(target, temperature: float, rows: int = 64, new: int = 24) -> torch.Tensor:
    torch.manual_seed(0)
    prompt = torch.randint(VOCAB, (1, 4), generator=torch.Generator().manual_seed(1)).expand(rows, -1)
    return target.generate(prompt, max_new_tokens=new, do_sample=True, temperature=temperature, top_k=0)


def test_samples_of_the_target_score_near_zero_and_others_do_not(target):
    """z is about standard normal for the target's own samples (1536 tokens here), at each temperature
    scored at that temperature, and far from 0 when the law differs: hotter samples are less likely than
    the target's (z < 0), greedy output more likely (z > 0)."""
    for temperature in (1.0, 0.7):
        exact = score_against_target(target, _sampled(target, temperature), 4, temperature)
        assert exact.tokens == 64 * 24 and abs(exact.z) < 4, (temperature, exact)
    assert score_against_target(target, _sampled(target, 1.6), 4).z < -8
    assert score_against_target(target, _sampled(target, 0.7), 4).z > 8
    greedy = score_against_target(
        target, target.generate(_sampled(target, 1.0, new=1)[:, :4], max_new_tokens=24), 4
    )
    assert greedy.agreement == 1.0 and greedy.z > 8


def test_bad_arguments(target):
    ids = torch.zeros(1, 5, dtype=torch.int64)
    for prompt in (0, 5):
        with pytest.raises(ValueError, match="`prompt` must be in"):
            score_against_target(target, ids, prompt)
    with pytest.raises(ValueError, match="`temperature` must be > 0"):
        score_against_target(target, ids, 2, temperature=0.0)
