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

The rules (``cascade.py``: exact, chow, diff, opt, token_v1-3, lossy) set ``pi`` from ``q``, ``p``, their
``T = 1`` softmaxes ``q1``, ``p1`` and ``alpha``; mixture rules defer (``r = 1``) or keep the drafter's
``q``, token-specific ones keep a set ``A`` of tokens. A position is *deferred* when ``r = 1`` or ``y_j`` is
not in ``A`` (always, for exact and lossy). A position with nothing proposed
(``y_j = -1``) is a rejection. Where the draft ended, ``q_j = 0``, so its residual is ``pi_j``. Where
it stopped at a drafted token with no target token, ``q_j`` is the drafter's law there
(``kernels/proposal.py``), whose missing mass is that of the drafter's tokens with no target token: the
residual against it keeps speculative sampling exact. With ``support_only`` (a cascade across vocabularies
under logits processing), ``q_j`` and ``q1_j`` count only on the tokens whose target logits at ``j`` are
finite (the processors' support): the proposal's mass elsewhere (a merged or split-piece token, or a twin,
that a processor forbids) is treated as nothing proposed, so a draft there is rejected and deferred, and the
rules defer that mass to the target as at a stop. The output then follows ``pi`` of the restricted ``q``,
which keeps no token the processors forbid; exact rows are unchanged (``pi = p`` is 0 there).

Verification by exact match, which needs no ``q`` (lossless for any proposal), is ``match.py``.

The Triton kernel (``verify_triton``) never builds ``q'`` densely: it
reads the drafter's rows through ``t2d`` with the merge adjustments and split pieces of
``kernels/proposal.py``. Each
position's vocabulary is split over ``splits`` programs (``~ 4 SMs / (batch (k+1))`` chunks of whole blocks):

1. ``target_stats.py``'s statistics pass (grid ``[batch (k+1), splits]``): online softmax of the logits per
   chunk, at ``T = 1`` (max, normaliser: ``max p1 = 1 / Z1``) and at ``T`` (or the first argmax when
   greedy), plus a NaN/+inf count; with top-k/top-p, ``thresholds.py``'s threshold passes on these partials.
2. ``_sums_kernel`` (grid ``[batch k, splits]``; returns at once for exact rows): the chunk's TV, ``q(V)``,
   ``q(A)``, ``sum min(q, p/s)``, ``sum (p - s q)+`` and ``max q1`` (logits read only where the rule needs
   ``p`` or, with ``support_only``, the support; ``q1`` only where it needs ``q1``).
3. ``_draw_kernel`` (grid ``[batch, draws]``): every program combines the partials of its row's ``k+1``
   positions at once (vectors over positions), computes ``pi_j(y_j)``, ``a_j``, the deferral flags and the
   accept scan (program 0 writes them), then races ``max(0, pi_j* - q_j*)`` and ``pi_j*`` over its chunk of
   the stop position (``p_{k+1}`` for the bonus) with the noise, keeping the first winner of each.
4. ``_finish_kernel`` (one program per row): the first winner over the chunks (``pi``'s when the residual
   has no mass anywhere), the output tokens and the invalid flags.

So exact rows read the logits once plus one row of logits, ``q`` and noise at the stop position; deferral
rules add one read of their ``k`` rows of logits (mostly from L2) and of ``q`` (and ``q1``).

Glossary (as in vLLM's rejection sampler): *accepted* tokens are drafted tokens that passed; the
*recovered* token is drawn from the residual at the first rejection; the *bonus* token is drawn from
``p_{k+1}`` when every draft passed; the *output* tokens are accepted + (recovered or bonus), -1 padded.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
import triton
import triton.language as tl

from .cascade import (
    READ_P1,
    READ_Q1,
    TINY,
    cascade_pi,
    cascade_target_reference,
    kept_set,
    mixture_keeps,
    rules_held,
)
from .proposal import CrossProposal, TargetProposal, drafted_path, target_proposal_reference
from .rows import chunking, race_step
from .sampling import nonfinite_rows_reference, sampling_probs_reference
from .target_stats import combine_partials, target_prob, target_stats

__all__ = ["join_output", "verify_reference", "verify_triton"]

# Registers a thread may take (ptxas's ``maxnreg``; None: no cap), so that a grid runs in one wave of four
# 4-warp programs an SM (benchmarks/TUNING.md, "Occupancy"): the draw kernel takes 152-168 uncapped on Triton
# 3.6 (three an SM: 504 programs over 396 places), the sums kernel 168 reading a proposal across
# vocabularies; the sums kernel of one vocabulary (94-128) goes uncapped, since a cap lets ptxas take more,
# up to it.
DRAW_MAXNREG = 128
CROSS_SUMS_MAXNREG = 128


def verify_reference(
    target_logits: torch.Tensor,  # [batch, k+1, V_t]
    draft_ids: torch.Tensor,  # [batch, k] int64 target ids, -1 where nothing was proposed
    q: torch.Tensor,  # [batch, k, V_t] fp32 proposal q' (0 where none); [batch, k, V_d] with ``cross``
    q1: torch.Tensor | None,  # like q: the T=1 proposal for the rules; None: q
    uniforms: torch.Tensor,  # [batch, k] U[0, 1)
    noise: torch.Tensor | None,  # [batch, V_t] Exp(1) for the one residual/bonus draw; unused when greedy
    rule: torch.Tensor | None,  # [batch] int64 rule ids; None: "exact" for every row
    alpha: torch.Tensor | None,  # [batch] fp32; None with rule None
    temperature: float,
    top_k: int,
    top_p: float,
    cross: CrossProposal | None = None,
    *,
    rules: Collection[int] | None = None,
    support_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``num_accepted`` [batch], ``output_tokens`` [batch, k+1] (-1 padded), ``accept_probs``
    [batch, k] (the ``a_j``), ``deferred`` [batch, k] bool and ``invalid`` [batch, k+1] (positions with unusable
    target logits).

    With ``cross``, ``q`` and ``q1`` are the drafter's rows, read into the target vocabulary as
    ``kernels/proposal.py`` defines: densely where a deferral rule reads whole rows, else (exact) only at the
    drafts and at the stop position, as the kernel reads them. ``rules`` is the set of rule ids ``rule`` holds
    (a promise, as in ``cascade_target_reference``; only their quantities are computed); None: read off
    ``rule`` where that costs nothing (``rules_held``), else any. Neither changes a bit of the outputs.
    ``support_only``: ``q`` (and ``q1``) count only where the target's logits at the position are finite
    (module docstring)."""
    batch, k = draft_ids.shape
    proposed = draft_ids >= 0
    safe_ids = draft_ids.clamp_min(0)[..., None]
    invalid = nonfinite_rows_reference(target_logits)
    if rule is not None:
        rules = rules_held(rule) if rules is None else frozenset(rules)
        # Exact for every row: the shortcuts below, bit for bit the general path; but for greedy float64
        # logits, whose argmax the shortcut takes in float64 and the general path in fp32 (near-ties).
        if rules == {0} and not (temperature == 0.0 and target_logits.dtype == torch.float64):
            rule = alpha = None
    dense = cross is None or rule is not None  # deferral rules read whole rows of q'
    # Outside the target's support (support_only): no proposal mass (exact rows need none: pi = p is 0 there).
    outside = target_logits[:, :k].isneginf() if support_only and rule is not None else None
    if not dense:  # q' read at the drafts, then at the stop position, from one set of span terms
        proposal = TargetProposal(q, draft_ids, cross)
        q_y = torch.where(proposed, proposal.at_drafts(), 0.0)
    else:
        if cross is not None:
            q = target_proposal_reference(q, draft_ids, cross)
        if outside is not None:
            q = q.masked_fill(outside, 0.0)
        q_y = torch.where(proposed, q.gather(-1, safe_ids)[..., 0], 0.0)  # [batch, k]
    if rule is None and temperature == 0.0:
        # Greedy and exact: p is one-hot at the argmax z, so a_j = 1 when y_j = z_j and q gave y_j mass
        # (else 0), the residual at the stop position has its mass at z only (or none, and pi = p), and
        # the exact rule defers every proposed position: what the general path below computes, from one
        # read of the logits.
        z = target_logits.argmax(-1)  # [batch, k+1]
        accept_probs = ((z[:, :k] == draft_ids) & (q_y > 0)).float()
        num_accepted = (uniforms < accept_probs).cumprod(-1).sum(-1)
        final = z.gather(1, num_accepted[:, None])[:, 0]
        return num_accepted, join_output(draft_ids, num_accepted, final), accept_probs, proposed, invalid

    p = sampling_probs_reference(target_logits, temperature, top_k, top_p)  # [batch, k+1, V_t]
    if rule is None:  # exact for every row: pi = p, and every proposed position defers to the target
        pi, deferred = p[:, :k], proposed
    else:
        if q1 is not None and rules is not None and not rules & READ_Q1:
            q1 = None  # no rule reads it
        elif q1 is not None and cross is not None:
            q1 = target_proposal_reference(q1, draft_ids, cross._replace(path=cross.path_t1))
        if q1 is not None and outside is not None:
            q1 = q1.masked_fill(outside, 0.0)
        p1 = None
        if rules is None or rules & READ_P1:
            unwarped = temperature == 1.0 and not 0 < top_k < p.shape[-1] and top_p >= 1.0
            # At T = 1 unfiltered, p is softmax(logits / 1): the T = 1 softmax, bit for bit.
            p1 = p[:, :k] if unwarped else target_logits[:, :k].float().softmax(-1)
        pi, keep = cascade_target_reference(
            q,
            p[:, :k],
            q if q1 is None else q1,
            p1,
            rule[:, None].expand(batch, k),
            alpha[:, None].expand(batch, k),
            rules,
        )  # [batch, k, V_t]
        kept_y = keep.gather(-1, safe_ids)[..., 0]
        if outside is not None:  # a draft outside the support is not kept, whatever the rule's set
            kept_y = kept_y & ~outside.gather(-1, safe_ids)[..., 0]
        deferred = ~kept_y & proposed
    pi_y = pi.gather(-1, safe_ids)[..., 0]  # read where q_y > 0 only: proposed positions
    ratio = pi_y / q_y.clamp_min(torch.finfo(torch.float32).tiny)
    accept_probs = torch.where(q_y > 0, ratio, 0.0).clamp(max=1.0)
    num_accepted = (uniforms < accept_probs).cumprod(-1).sum(-1)  # [batch]

    # The stop position's rows (pi_j* and q_j*, or p_{k+1} and 0 at the bonus), gathered, not concatenated.
    bonus = (num_accepted == k)[:, None]
    stop = num_accepted.clamp_max(max(k - 1, 0))[:, None]  # [batch, 1]
    if k == 0:
        pi_stop, q_stop = p[:, k], torch.zeros_like(p[:, k])
    else:
        if rule is None:  # pi is p[:, :k], so the stop position's row is p's, the bonus's included
            pi_stop = p[torch.arange(batch, device=p.device), num_accepted]
        else:
            pi_stop = torch.where(
                bonus, p[:, k], pi.gather(1, stop[..., None].expand(-1, -1, pi.shape[-1]))[:, 0]
            )
        if dense:
            q_stop = q.gather(1, stop[..., None].expand(-1, -1, q.shape[-1]))[:, 0]
        else:
            q_stop = proposal.rows(stop)[:, 0]
        q_stop = q_stop.masked_fill(bonus, 0.0)
    residual = (pi_stop - q_stop).clamp_min(0.0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, pi_stop)
    # Exponential race; the residual needs no normalising.
    final = residual.argmax(-1) if temperature == 0.0 else (residual / noise).argmax(-1)
    return num_accepted, join_output(draft_ids, num_accepted, final), accept_probs, deferred, invalid


def join_output(draft_ids: torch.Tensor, num_accepted: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    """[batch, k+1]: the accepted drafts, then the recovered/bonus token, then -1."""
    k = draft_ids.shape[1]
    positions = torch.arange(k + 1, device=draft_ids.device)
    drafted = torch.nn.functional.pad(draft_ids, (0, 1), value=-1)  # [batch, k+1]
    output_tokens = drafted.masked_fill_(positions >= num_accepted[:, None], -1)
    return output_tokens.scatter_(1, num_accepted[:, None], final[:, None])


# ---------------------------------------------------------------------------------------------- Triton


@triton.jit
def _spans(path_ptr, path1_ptr, drafter_ids_ptr, source_ptr, span_end_ptr, d2t_ptr, b, j, x_id, k, valid,
           K_P2: tl.constexpr, SEPARATE_Q1: tl.constexpr):  # fmt: skip
    """``_span`` under ``q``, plus the span mass under ``q1`` (the same unless SEPARATE_Q1)."""
    src, first, mass, kind = _span(
        path_ptr, drafter_ids_ptr, source_ptr, span_end_ptr, d2t_ptr, b, j, x_id, k, valid, K_P2
    )
    mass1 = mass
    if SEPARATE_Q1:
        mass1 = _span(
            path1_ptr, drafter_ids_ptr, source_ptr, span_end_ptr, d2t_ptr, b, j, x_id, k, valid, K_P2
        )[2]
    return src, first, mass, mass1, kind


@triton.jit
def _span(path_ptr, drafter_ids_ptr, source_ptr, span_end_ptr, d2t_ptr, b, j, x_id, k, valid,
          K_P2: tl.constexpr):  # fmt: skip
    """Where target positions ``j`` [N] of row ``b`` come from (kernels/proposal.py): the source drafter
    position, d2t of its drafted token, the path mass of the span under ``path`` (each drafted token's own
    probability, [batch, k]) and its kind: 0 direct
    (or a split token's first piece), 1 merged, 2 a later piece of a split token (same source as j - 1),
    3 the stop at a drafted token that does not translate (nothing proposed, one drafter token wide), 0
    where nothing was proposed otherwise."""
    src = tl.load(source_ptr + b * k + j, mask=valid, other=0)
    end = tl.load(span_end_ptr + b * k + j, mask=valid, other=0)  # kind 0 past the draft (the bonus)
    u = tl.arange(0, K_P2)
    path = tl.load(path_ptr + b * k + u, mask=u < k, other=1.0)
    log_q = tl.log(tl.maximum(path, 1e-30))[None, :]
    before = tl.sum(tl.where(u[None, :] < src[:, None], log_q, 0.0), 1)
    mass = tl.exp(tl.sum(tl.where(u[None, :] < end[:, None], log_q, 0.0), 1) - before)
    y_s = tl.load(drafter_ids_ptr + b * k + src, mask=valid, other=-1)
    first = tl.load(d2t_ptr + tl.maximum(y_s, 0), mask=valid & (y_s >= 0), other=-1)
    previous = tl.load(source_ptr + b * k + j - 1, mask=valid & (j > 0), other=-1)
    kind = tl.where(previous == src, 2, tl.where(end - src >= 2, 1, 0))
    return src, first, mass, tl.where(x_id >= 0, kind, tl.where(end - src == 1, 3, 0))


@triton.jit
def _gather_q(row_ptr, t, inside, t2d_ptr, x_id, first, mass, kind, CROSS: tl.constexpr):
    """q'(t) at one position from its row of drafter probabilities (``row_ptr``), through t2d with the merge
    adjustments, or the point mass of a split token's later piece, when CROSS (kernels/proposal.py); 0
    outside ``inside``."""
    if CROSS:
        through = ((x_id >= 0) & (kind != 2)) | (kind == 3)
        d = tl.where(through, tl.load(t2d_ptr + t, mask=inside, other=-1), -1)
        q = tl.load(row_ptr + d, mask=inside & (d >= 0), other=0.0)
        q = tl.where((kind == 1) & (t == first), tl.maximum(q - mass, 0.0), q)
        q = tl.where((kind == 1) & (t == x_id), mass, q)
        q = tl.where((kind == 2) & (t == x_id), 1.0, q)
        return tl.where(inside, q, 0.0)
    return tl.load(row_ptr + t, mask=inside, other=0.0)


@triton.jit
def _sums_kernel(
    logits_ptr,  # [batch, k+1, vocab]
    draft_ids_ptr,  # [batch, k] int64 target ids
    probs_ptr,  # [batch, k, vocab_q] fp32
    probs1_ptr,  # [batch, k, vocab_q] fp32 (SEPARATE_Q1)
    rule_ptr,  # [batch] int64
    alpha_ptr,  # [batch] fp32
    drafter_ids_ptr,  # [batch, k] int64 (CROSS)
    source_ptr,  # [batch, k] int64 (CROSS)
    span_end_ptr,  # [batch, k] int64 (CROSS)
    d2t_ptr,  # [vocab_q] int32 (CROSS)
    t2d_ptr,  # [vocab] int32 (CROSS)
    path_ptr,  # [batch, k] fp32 (CROSS): each drafted token's own probability (kernels/proposal.py)
    path1_ptr,  # [batch, k] fp32 (CROSS and SEPARATE_Q1): the same under q1
    part_m1_ptr,  # [batch * (k+1), splits] fp32
    part_z1_ptr,  # [batch * (k+1), splits] fp32
    part_m_ptr,  # [batch * (k+1), splits] fp32
    part_aux_ptr,  # [batch * (k+1), splits] fp32 or int64 (GREEDY)
    row_z_ptr,  # [batch * (k+1)] fp32 (FILTERED)
    row_t_ptr,  # [batch * (k+1)] fp32 (FILTERED)
    row_c_ptr,  # [batch * (k+1)] int64 (FILTERED)
    sums_ptr,  # [batch * k, splits, 6] fp32 out: TV, q(V), q(A), sum min(q, p/s), sum (p - s q)+, max q1
    k,
    vocab,
    vocab_q,
    stride_lb,
    stride_lj,
    temperature,
    chunk,
    splits,
    SPLITS_P2: tl.constexpr,
    K_P2: tl.constexpr,
    GREEDY: tl.constexpr,
    FILTERED: tl.constexpr,
    CROSS: tl.constexpr,
    SEPARATE_Q1: tl.constexpr,
    SUPPORT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pos = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = pos // k
    rule = tl.load(rule_ptr + b)
    tv = tl.zeros((), tl.float32)
    sum_q = tl.zeros((), tl.float32)
    kept_q = tl.zeros((), tl.float32)
    capped = tl.zeros((), tl.float32)
    rho = tl.zeros((), tl.float32)
    max_q1 = tl.zeros((), tl.float32)
    if rule != 0:  # exact speculative sampling needs no row sums
        alpha = tl.load(alpha_ptr + b)
        j = tl.full((1,), pos % k, tl.int64)  # [1]: this program's position
        row = b * (k + 1) + j
        valid = j >= 0
        m1, z1 = combine_partials(part_m1_ptr, part_z1_ptr, row, valid, splits, SPLITS_P2, False)
        m, aux = combine_partials(part_m_ptr, part_aux_ptr, row, valid, splits, SPLITS_P2, GREEDY)
        m1, z1, m = tl.sum(m1, 0), tl.sum(z1, 0), tl.sum(m, 0)
        aux = tl.sum(aux, 0)  # the argmax (GREEDY) or the normaliser
        thr = tl.zeros((), tl.float32)
        cut = tl.zeros((), tl.int64)
        if FILTERED:
            aux = tl.load(row_z_ptr + b * (k + 1) + pos % k)
            thr = tl.load(row_t_ptr + b * (k + 1) + pos % k)
            cut = tl.load(row_c_ptr + b * (k + 1) + pos % k)
        x_id = tl.load(draft_ids_ptr + pos + tl.zeros((1,), tl.int64))
        if CROSS:
            src, first, mass, mass1, kind = _spans(
                path_ptr, path1_ptr, drafter_ids_ptr, source_ptr, span_end_ptr, d2t_ptr, b, j, x_id, k, valid,
                K_P2, SEPARATE_Q1,
            )  # fmt: skip
        else:
            src, first, mass, mass1, kind = j, j * 0 - 1, 0.0, 0.0, j * 0
        q_row = probs_ptr + (b * k + src) * vocab_q
        q1_row = probs1_ptr + (b * k + src) * vocab_q
        row_logits = logits_ptr + b * stride_lb + (pos % k) * stride_lj
        begin = (split * chunk).to(tl.int64)
        end = tl.minimum(begin + chunk, vocab)
        end_p = tl.where((rule == 3) | (rule >= 5), end, begin)  # loads past end_p are skipped: p unused
        if SUPPORT:  # the logits bound q's support
            end_p = end
        end_q1 = tl.where(rule <= 4, end, begin)
        max_p1 = 1.0 / z1
        scale = tl.maximum(1 - alpha, TINY)
        for start in range(begin, end, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            inside = offs < end
            x = tl.load(row_logits + offs, mask=offs < end_p, other=float("-inf")).to(tl.float32)
            p = target_prob(x, offs, inside, m, aux, thr, cut, temperature, GREEDY, FILTERED)
            p1 = tl.exp(x - m1) / z1
            q = _gather_q(q_row, offs, inside, t2d_ptr, x_id, first, mass, kind, CROSS)
            q1 = q
            if SEPARATE_Q1:
                q1 = _gather_q(q1_row, offs, offs < end_q1, t2d_ptr, x_id, first, mass1, kind, CROSS)
            if SUPPORT:
                q = tl.where(x == float("-inf"), 0.0, q)
                q1 = tl.where(x == float("-inf"), 0.0, q1)
            kept = kept_set(rule, alpha, False, q1, p1, max_p1)
            tv += tl.sum(tl.maximum(q - p, 0.0), 0)
            sum_q += tl.sum(q, 0)
            kept_q += tl.sum(tl.where(kept, q, 0.0), 0)
            capped += tl.sum(tl.minimum(q, p / scale), 0)
            rho += tl.sum(tl.maximum(p - scale * q, 0.0), 0)
            max_q1 = tl.maximum(max_q1, tl.max(q1, 0))
    out = sums_ptr + (pos * splits + split) * 6
    tl.store(out, tv)
    tl.store(out + 1, sum_q)
    tl.store(out + 2, kept_q)
    tl.store(out + 3, capped)
    tl.store(out + 4, rho)
    tl.store(out + 5, max_q1)


@triton.jit
def _draw_kernel(
    logits_ptr,  # [batch, k+1, vocab]
    draft_ids_ptr,  # [batch, k] int64 target ids
    probs_ptr,  # [batch, k, vocab_q] fp32
    probs1_ptr,  # [batch, k, vocab_q] fp32 (SEPARATE_Q1)
    uniforms_ptr,  # [batch, k] fp32
    noise_ptr,  # [batch, vocab] fp32 Exp(1) (not GREEDY)
    rule_ptr,  # [batch] int64
    alpha_ptr,  # [batch] fp32
    drafter_ids_ptr,  # [batch, k] int64 (CROSS)
    source_ptr,  # [batch, k] int64 (CROSS)
    span_end_ptr,  # [batch, k] int64 (CROSS)
    d2t_ptr,  # [vocab_q] int32 (CROSS)
    t2d_ptr,  # [vocab] int32 (CROSS)
    path_ptr,  # [batch, k] fp32 (CROSS): each drafted token's own probability (kernels/proposal.py)
    path1_ptr,  # [batch, k] fp32 (CROSS and SEPARATE_Q1): the same under q1
    part_m1_ptr,  # [batch * (k+1), splits] fp32
    part_z1_ptr,  # [batch * (k+1), splits] fp32
    part_m_ptr,  # [batch * (k+1), splits] fp32
    part_aux_ptr,  # [batch * (k+1), splits] fp32 or int64 (GREEDY)
    row_z_ptr,  # [batch * (k+1)] fp32 (FILTERED)
    row_t_ptr,  # [batch * (k+1)] fp32 (FILTERED)
    row_c_ptr,  # [batch * (k+1)] int64 (FILTERED)
    sums_ptr,  # [batch * k, splits, 6] fp32
    num_accepted_ptr,  # [batch] int64 out
    accept_probs_ptr,  # [batch, k] fp32 out
    deferred_ptr,  # [batch, k] uint8 out
    win_val_ptr,  # [batch, draws, 2] fp32 out: the chunk's best residual / E and pi / E
    win_id_ptr,  # [batch, draws, 2] int64 out: their ids
    win_any_ptr,  # [batch, draws] int32 out: whether the chunk's residual has mass
    k,
    vocab,
    vocab_q,
    stride_lb,
    stride_lj,
    stride_noise,
    temperature,
    splits,
    chunk,
    W_P2: tl.constexpr,
    K_P2: tl.constexpr,
    SPLITS_P2: tl.constexpr,
    GREEDY: tl.constexpr,
    FILTERED: tl.constexpr,
    CROSS: tl.constexpr,
    SEPARATE_Q1: tl.constexpr,
    SUPPORT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    draws = tl.num_programs(1)
    # Every position of the row at once (j = k: the bonus): statistics, the rule's pi at y_j, the scan.
    j = tl.arange(0, W_P2).to(tl.int64)
    in_row = j <= k
    drafted = j < k
    rows = b * (k + 1) + j
    m1, z1 = combine_partials(part_m1_ptr, part_z1_ptr, rows, in_row, splits, SPLITS_P2, False)
    m, aux = combine_partials(part_m_ptr, part_aux_ptr, rows, in_row, splits, SPLITS_P2, GREEDY)
    thr = tl.zeros((W_P2,), tl.float32)
    cut = tl.zeros((W_P2,), tl.int64)
    if FILTERED:
        aux = tl.load(row_z_ptr + rows, mask=in_row, other=1.0)
        thr = tl.load(row_t_ptr + rows, mask=in_row, other=0.0)
        cut = tl.load(row_c_ptr + rows, mask=in_row, other=0)
    rule = tl.load(rule_ptr + b)
    alpha = tl.load(alpha_ptr + b)
    x_id = tl.load(draft_ids_ptr + b * k + j, mask=drafted, other=-1)
    proposed = x_id >= 0
    y = tl.maximum(x_id, 0)
    if CROSS:
        src, first, mass, mass1, kind = _spans(
            path_ptr, path1_ptr, drafter_ids_ptr, source_ptr, span_end_ptr, d2t_ptr, b, j, x_id, k, drafted,
            K_P2, SEPARATE_Q1,
        )  # fmt: skip
    else:
        mass = tl.zeros((W_P2,), tl.float32)
        src, first, mass1, kind = j, j * 0 - 1, mass, j * 0
    q_y = _gather_q(probs_ptr + (b * k + src) * vocab_q, y, drafted, t2d_ptr, x_id, first, mass, kind, CROSS)
    q1_y = q_y
    if SEPARATE_Q1:
        q1_row = probs1_ptr + (b * k + src) * vocab_q
        q1_y = _gather_q(q1_row, y, drafted, t2d_ptr, x_id, first, mass1, kind, CROSS)
    x_y = tl.load(logits_ptr + b * stride_lb + j * stride_lj + y, mask=drafted, other=0.0).to(tl.float32)
    p_y = target_prob(x_y, y, drafted, m, aux, thr, cut, temperature, GREEDY, FILTERED)
    p1_y = tl.exp(x_y - m1) / z1
    max_p1 = 1.0 / z1
    s = tl.arange(0, SPLITS_P2)
    part = sums_ptr + ((b * k + j)[:, None] * splits + s[None, :]) * 6
    mask = drafted[:, None] & (s < splits)[None, :]
    tv = tl.sum(tl.load(part, mask=mask, other=0.0), 1)
    sum_q = tl.sum(tl.load(part + 1, mask=mask, other=0.0), 1)
    kept_q = tl.sum(tl.load(part + 2, mask=mask, other=0.0), 1)
    capped = tl.sum(tl.load(part + 3, mask=mask, other=0.0), 1)
    rho = tl.sum(tl.load(part + 4, mask=mask, other=0.0), 1)
    max_q1 = tl.max(tl.load(part + 5, mask=mask, other=0.0), 1)
    no_defer = mixture_keeps(rule, alpha, max_q1, max_p1, tv)
    kept_sum = tl.where(rule < 4, tl.where(no_defer, sum_q, 0.0), kept_q)
    kept_y = kept_set(rule, alpha, no_defer, q1_y, p1_y, max_p1)
    if SUPPORT:  # a draft outside the target's support is not kept (pi_y = p_y = 0 there: it is rejected)
        kept_y = kept_y & (x_y != float("-inf"))
    pi_y = tl.where(proposed, cascade_pi(q_y, p_y, kept_y, rule, alpha, kept_sum, capped, rho), 0.0)
    q_y = tl.where(proposed, q_y, 0.0)
    accept = tl.where(q_y > 0, tl.minimum(pi_y / tl.maximum(q_y, TINY), 1.0), 0.0)
    u = tl.load(uniforms_ptr + b * k + j, mask=drafted, other=2.0)
    num = tl.min(tl.where(drafted & (u < accept), W_P2, j), 0)  # the first rejection, k if none
    if split == 0:
        tl.store(num_accepted_ptr + b, num)
        tl.store(accept_probs_ptr + b * k + j, accept, mask=drafted)
        tl.store(deferred_ptr + b * k + j, (~kept_y & proposed).to(tl.uint8), mask=drafted)

    # The residual norm(max(0, pi - q)) at the stop position (p_{k+1} for the bonus), over this chunk.
    at = j == num
    stop_rule = tl.where(num < k, rule, 0)
    m_s = tl.sum(tl.where(at, m, 0.0), 0)
    aux_s = tl.sum(tl.where(at, aux, 0), 0)
    thr_s = tl.sum(tl.where(at, thr, 0.0), 0)
    cut_s = tl.sum(tl.where(at, cut, 0), 0)
    m1_s = tl.sum(tl.where(at, m1, 0.0), 0)
    z1_s = tl.sum(tl.where(at, z1, 0.0), 0)
    no_defer_s = tl.sum(tl.where(at, no_defer.to(tl.int32), 0), 0) > 0
    kept_sum_s = tl.sum(tl.where(at, kept_sum, 0.0), 0)
    capped_s = tl.sum(tl.where(at, capped, 0.0), 0)
    rho_s = tl.sum(tl.where(at, rho, 0.0), 0)
    x_s = tl.sum(tl.where(at, x_id, 0), 0)
    src_s = tl.sum(tl.where(at, src, 0), 0)
    first_s = tl.sum(tl.where(at, first, 0), 0)
    mass_s = tl.sum(tl.where(at, mass, 0.0), 0)
    mass1_s = tl.sum(tl.where(at, mass1, 0.0), 0)
    kind_s = tl.sum(tl.where(at, kind, 0), 0)
    stop_logits = logits_ptr + b * stride_lb + num * stride_lj
    q_row = probs_ptr + (b * k + src_s) * vocab_q
    q1_row = probs1_ptr + (b * k + src_s) * vocab_q
    max_p1_s = 1.0 / z1_s
    begin = (split * chunk).to(tl.int64)
    end = tl.minimum(begin + chunk, vocab)
    end_q = tl.where(num < k, end, begin)  # no proposal at the bonus position
    end_q1 = tl.where(stop_rule == 4, end_q, begin)
    best_r = tl.full((), -1.0, tl.float32)
    best_pi = tl.full((), -1.0, tl.float32)
    id_r = begin
    id_pi = begin
    any_mass = tl.zeros((), tl.int32)
    for start in range(begin, end, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < end
        x = tl.load(stop_logits + offs, mask=inside, other=float("-inf")).to(tl.float32)
        p = target_prob(x, offs, inside, m_s, aux_s, thr_s, cut_s, temperature, GREEDY, FILTERED)
        q = _gather_q(q_row, offs, offs < end_q, t2d_ptr, x_s, first_s, mass_s, kind_s, CROSS)
        q1 = q
        if SEPARATE_Q1:
            q1 = _gather_q(q1_row, offs, offs < end_q1, t2d_ptr, x_s, first_s, mass1_s, kind_s, CROSS)
        if SUPPORT:
            q = tl.where(x == float("-inf"), 0.0, q)
            q1 = tl.where(x == float("-inf"), 0.0, q1)
        kept = kept_set(stop_rule, alpha, no_defer_s, q1, tl.exp(x - m1_s) / z1_s, max_p1_s)
        pi = cascade_pi(q, p, kept, stop_rule, alpha, kept_sum_s, capped_s, rho_s)
        residual = tl.maximum(pi - q, 0.0)
        if GREEDY:
            race_r = residual
            race_pi = pi
        else:  # exponential race: argmax w / E is a draw from norm(w)
            e = tl.load(noise_ptr + b * stride_noise + offs, mask=inside, other=1.0)
            race_r = residual / e
            race_pi = pi / e
        race_r = tl.where(inside & (race_r == race_r), race_r, -1.0)  # NaN (invalid rows) never wins
        race_pi = tl.where(inside & (race_pi == race_pi), race_pi, -1.0)
        best_r, id_r = race_step(best_r, id_r, race_r, start)
        best_pi, id_pi = race_step(best_pi, id_pi, race_pi, start)
        any_mass = tl.maximum(any_mass, tl.max((residual > 0).to(tl.int32), 0))
    win = (b * draws + split) * 2
    tl.store(win_val_ptr + win, best_r)
    tl.store(win_val_ptr + win + 1, best_pi)
    tl.store(win_id_ptr + win, id_r)
    tl.store(win_id_ptr + win + 1, id_pi)
    tl.store(win_any_ptr + b * draws + split, any_mass)


@triton.jit
def _finish_kernel(
    draft_ids_ptr,  # [batch, k] int64
    num_accepted_ptr,  # [batch] int64
    part_m1_ptr,  # [batch * (k+1), splits] fp32
    part_bad_ptr,  # [batch * (k+1), splits] int32
    win_val_ptr,  # [batch, draws, 2] fp32
    win_id_ptr,  # [batch, draws, 2] int64
    win_any_ptr,  # [batch, draws] int32
    output_ptr,  # [batch, k+1] int64 out
    invalid_ptr,  # [batch, k+1] uint8 out
    k,
    splits,
    draws,
    W_P2: tl.constexpr,
    SPLITS_P2: tl.constexpr,
    DRAWS_P2: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, DRAWS_P2)
    in_draws = d < draws
    # The residual's first winner over the chunks, or pi's when the residual has no mass.
    which = tl.where(tl.max(tl.load(win_any_ptr + b * draws + d, mask=in_draws, other=0), 0) > 0, 0, 1)
    val = tl.load(win_val_ptr + (b * draws + d) * 2 + which, mask=in_draws, other=float("-inf"))
    ids = tl.load(win_id_ptr + (b * draws + d) * 2 + which, mask=in_draws, other=0)
    final = tl.sum(tl.where(d == tl.argmax(val, 0), ids, 0), 0)
    # Invalid positions: a NaN/+inf in the logits, or logits all -inf.
    j = tl.arange(0, W_P2)
    s = tl.arange(0, SPLITS_P2)
    offs = (b * (k + 1) + j)[:, None] * splits + s[None, :]
    mask = (j <= k)[:, None] & (s < splits)[None, :]
    bad = tl.sum(tl.load(part_bad_ptr + offs, mask=mask, other=0), 1) > 0
    empty = tl.max(tl.load(part_m1_ptr + offs, mask=mask, other=float("-inf")), 1) == float("-inf")
    tl.store(invalid_ptr + b * (k + 1) + j, (bad | empty).to(tl.uint8), mask=j <= k)
    num = tl.load(num_accepted_ptr + b)
    drafted = tl.load(draft_ids_ptr + b * k + j, mask=j < num, other=-1)
    tl.store(output_ptr + b * (k + 1) + j, tl.where(j == num, final, drafted), mask=j <= k)


def verify_triton(
    target_logits: torch.Tensor,  # [batch, k+1, V_t] fp32/bf16/fp16
    draft_ids: torch.Tensor,  # [batch, k] int64 target ids, -1 where nothing was proposed
    draft_probs: torch.Tensor,  # [batch, k, V_q] fp32: V_q = V_t, or the drafter's V_d with ``cross``
    draft_probs_t1: torch.Tensor | None,  # [batch, k, V_q] fp32 T=1 proposal for the rules; None: draft_probs
    uniforms: torch.Tensor,  # [batch, k] fp32 U[0, 1)
    noise: torch.Tensor | None,  # [batch, V_t] fp32 Exp(1); unused when greedy
    rule: torch.Tensor,  # [batch] int64 rule ids
    alpha: torch.Tensor,  # [batch] fp32
    temperature: float,
    top_k: int,
    top_p: float,
    cross: CrossProposal | None = None,
    *,
    support_only: bool = False,
    block: int = 2048,  # the fastest tile at the goal shapes on an H200 (benchmarks/TUNING.md)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``verify_reference`` in Triton, reading ``q'`` through ``cross`` on the fly (module docstring);
    ``block`` is the tile of the vocabulary."""
    batch, width, vocab = target_logits.shape
    k = width - 1
    device = target_logits.device
    greedy = temperature == 0.0
    probs = draft_probs.contiguous()
    probs1 = probs if draft_probs_t1 is None else draft_probs_t1.contiguous()
    vocab_q = probs.shape[-1]
    uniforms, draft_ids, rule, alpha = (t.contiguous() for t in (uniforms, draft_ids, rule, alpha))
    if greedy:
        noise = uniforms  # unused
    elif noise.stride(-1) != 1:
        noise = noise.contiguous()
    if cross is None:
        spans = (draft_ids, draft_ids, draft_ids, draft_ids, draft_ids, uniforms, uniforms)  # unused
    else:
        # each drafted token's own probability (kernels/proposal.py), under q and q1 (read only if SEPARATE_Q1)
        path = drafted_path(probs, cross.drafter_ids) if cross.path is None else cross.path
        path1 = cross.path_t1
        if path1 is None:
            path1 = path if probs1 is probs else drafted_path(probs1, cross.drafter_ids)
        spans = tuple(t.contiguous() for t in (*cross[:3], cross.d2t, cross.t2d, path, path1))
    if batch == 0:
        new = dict(device=device)
        return (
            torch.empty(0, dtype=torch.int64, **new),
            torch.empty(0, width, dtype=torch.int64, **new),
            torch.empty(0, k, dtype=torch.float32, **new),
            torch.empty(0, k, dtype=torch.bool, **new),
            torch.empty(0, width, dtype=torch.bool, **new),
        )
    stats = target_stats(target_logits, temperature, top_k, top_p, block)
    target_logits, chunk, splits = stats.logits, stats.chunk, stats.splits
    draw_chunk, draws = chunking(vocab, batch, block, device)
    splits_p2, w_p2, k_p2 = (
        triton.next_power_of_2(splits),
        triton.next_power_of_2(width),
        triton.next_power_of_2(k),
    )
    stride_lb, stride_lj = target_logits.stride(0), target_logits.stride(1)
    flags = dict(
        GREEDY=greedy,
        FILTERED=stats.filtered,
        CROSS=cross is not None,
        SEPARATE_Q1=probs1 is not probs,
        SUPPORT=support_only,
    )
    partials = (
        stats.part_m1,
        stats.part_z1,
        stats.part_m,
        stats.part_aux,
        stats.row_z,
        stats.row_t,
        stats.row_c,
    )
    sums = torch.empty(batch * k, splits, 6, dtype=torch.float32, device=device)
    if k:
        _sums_kernel[(batch * k, splits)](
            target_logits, draft_ids, probs, probs1, rule, alpha, *spans, *partials, sums, k, vocab, vocab_q,
            stride_lb, stride_lj, temperature, chunk, splits,
            SPLITS_P2=splits_p2, K_P2=k_p2, BLOCK=block, maxnreg=None if cross is None else CROSS_SUMS_MAXNREG,
            **flags,
        )  # fmt: skip
    num_accepted = torch.empty(batch, dtype=torch.int64, device=device)
    accept_probs = torch.empty(batch, k, dtype=torch.float32, device=device)
    deferred = torch.empty(batch, k, dtype=torch.uint8, device=device)
    win_val = torch.empty(batch, draws, 2, dtype=torch.float32, device=device)
    win_id = torch.empty(batch, draws, 2, dtype=torch.int64, device=device)
    win_any = torch.empty(batch, draws, dtype=torch.int32, device=device)
    _draw_kernel[(batch, draws)](
        target_logits, draft_ids, probs, probs1, uniforms, noise, rule, alpha, *spans, *partials, sums, num_accepted, accept_probs, deferred, win_val, win_id, win_any, k,
        vocab, vocab_q, stride_lb, stride_lj, noise.stride(0), temperature, splits, draw_chunk, W_P2=w_p2,
        K_P2=k_p2, SPLITS_P2=splits_p2, BLOCK=block, maxnreg=DRAW_MAXNREG, **flags,
    )  # fmt: skip
    output_tokens = torch.empty(batch, width, dtype=torch.int64, device=device)
    invalid = torch.empty(batch, width, dtype=torch.uint8, device=device)
    _finish_kernel[(batch,)](
        draft_ids, num_accepted, stats.part_m1, stats.part_bad, win_val, win_id, win_any, output_tokens, invalid, k, splits,
        draws, W_P2=w_p2, SPLITS_P2=splits_p2, DRAWS_P2=triton.next_power_of_2(draws),
    )  # fmt: skip
    return num_accepted, output_tokens, accept_probs, deferred.view(torch.bool), invalid.view(torch.bool)
