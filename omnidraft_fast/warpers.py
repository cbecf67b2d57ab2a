"""transformers' sampling warpers for a request, in transformers' order, built from its own classes except
two it implements with host reads (top-h and eta), written out here without them so that a round with
them stays free of syncs and capturable."""

from __future__ import annotations

import torch
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from .config import SamplingParams
from .processing import Processing

__all__ = ["EtaWarper", "TopHWarper", "sampling_warpers"]


def sampling_warpers(
    sampling: SamplingParams, processing: Processing | None = None, device: torch.device | None = None
) -> LogitsProcessorList:
    """transformers' sampling warpers for a request, in its order: temperature, (with ``processing``) top-h,
    top-k, top-p, then (with ``processing``) min-p, typical, epsilon and eta. Greedy: none."""
    chain = []
    if not sampling.greedy:
        if sampling.temperature != 1.0:
            chain.append(TemperatureLogitsWarper(sampling.temperature))
        if processing is not None and processing.top_h > 0:
            chain.append(TopHWarper(processing.top_h))
        if sampling.top_k:
            chain.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1.0:
            chain.append(TopPLogitsWarper(sampling.top_p))
        if processing is not None:
            if processing.min_p > 0:
                chain.append(MinPLogitsWarper(processing.min_p))
            if processing.typical_p < 1:
                chain.append(TypicalLogitsWarper(processing.typical_p))
            if processing.epsilon_cutoff > 0:
                chain.append(EpsilonLogitsWarper(processing.epsilon_cutoff))
            if processing.eta_cutoff > 0:
                chain.append(EtaWarper(processing.eta_cutoff, device or torch.device("cpu")))
    return LogitsProcessorList(chain)


class TopHWarper(LogitsProcessor):
    """transformers' ``TopHLogitsWarper`` (top-H sampling: of the 100 likeliest tokens, those in order of
    probability while their cumulative entropy stays within ``top_h`` times the entropy of those 100,
    at least one) without its host reads (a ``torch.distributions.Categorical``, which checks its
    argument on the host, and a boolean-mask assignment). The same arithmetic, written out."""

    def __init__(self, top_h: float):
        self.top_h = top_h

    def __call__(self, input_ids: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
        top_logits, top_ids = scores.topk(min(100, scores.shape[-1]), dim=-1)
        normalised = top_logits - top_logits.logsumexp(-1, keepdim=True)
        probs = normalised.softmax(-1)
        entropy = -(normalised.clamp(min=torch.finfo(normalised.dtype).min) * probs).sum(-1, keepdim=True)
        selected = torch.cumsum(-probs * torch.log(probs), -1) <= entropy * self.top_h
        selected[..., 0] = True
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top_ids, selected)
        return scores.masked_fill(~keep, -torch.inf)


class EtaWarper(LogitsProcessor):
    """transformers' ``EtaLogitsWarper`` (one token kept at least) without its host read: it takes the
    entropy from a ``torch.distributions.Categorical``, which checks its argument on the host, a sync
    inside the round that no CUDA graph can hold. The same arithmetic, written out."""

    def __init__(self, epsilon: float, device: torch.device):
        self.epsilon = torch.tensor(epsilon, device=device)

    def __call__(self, input_ids: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
        probabilities = scores.softmax(-1)
        normalised = (scores - scores.logsumexp(-1, keepdim=True)).clamp(min=torch.finfo(scores.dtype).min)
        entropy = -(normalised * probabilities).sum(-1)
        eta = torch.min(self.epsilon, torch.sqrt(self.epsilon) * torch.exp(-entropy))[..., None]
        remove = (probabilities < eta) & (scores < scores.amax(-1, keepdim=True))
        return scores.masked_fill(remove, -torch.inf)
