"""The deferral rules of speculative cascades (SPEC §3; Narasimhan et al. 2024, arXiv 2405.19261): the
target ``pi`` a drafted position is verified against, from the drafter's ``q``, the target's ``p`` and the
row's rule and ``alpha`` (``verify.py`` runs speculative sampling against it).

Rules (``RULES``; ``q1``, ``p1`` are the unfiltered ``T = 1`` softmaxes, used only inside the decisions;
the mixture, TV, acceptance ratio and residual use the sampled-from ``q``, ``p``). Mixture rules decide
``r_j in {0, 1}`` (1 = defer to the target) and set ``pi = (1 - r) q + r p``, computed as the
token-specific form below with ``A`` all tokens or none, ``pi = q + (1 - q(V)) p`` when kept: the same
where ``q`` sums to 1, and a distribution where it does not (a cross-vocabulary proposal ``q'`` whose draft
stopped at a token with no target twin, kernels/proposal.py):

    exact     r = 1                                       pi = p: exact speculative sampling
    chow      r = [max q1 < 1 - alpha]                    alpha in [0, 1] (r = 1 at alpha 0, even
                                                          where max q1 rounds to 1 in fp32)
    diff      r = [max q1 < max p1 - alpha]               alpha in [-1, 1]
    opt       r = [max q1 < max p1 - alpha * TV(q, p)]    alpha >= 0, TV = sum max(0, q - p)

Token-specific rules keep the set ``A`` of tokens the drafter may keep and set
``pi(v) = q(v) [v in A] + q(V \\ A) p(v)``, with ``q(V \\ A) = 1 - q(A)`` (so that a position with
nothing proposed, ``q = 0``, gets ``pi = p``):

    token_v1  v in A iff q1(v) >= max p1 - alpha          alpha in [-1, 1]
    token_v2  v in A iff p1(v) >= max p1 - alpha          alpha in [-1, 1]
    token_v3  v in A iff p1(v) >= (1 - alpha) max p1      alpha in [-1, 1]
              (both keep nothing at alpha < 0, also where the bound rounds back to max p1 in fp32)

and the lossy speculative decoding baseline (Leviathan et al., appendix A.5), ``alpha in [0, 1)``:

    lossy     pi(v) = min(q(v), p(v) / (1 - alpha)) + (1 - sum_u min(q(u), p(u) / (1 - alpha))) rho(v),
              rho = norm(max(0, p - (1 - alpha) q))   i.e. accept with min(1, p / ((1 - alpha) q)).

Larger ``alpha`` is more lenient (faster, further from ``p``); chow 0, diff -1, token_v1-3 -1 (any
alpha < 0 for v2/v3) and lossy 0 are exact speculative sampling.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["RULES", "TINY", "cascade_pi", "cascade_target_reference", "kept_set", "mixture_keeps"]

TINY = tl.constexpr(1.1754943508222875e-38)  # torch.finfo(torch.float32).tiny

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
            (a > 0) & (max_q1 >= 1 - a),  # chow (alpha 0 exact even where max q1 rounds to 1)
            max_q1 >= max_p1 - a,  # diff
            max_q1 >= max_p1 - a * tv,  # opt
        ]
    )  # [4, ..., 1]
    # token_v2/v3 keep nothing at any alpha < 0, also where max p1 - alpha or 1 - alpha rounds back
    kept = torch.stack(
        [q1 >= max_p1 - a, (a >= 0) & (p1 >= max_p1 - a), (a >= 0) & (p1 >= (1 - a) * max_p1)]
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


# ---------------------------------------------------------------------------------------------- Triton


@triton.jit
def mixture_keeps(rule, alpha, max_q1, max_p1, tv):
    """Mixture rules: r = 0 (the drafter is kept)."""
    chow = (rule == 1) & (alpha > 0) & (max_q1 >= 1 - alpha)
    diff = (rule == 2) & (max_q1 >= max_p1 - alpha)
    return chow | diff | ((rule == 3) & (max_q1 >= max_p1 - alpha * tv))


@triton.jit
def kept_set(rule, alpha, no_defer, q1, p1, max_p1):
    """Whether the drafter keeps each token (the set A; all or none for mixture rules, none for exact/lossy)."""
    kept = (rule < 4) & no_defer
    kept = kept | ((rule == 4) & (q1 >= max_p1 - alpha))
    kept = kept | ((rule == 5) & (alpha >= 0) & (p1 >= max_p1 - alpha))
    return kept | ((rule == 6) & (alpha >= 0) & (p1 >= (1 - alpha) * max_p1))


@triton.jit
def cascade_pi(q, p, kept, rule, alpha, kept_sum, capped_sum, rho_sum):
    """pi of the rule (module docstring) from q, p and the row sums of pass 2."""
    mixture = tl.where(kept, q, 0.0) + tl.maximum(1 - kept_sum, 0.0) * p
    scale = tl.maximum(1 - alpha, TINY)
    rho = tl.maximum(p - scale * q, 0.0) / tl.maximum(rho_sum, TINY)
    lossy = tl.minimum(q, p / scale) + tl.maximum(1 - capped_sum, 0.0) * rho
    return tl.where(rule == 7, lossy, mixture)
