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

from collections.abc import Collection

import torch
import triton
import triton.language as tl

from .host import eager_cpu

__all__ = [
    "READ_P1",
    "READ_Q1",
    "RULES",
    "RULE_IDS",
    "TINY",
    "cascade_pi",
    "cascade_target_reference",
    "kept_set",
    "mixture_keeps",
    "rules_held",
]

TINY = tl.constexpr(1.1754943508222875e-38)  # torch.finfo(torch.float32).tiny

RULES = ("exact", "chow", "diff", "opt", "token_v1", "token_v2", "token_v3", "lossy")  # rule id = index
RULE_IDS = frozenset(range(len(RULES)))
READ_Q1 = frozenset({1, 2, 3, 4})  # the rules that read q1: chow, diff, opt (max q1), token_v1 (q1)
READ_P1 = frozenset({2, 3, 4, 5, 6})  # the rules that read p1: diff, opt, token_v1 (max p1), token_v2/v3 (p1)


def cascade_target_reference(
    q: torch.Tensor,  # [..., V] fp32 sampled-from proposal
    p: torch.Tensor,  # [..., V] fp32 sampled-from target
    q1: torch.Tensor | None,  # [..., V] fp32 T=1 proposal; None allowed when no rule in ``rules`` reads it
    p1: torch.Tensor | None,  # [..., V] fp32 T=1 target; None allowed when no rule in ``rules`` reads it
    rule: torch.Tensor,  # [...] int64 rule ids
    alpha: torch.Tensor,  # [...] fp32
    rules: Collection[int] | None = None,  # the rule ids ``rule`` holds (a promise); None: any
) -> tuple[torch.Tensor, torch.Tensor]:  # pi [..., V], keep [..., V] bool (the drafter's set A)
    """``pi`` of each position's rule (module docstring); ``keep`` marks the tokens the drafter keeps without
    deferring (all or none for mixture rules; none for exact and lossy; it may be a broadcast view).

    Only the quantities of the rules in ``rules`` are computed (chow reads ``max q1`` only, lossy neither
    ``q1`` nor ``p1``, exact nothing: ``pi = p``), and with one rule there is no selection per position:
    ``pi`` and ``keep`` are bit for bit those of ``rules=None``, which computes every rule. A position
    whose rule is not in ``rules`` gets exact's ``pi = p``."""
    present = RULE_IDS if rules is None else frozenset(rules)
    single = len(present) == 1
    a = alpha[..., None]
    r = rule[..., None]

    def where_rule(rule_id: int, value: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return value if single else torch.where(r == rule_id, value, other)

    max_q1 = q1.amax(-1, keepdim=True) if present & {1, 2, 3} else None  # chow, diff, opt
    max_p1 = p1.amax(-1, keepdim=True) if present & READ_P1 else None
    # Mixture rules: r = 0 (keep the drafter's q) per position; token-specific rules: the set A.
    no_defer = torch.zeros((), dtype=torch.bool, device=q.device).expand(*q.shape[:-1], 1)  # exact, lossy
    if 1 in present:  # chow (alpha 0 exact even where max q1 rounds to 1)
        no_defer = where_rule(1, (a > 0) & (max_q1 >= 1 - a), no_defer)
    if 2 in present:  # diff
        no_defer = where_rule(2, max_q1 >= max_p1 - a, no_defer)
    if 3 in present:  # opt
        tv = (q - p).clamp_min(0).sum(-1, keepdim=True)
        no_defer = where_rule(3, max_q1 >= max_p1 - a * tv, no_defer)
    keep = no_defer.expand_as(q)
    # token_v2/v3 keep nothing at any alpha < 0, also where max p1 - alpha or 1 - alpha rounds back
    if 4 in present:
        keep = where_rule(4, q1 >= max_p1 - a, keep)
    if 5 in present:
        keep = where_rule(5, (a >= 0) & (p1 >= max_p1 - a), keep)
    if 6 in present:
        keep = where_rule(6, (a >= 0) & (p1 >= (1 - a) * max_p1), keep)
    if present == {0}:
        return p, keep  # nothing kept: pi = 0 + (1 - 0) p, that is p
    pi = None
    if present - {7}:
        kept_mass = torch.where(keep, q, 0.0)
        pi = kept_mass + (1 - kept_mass.sum(-1, keepdim=True)).clamp_min(0) * p  # q(V \\ A) = 1 - q(A)
    if 7 not in present:
        return pi, keep
    scale = (1 - a).clamp_min(torch.finfo(torch.float32).tiny)
    capped = torch.minimum(q, p / scale)
    rho = (p - scale * q).clamp_min(0)
    rho = rho / rho.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    lossy = capped + (1 - capped.sum(-1, keepdim=True)).clamp_min(0) * rho
    return (lossy if pi is None else torch.where(r == 7, lossy, pi)), keep


def rules_held(rule: torch.Tensor) -> frozenset[int] | None:
    """The rule ids ``rule`` holds, where reading them costs nothing (``host.eager_cpu``); else None (any
    rule)."""
    if not eager_cpu(rule):
        return None
    return frozenset(rule.tolist())


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
