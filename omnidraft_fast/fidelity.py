"""How a decoder's output compares with its target's distribution, teacher-forced on the produced text.

For produced tokens ``x_t`` with the target's next-token law ``p_t`` at each prefix (the distribution a
sampler at temperature ``T`` draws from: ``softmax(logits / T)``, no top-k/top-p), let

    s_t = log p_t(x_t) + H(p_t),        v_t = Var_{x ~ p_t}[log p_t(x)] = sum_x p_t(x) log^2 p_t(x) - H(p_t)^2

If every ``x_t`` is drawn from ``p_t`` (lossless sampling, whatever the drafter proposed), each ``s_t`` has
mean 0 and variance ``v_t`` given the prefix, so ``z = sum s_t / sqrt(sum v_t)`` is a martingale sum that is
about standard normal over many tokens. ``|z| > 4`` is far outside what exact sampling produces (a chance
of about 6e-5): the sampler draws tokens that are systematically less likely (``z < 0``: e.g. a drafter's
own law, or transformers' TLI sampling on the embedded zoo) or more likely (``z > 0``: e.g. a lower
temperature) than the target's. One forward of the target per scored sequence: it checks the samples a
benchmark already produced, in place of thousands of draws at one context.

It is one number, so it sees only biases that move the likelihood: a sampler that swaps mass between
tokens the target finds about as likely can score near 0 (accepting the embedded zoo's drafts 1.5 or 3
times as often as speculative sampling allows stayed within 2 over 576 tokens). A near-zero ``z`` is
necessary for a lossless sampler, not proof of one; the exact checks are the total-variation tests on
small vocabularies (``tests/test_lossless_sampling.py``).

The same pass gives the figures of greedy decoding and of speculative cascades: the target's mean
log-likelihood per produced token and the share of produced tokens that are its greedy choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["TargetScore", "score_against_target"]


@dataclass
class TargetScore:
    """Sums over scored tokens (add scores of several sequences with ``+=``)."""

    tokens: int = 0
    log_likelihood: float = 0.0  # sum of the target's log-probabilities of x_t (its own law, temperature 1)
    surprise: float = 0.0  # sum s_t = sum (log p_t(x_t) + H(p_t))
    variance: float = 0.0  # sum v_t
    greedy: int = 0  # tokens equal to the target's argmax

    def __iadd__(self, other: TargetScore) -> TargetScore:
        self.tokens += other.tokens
        self.log_likelihood += other.log_likelihood
        self.surprise += other.surprise
        self.variance += other.variance
        self.greedy += other.greedy
        return self

    @property
    def mean_log_likelihood(self) -> float:
        return self.log_likelihood / max(self.tokens, 1)

    @property
    def agreement(self) -> float:
        """Share of the produced tokens that are the target's greedy choice."""
        return self.greedy / max(self.tokens, 1)

    @property
    def z(self) -> float:
        """The module docstring's ``z``: about standard normal when the tokens were sampled from the target
        (-inf when a token is one the target rules out, 0.0 with nothing to score: every ``p_t`` one-hot)."""
        if math.isinf(self.surprise):
            return self.surprise
        return self.surprise / math.sqrt(self.variance) if self.variance > 0 else 0.0


@torch.no_grad()
def score_against_target(
    target: torch.nn.Module,
    sequences: torch.Tensor,  # [batch, n] prompt then produced tokens, every row scored whole
    prompt: int,  # width of the prompt (the produced tokens are sequences[:, prompt:])
    temperature: float = 1.0,
) -> TargetScore:
    """Teacher-force ``target`` (a Hugging Face causal LM) over ``sequences`` and score the produced tokens
    against ``softmax(logits / temperature)`` at each prefix (the log-likelihood against the target's own law).
    Rows are read whole, with no attention mask: pass them as produced, without padding (a batch's left
    padding would join the context, and the padding after a row's end would be scored as produced tokens)."""
    if not 0 < prompt < sequences.shape[1]:
        raise ValueError(
            f"`prompt` must be in [1, {sequences.shape[1]}) (sequences are [batch, n] with at least one prompt "
            f"and one produced token), got {prompt}"
        )
    if not temperature > 0:
        raise ValueError(f"`temperature` must be > 0 (the law sampled from), got {temperature!r}")
    logits = target(sequences).logits[:, prompt - 1 : -1].float()
    produced = sequences[:, prompt:]
    log_p = (logits / temperature).log_softmax(-1)
    own = log_p if temperature == 1 else logits.log_softmax(-1)
    p = log_p.exp()
    # 0 * log 0 is 0: a token the target rules out adds nothing to the entropy or the variance
    weighted = torch.where(p > 0, p * log_p, 0.0)
    entropy = -weighted.sum(-1)
    variance = (torch.where(p > 0, weighted * log_p, 0.0).sum(-1) - entropy.square()).clamp_min(0)
    chosen = log_p.gather(-1, produced[..., None])[..., 0]
    return TargetScore(
        tokens=produced.numel(),
        log_likelihood=float(own.gather(-1, produced[..., None]).sum()),
        surprise=float((chosen + entropy).sum()),
        variance=float(variance.sum()),
        greedy=int((logits.argmax(-1) == produced).sum()),
    )
