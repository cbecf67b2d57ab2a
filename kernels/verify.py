"""Verification of a drafted block: exact speculative sampling.

Maths (Leviathan et al. 2023, arXiv 2211.17192; Chen et al. 2023, arXiv 2302.01318).
For a row with drafted tokens ``y_1..y_k`` sampled from ``q_1..q_k`` and target
distributions ``p_1..p_{k+1}`` (both after temperature/top-k/top-p, so they are
the distributions actually sampled from):

    a_j      = min(1, p_j(y_j) / q_j(y_j))          acceptance probability of y_j
    accepted = y_j while u_j < a_j                   (u_j ~ U[0, 1)), stop at the first failure j*
    residual = norm(max(0, p_j* - q_j*))             the correction token's distribution
    bonus    = p_{k+1}                                when all k were accepted

The emitted tokens then follow ``p`` exactly. If the residual's mass rounds to
zero (p == q up to rounding) it falls back to ``p_j*``. Greedy decoding is the
same procedure with one-hot ``p`` and ``q``: accept while ``y_j == argmax p_j``,
then emit ``argmax p_j*``.

Glossary (as in vLLM's rejection sampler): *accepted* tokens are drafted tokens
that passed; the *recovered* (correction) token is drawn from the residual at
the first rejection; the *bonus* token is drawn from ``p_{k+1}`` when every draft
passed; the *output* tokens are accepted + (recovered or bonus), ``-1`` padded.
"""

from __future__ import annotations

import torch

from .sampling import nonfinite_rows_reference, sampling_probs_reference

__all__ = ["verify_reference"]


def verify_reference(
    target_logits: torch.Tensor,  # [batch, k+1, vocab]
    draft_ids: torch.Tensor,  # [batch, k] int64
    draft_probs: torch.Tensor,  # [batch, k, vocab] fp32, the q each draft was sampled from
    uniforms: torch.Tensor,  # [batch, k] U[0, 1)
    noise: torch.Tensor | None,  # [batch, vocab] Exp(1) for the one residual/bonus draw; unused when greedy
    temperature: float,
    top_k: int,
    top_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``num_accepted`` [batch], ``output_tokens`` [batch, k+1] (-1 padded),
    ``accept_probs`` [batch, k] (the ``a_j``), and ``invalid`` [batch] (rows with unusable target logits)."""
    batch, k = draft_ids.shape
    p = sampling_probs_reference(target_logits, temperature, top_k, top_p)  # [batch, k+1, vocab]
    p_y = p[:, :k].gather(-1, draft_ids[..., None])[..., 0]  # [batch, k]
    q_y = draft_probs.gather(-1, draft_ids[..., None])[..., 0]  # [batch, k]
    accept_probs = torch.where(q_y > 0, p_y / q_y.clamp_min(torch.finfo(torch.float32).tiny), 0.0).clamp(
        max=1.0
    )
    accepted = uniforms < accept_probs  # [batch, k]
    num_accepted = accepted.long().cumprod(-1).sum(-1)  # [batch]

    rows = torch.arange(batch, device=draft_ids.device)
    p_stop = p[rows, num_accepted]  # [batch, vocab]
    q_stop = torch.cat([draft_probs, draft_probs.new_zeros(batch, 1, draft_probs.shape[-1])], 1)[
        rows, num_accepted
    ]
    residual = (p_stop - q_stop).clamp_min(0.0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_stop)
    if temperature == 0.0:
        final = residual.argmax(-1)
    else:
        final = (residual / noise).argmax(-1)  # exponential race; residual needs no normalising

    positions = torch.arange(k + 1, device=draft_ids.device)
    drafted = torch.cat([draft_ids, draft_ids.new_full((batch, 1), -1)], 1)  # [batch, k+1]
    output_tokens = torch.where(positions < num_accepted[:, None], drafted, -1)
    output_tokens.scatter_(1, num_accepted[:, None], final[:, None])
    invalid = nonfinite_rows_reference(target_logits).any(-1)
    return num_accepted, output_tokens, accept_probs, invalid
