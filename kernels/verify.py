"""Verification of a drafted block: speculative sampling against a deferral rule (SPEC §1, §3).

Exact speculative sampling (Leviathan et al. 2023, arXiv 2211.17192; Chen et al. 2023, arXiv
2302.01318) and speculative cascades (Narasimhan et al. 2024, arXiv 2405.19261) in one procedure. For a
row with drafted tokens ``y_1..y_k`` sampled from ``q_1..q_k`` and target distributions ``p_1..p_{k+1}``
(both after temperature/top-k/top-p: the distributions actually sampled from; one-hot when greedy), each
position ``j`` builds a target ``pi_j`` from ``q_j``, ``p_j`` and the row's rule and ``alpha``, then:

    a_j      = min(1, pi_j(y_j) / q_j(y_j))              acceptance probability of y_j
    accepted = y_j while u_j < a_j                       (u_j ~ U[0, 1)), stop at the first failure j*
    residual = norm(max(0, pi_j* - q_j*))                the recovered token's distribution (pi_j* if
                                                         its mass rounds to zero)
    bonus    = p_{k+1}                                   when all k were accepted (the target's own
                                                         next-token distribution, whatever the rule)

The output then follows the token-level cascade ``pi`` exactly (``pi = p``: the target exactly).

Rules (``RULES``; ``q1``, ``p1`` are the unfiltered ``T = 1`` softmaxes, used only inside the decisions;
the mixture, TV, acceptance ratio and residual use the sampled-from ``q``, ``p``). Mixture rules decide
``r_j in {0, 1}`` (1 = defer to the target) and set ``pi = (1 - r) q + r p``:

    exact     r = 1                                       pi = p: exact speculative sampling
    chow      r = [max q1 < 1 - alpha]                    alpha in [0, 1]
    diff      r = [max q1 < max p1 - alpha]               alpha in [-1, 1]
    opt       r = [max q1 < max p1 - alpha * TV(q, p)]    alpha >= 0, TV = sum max(0, q - p)

Token-specific rules keep the set ``A`` of tokens the drafter may keep and set
``pi(v) = q(v) [v in A] + q(V \\ A) p(v)``, with ``q(V \\ A) = 1 - q(A)`` (so that a position with
nothing proposed, ``q = 0``, gets ``pi = p``):

    token_v1  v in A iff q1(v) >= max p1 - alpha          alpha in [-1, 1]
    token_v2  v in A iff p1(v) >= max p1 - alpha          alpha in [-1, 1]
    token_v3  v in A iff p1(v) >= (1 - alpha) max p1      alpha in [-1, 1]

and the lossy speculative decoding baseline (Leviathan et al., appendix A.5), ``alpha in [0, 1)``:

    lossy     pi(v) = min(q(v), p(v) / (1 - alpha)) + (1 - sum_u min(q(u), p(u) / (1 - alpha))) rho(v),
              rho = norm(max(0, p - (1 - alpha) q))   i.e. accept with min(1, p / ((1 - alpha) q)).

Larger ``alpha`` is more lenient (faster, further from ``p``); chow 0, diff -1, token_v1-3 -1 (any
alpha < 0 for v2/v3) and lossy 0 are exact speculative sampling. A position is *deferred* when ``r = 1``
or ``y_j`` is not in ``A`` (always, for exact and lossy). A position with nothing proposed
(``y_j = -1``, ``q_j = 0``) is a rejection whose residual is ``pi_j = p_j``.

Exact-match verification (``exact_match=True``; lossless for *any* proposal, used when the proposal
probabilities are not exact, e.g. after n-gram merges): draw ``z_j ~ p_j`` at every position, accept
``y_j`` iff ``z_j == y_j``, and at the first mismatch emit ``z_j``. Only the exact rule applies.

Glossary (as in vLLM's rejection sampler): *accepted* tokens are drafted tokens that passed; the
*recovered* token is drawn from the residual at the first rejection; the *bonus* token is drawn from
``p_{k+1}`` when every draft passed; the *output* tokens are accepted + (recovered or bonus), -1 padded.
"""

from __future__ import annotations

import torch

from .sampling import nonfinite_rows_reference, sampling_probs_reference

__all__ = ["RULES", "cascade_target_reference", "verify_reference"]

RULES = ("exact", "chow", "diff", "opt", "token_v1", "token_v2", "token_v3", "lossy")  # rule id = index


