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
then emit ``argmax p_j*``. A position where nothing was proposed (``y_j = -1``,
``q_j = 0``: ragged drafts) is a rejection whose residual is ``p_j`` itself.

Exact-match verification (``exact_match=True``; lossless for *any* proposal,
used when the proposal probabilities are not exact, e.g. after n-gram merges):
draw ``z_j ~ p_j`` at every position, accept ``y_j`` iff ``z_j == y_j``, and at
the first mismatch emit ``z_j``. Each emitted token is a draw from ``p`` given
the tokens before it, so the output follows ``p`` exactly.

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
    draft_ids: torch.Tensor,  # [batch, k] int64, -1 where nothing was proposed
    draft_probs: torch.Tensor
    | None,  # [batch, k, vocab] fp32, the q each draft was sampled from (0 where none)
    uniforms: torch.Tensor,  # [batch, k] U[0, 1)
    noise: torch.Tensor | None,  # Exp(1): [batch, vocab] for the one residual/bonus draw, or
    #                              [batch, k+1, vocab] with exact_match; unused when greedy
    temperature: float,
    top_k: int,
    top_p: float,
    exact_match: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``num_accepted`` [batch], ``output_tokens`` [batch, k+1] (-1 padded), ``accept_probs``
    [batch, k] (the ``a_j``; ``p_j(y_j)`` under exact match), and ``invalid`` [batch] (rows with
    unusable target logits)."""
    batch, k = draft_ids.shape
    p = sampling_probs_reference(target_logits, temperature, top_k, top_p)  # [batch, k+1, vocab]
    proposed = draft_ids >= 0
    safe_ids = draft_ids.clamp_min(0)[..., None]
    p_y = torch.where(proposed, p[:, :k].gather(-1, safe_ids)[..., 0], 0.0)  # [batch, k]
    invalid = nonfinite_rows_reference(target_logits).any(-1)
    if exact_match:
        z = p.argmax(-1) if temperature == 0.0 else (p / noise).argmax(-1)  # [batch, k+1] draws from p
        num_accepted = (z[:, :k] == draft_ids).long().cumprod(-1).sum(-1)
        final = z.gather(1, num_accepted[:, None])[:, 0]
        return num_accepted, _output_tokens(draft_ids, num_accepted, final), p_y, invalid

    q_y = torch.where(proposed, draft_probs.gather(-1, safe_ids)[..., 0], 0.0)  # [batch, k]
    ratio = p_y / q_y.clamp_min(torch.finfo(torch.float32).tiny)
    accept_probs = torch.where(q_y > 0, ratio, 0.0).clamp(max=1.0)
    num_accepted = (uniforms < accept_probs).long().cumprod(-1).sum(-1)  # [batch]

    rows = torch.arange(batch, device=draft_ids.device)
    p_stop = p[rows, num_accepted]  # [batch, vocab]
    q_pad = torch.cat([draft_probs, draft_probs.new_zeros(batch, 1, draft_probs.shape[-1])], 1)
    residual = (p_stop - q_pad[rows, num_accepted]).clamp_min(0.0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_stop)
    # Exponential race; the residual needs no normalising.
    final = residual.argmax(-1) if temperature == 0.0 else (residual / noise).argmax(-1)
    return num_accepted, _output_tokens(draft_ids, num_accepted, final), accept_probs, invalid


def _output_tokens(draft_ids: torch.Tensor, num_accepted: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    """[batch, k+1]: the accepted drafts, then the recovered/bonus token, then -1."""
    batch, k = draft_ids.shape
    positions = torch.arange(k + 1, device=draft_ids.device)
    drafted = torch.cat([draft_ids, draft_ids.new_full((batch, 1), -1)], 1)
    output_tokens = torch.where(positions < num_accepted[:, None], drafted, -1)
    return output_tokens.scatter_(1, num_accepted[:, None], final[:, None])
