"""Drafter sampling: the distribution actually sampled from, and one draw from it.

Maths (speculative sampling, Leviathan et al. 2023, arXiv 2211.17192; the
filters follow transformers' logits warpers so that "top-k/top-p applied to both
models as the papers do" means exactly what ``model.generate`` samples from):

    z      = logits / T                                     (T > 0)
    top-k: keep z_v >= the k-th largest z                  (ties kept; k = 0 keeps all)
    top-p: sort softmax(z) ascending, drop the tokens whose cumulative mass is
           <= 1 - top_p, always keeping the most likely one
    q      = softmax(z restricted to the kept tokens)       (fp32)

One draw uses the exponential race: with ``E_v ~ Exp(1)`` i.i.d.,
``argmax_v q_v / E_v`` is distributed as ``q``. The noise is an argument, so a
draw is reproducible and the same noise gives the same token on every backend.
Greedy decoding (``T == 0``) is ``argmax z`` with ``q`` one-hot there.
"""

from __future__ import annotations

import torch

__all__ = ["nonfinite_rows_reference", "sample_reference", "sampling_probs_reference"]


def sampling_probs_reference(
    logits: torch.Tensor,  # [rows, vocab]
    temperature: float,
    top_k: int,
    top_p: float,
) -> torch.Tensor:  # [rows, vocab] fp32
    """The normalised distribution sampled from: temperature, then top-k, then top-p (one-hot if T == 0)."""
    z = logits.float()
    if temperature == 0.0:
        return torch.nn.functional.one_hot(z.argmax(-1), z.shape[-1]).float()
    z = z / temperature
    if 0 < top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=False)
        cumulative = sorted_z.softmax(-1).cumsum(-1)
        drop_sorted = cumulative <= 1 - top_p
        drop_sorted[..., -1] = False
        z = z.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return z.softmax(-1)


def sample_reference(
    logits: torch.Tensor,  # [rows, vocab]
    noise: torch.Tensor | None,  # [rows, vocab] Exp(1) draws; unused when greedy
    temperature: float,
    top_k: int,
    top_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # ids [rows] int64, probs [rows, vocab] fp32
    """Sample one token per row from ``sampling_probs_reference``; returns the ids and the distribution."""
    probs = sampling_probs_reference(logits, temperature, top_k, top_p)
    if temperature == 0.0:
        return probs.argmax(-1), probs
    return (probs / noise).argmax(-1), probs


def nonfinite_rows_reference(logits: torch.Tensor) -> torch.Tensor:  # logits [..., vocab] -> [...] bool
    """Rows a sampler cannot use: any NaN or +inf, or every entry -inf."""
    bad = torch.isnan(logits) | torch.isposinf(logits)
    return bad.any(-1) | torch.isneginf(logits).all(-1)