def cascade_target_reference(
    q: torch.Tensor,  # [..., V] fp32 sampled-from proposal
    p: torch.Tensor,  # [..., V] fp32 sampled-from target
    q1: torch.Tensor,  # [..., V] fp32 T=1 proposal
    p1: torch.Tensor,  # [..., V] fp32 T=1 target
    rule: torch.Tensor,  # [...] int64 rule ids
    alpha: torch.Tensor,  # [...] fp32
) -> tuple[torch.Tensor, torch.Tensor]:  # pi [..., V], keep [..., V] bool (the drafter's set A)
    """``pi`` of every rule (module docstring), chosen per position; ``keep`` marks the tokens the drafter
    keeps without deferring (all or none for mixture rules; none for exact and lossy)."""
    a = alpha[..., None]
    max_q1, max_p1 = q1.amax(-1, keepdim=True), p1.amax(-1, keepdim=True)
    tv = (q - p).clamp_min(0).sum(-1, keepdim=True)
    no_defer = torch.stack(
        [
            torch.zeros_like(max_q1, dtype=torch.bool),  # exact
            max_q1 >= 1 - a,  # chow
            max_q1 >= max_p1 - a,  # diff
            max_q1 >= max_p1 - a * tv,  # opt
        ]
    )  # [4, ..., 1]
    kept = torch.stack(
        [q1 >= max_p1 - a, p1 >= max_p1 - a, p1 >= (1 - a) * max_p1]
    )  # [3, ..., V]: token_v1..v3
    r = rule[..., None]
    keep = torch.where(r < 4, no_defer.gather(0, r.clamp_max(3)[None].expand(1, *r.shape))[0], False)
    keep = keep.expand_as(q) | torch.where(
        (r >= 4) & (r <= 6), kept.gather(0, (r - 4).clamp(0, 2)[None].expand(1, *q.shape))[0], False
    )
    kept_mass = torch.where(keep, q, 0.0)
    pi = kept_mass + (1 - kept_mass.sum(-1, keepdim=True)).clamp_min(0) * p  # q(V \ A) = 1 - q(A)
    scale = (1 - a).clamp_min(torch.finfo(torch.float32).tiny)
    capped = torch.minimum(q, p / scale)
    rho = (p - scale * q).clamp_min(0)
    rho = rho / rho.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    lossy = capped + (1 - capped.sum(-1, keepdim=True)).clamp_min(0) * rho
    return torch.where(r == 7, lossy, pi), keep


def verify_reference(
    target_logits: torch.Tensor,  # [batch, k+1, V_t]
    draft_ids: torch.Tensor,  # [batch, k] int64 target ids, -1 where nothing was proposed
    q: torch.Tensor | None,  # [batch, k, V_t] fp32 proposal q' (0 where none); None with exact_match
    q1: torch.Tensor | None,  # [batch, k, V_t] fp32 T=1 proposal for the rules; None: q
    uniforms: torch.Tensor,  # [batch, k] U[0, 1)
    noise: torch.Tensor | None,  # Exp(1): [batch, V_t] for the one residual/bonus draw, or
    #                              [batch, k+1, V_t] with exact_match; unused when greedy
    rule: torch.Tensor,  # [batch] int64 rule ids
    alpha: torch.Tensor,  # [batch] fp32
    temperature: float,
    top_k: int,
    top_p: float,
    exact_match: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``num_accepted`` [batch], ``output_tokens`` [batch, k+1] (-1 padded), ``accept_probs``
    [batch, k] (the ``a_j``; ``p_j(y_j)`` under exact match), ``deferred`` [batch, k] bool and
    ``invalid`` [batch] (rows with unusable target logits)."""
    batch, k = draft_ids.shape
    p = sampling_probs_reference(target_logits, temperature, top_k, top_p)  # [batch, k+1, V_t]
    proposed = draft_ids >= 0
    safe_ids = draft_ids.clamp_min(0)[..., None]
    invalid = nonfinite_rows_reference(target_logits).any(-1)
    if exact_match:
        p_y = torch.where(proposed, p[:, :k].gather(-1, safe_ids)[..., 0], 0.0)
        z = p.argmax(-1) if temperature == 0.0 else (p / noise).argmax(-1)  # [batch, k+1] draws from p
        num_accepted = (z[:, :k] == draft_ids).long().cumprod(-1).sum(-1)
        final = z.gather(1, num_accepted[:, None])[:, 0]
        deferred = torch.ones_like(proposed)
        return num_accepted, _output_tokens(draft_ids, num_accepted, final), p_y, deferred, invalid

    p1 = target_logits[:, :k].float().softmax(-1)
    pi, keep = cascade_target_reference(
        q,
        p[:, :k],
        q if q1 is None else q1,
        p1,
        rule[:, None].expand(batch, k),
        alpha[:, None].expand(batch, k),
    )  # [batch, k, V_t]
    q_y = torch.where(proposed, q.gather(-1, safe_ids)[..., 0], 0.0)  # [batch, k]
    pi_y = torch.where(proposed, pi.gather(-1, safe_ids)[..., 0], 0.0)
    ratio = pi_y / q_y.clamp_min(torch.finfo(torch.float32).tiny)
    accept_probs = torch.where(q_y > 0, ratio, 0.0).clamp(max=1.0)
    num_accepted = (uniforms < accept_probs).long().cumprod(-1).sum(-1)  # [batch]
    deferred = ~keep.gather(-1, safe_ids)[..., 0] & proposed

    rows = torch.arange(batch, device=draft_ids.device)
    pi_stop = torch.cat([pi, p[:, k:]], 1)[rows, num_accepted]  # [batch, V_t]: pi_j*, or p_{k+1}
    q_pad = torch.cat([q, q.new_zeros(batch, 1, q.shape[-1])], 1)
    residual = (pi_stop - q_pad[rows, num_accepted]).clamp_min(0.0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, pi_stop)
    # Exponential race; the residual needs no normalising.
    final = residual.argmax(-1) if temperature == 0.0 else (residual / noise).argmax(-1)
    return num_accepted, _output_tokens(draft_ids, num_accepted, final), accept_probs, deferred, invalid


def _output_tokens(draft_ids: torch.Tensor, num_accepted: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    """[batch, k+1]: the accepted drafts, then the recovered/bonus token, then -1."""
    batch, k = draft_ids.shape
    positions = torch.arange(k + 1, device=draft_ids.device)
    drafted = torch.cat([draft_ids, draft_ids.new_full((batch, 1), -1)], 1)
    output_tokens = torch.where(positions < num_accepted[:, None], drafted, -1)
    return output_tokens.scatter_(1, num_accepted[:, None], final[:, None])
