"""The drafter's proposal distribution in the target's vocabulary (OmniDraft, SPEC §2.1 and §2.3).

A drafted block in the drafter's vocabulary ``V_d`` (ids ``y_1..y_k`` drawn from ``q_1..q_k``) becomes,
after translation (``kernels/translate.py``), target tokens ``x_1..x_m``: target position ``j`` stands
for the drafter tokens ``y_s..y_{e-1}`` (``s = source_j``, ``e = span_end_j``; ``e - s = 1`` for a
direct map, ``>= 2`` for an n-gram merge). With ``t2d`` the inverse of the direct map (one canonical
drafter id per target id; drafter ids that spell the same bytes, such as ``▁`` and ``<0x20>``, are folded
onto it first, so ``q`` already holds their summed mass) the proposal probability of target token ``t``
at position ``j`` is:

    q'_j(t)            = q_s(t2d[t])                        (0 where t2d[t] = -1)
    merged (e - s >= 2):
      q'_j(x_j)        = prod_{u=s}^{e-1} r_u(y_u)            the merged token: its parts' path probability
      q'_j(d2t[y_s])  -= prod_{u=s}^{e-1} r_u(y_u)            taken from the first part's direct token (>= 0;
                                                              a split token's first piece, where its mass
                                                              was folded: CrossProposal.d2t)
    q'_j               = 0                                    where nothing was proposed (x_j = -1)...
    q'_j(t)            = q_c(t2d[t])                          ...but the draft stopped at drafter token y_c
                                                              that does not translate (c = source_j,
                                                              span_end_j = c + 1: kernels/translate.py)
    piece (s = source_{j-1}, a split token's second or later piece, kernels/translate.py):
      q'_j             = one-hot(x_j)                         the rest of the drafted token's spelling

where ``r_u(y_u)`` is the probability the drafter gave its drafted token ``y_u`` itself (``CrossProposal.path``),
read before any folding: a folded ``q_u(y_u)`` also holds the mass of the twins and split tokens folded onto
``y_u``, drafter tokens that are not on the path (a GPT-2 drafter's ``Ġ1``, ``Ġ2``, ... all fold onto ``Ġ``
for a Mistral target, which spells them ``▁``, ``1``), and would overstate the merged token's proposal
probability (and understate its first part's). Without ``path``, ``r_u`` is read from ``probs``: the same
where nothing was folded onto the drafted tokens.

At the stop, ``q'_j`` is sub-stochastic: its missing mass is that of the drafter tokens with no target
token, the chance that the drafter proposes nothing there. Verification rejects ``x_j = -1`` and draws
from the residual ``norm(max(0, p_j - q'_j))``, which is exact speculative sampling with "nothing" as a
proposal the target never accepts (the paper sets ``q'_j = 0`` there and draws from ``p_j``, which is not
exact: with splits off, a bias of 0.13 in total variation on a small pair, ``tests/test_cross_vocab.py``).

This is the paper's redistribution, an approximation wherever something merged (the verifier is then
lossless only in the greedy case; exact-match verification restores exactness for sampling). Splits are
ours. A split token's first piece needs nothing new: the bridge folds the mass of every drafter token
that splits onto the drafter twin of its first piece (``VocabBridge.split_twins``, used with
``fold_twins_``), so ``q'_j`` there is the law of the first target token the drafted token becomes. The
later pieces are verified against a point mass, which accepts ``x_j`` with probability ``p_j(x_j)`` and
otherwise draws from ``p_j`` without it: the exact-match rule, lossless whatever the proposal. The
reference builds the dense ``[batch, k, V_t]`` tensor (or the rows of chosen positions only), and
``TargetProposal.at_drafts`` each position's entry at its own draft alone; the verification reference reads
whole rows only where a deferral rule needs them (exact verification: the drafts' entries and the stop
position's row), and the verification kernel gathers ``q'_j(t)`` on the fly and never materialises it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "CrossProposal",
    "TargetProposal",
    "drafted_path",
    "fold_twins_",
    "target_proposal_reference",
]


class CrossProposal(NamedTuple):
    """How a drafted block maps into the target vocabulary: the inputs of the formula above."""

    drafter_ids: torch.Tensor  # [batch, k] int64: y
    source: torch.Tensor  # [batch, k] int64: first drafter position behind target position j
    span_end: torch.Tensor  # [batch, k] int64: one past its last
    # [V_d] int32 where each drafter token's mass sits in q': its direct token, or the first piece of a split
    # token folded there (VocabBridge.proposal_d2t); a merge starting with it takes its mass from there
    d2t: torch.Tensor
    t2d: torch.Tensor  # [V_t] int32
    # [batch, k] fp32: r_u(y_u), each drafted token's own probability before twins were folded (None: read
    # from the probabilities the proposal is built from); ``path_t1`` the same under the T=1 law (the rules')
    path: torch.Tensor | None = None
    path_t1: torch.Tensor | None = None


def drafted_path(probs: torch.Tensor, drafter_ids: torch.Tensor) -> torch.Tensor:
    """``r_u(y_u)`` [batch, k]: the probability ``probs`` [batch, k, V_d] gives each drafted token
    (``drafter_ids`` [batch, k], -1 read as 0); ``CrossProposal.path`` when read before folding."""
    return probs.gather(2, drafter_ids.clamp_min(0)[..., None])[..., 0]


def fold_twins_(probs: torch.Tensor, twins: torch.Tensor) -> torch.Tensor:
    """Add the mass of each drafter id onto its canonical twin in place: ``probs`` [..., V_d],
    ``twins`` [2, D] int64 (row 0 the folded ids, row 1 their canonical ids); returns ``probs``. Read the
    drafted tokens' own probabilities (``CrossProposal.path``) before folding."""
    if twins.shape[1]:
        probs.index_add_(-1, twins[1], probs.index_select(-1, twins[0]))
    return probs


class TargetProposal:
    """``q'`` of the module docstring for one drafted block, its span terms (what each position's row is built
    from) computed once for every read: :meth:`rows` (dense) and :meth:`at_drafts` (each position's entry at
    its own draft), which read the same ``q'``."""

    def __init__(
        self,
        probs: torch.Tensor,  # [batch, k, V_d] fp32, twins folded
        target_ids: torch.Tensor,  # [batch, k] int64, -1 where nothing was proposed
        cross: CrossProposal,
    ):
        self.probs, self.cross = probs, cross
        self.span = _span_terms(probs, target_ids, cross)

    def rows(
        self,
        positions: torch.Tensor | None = None,  # [batch, m] int64 target positions; None: all k
    ) -> torch.Tensor:  # [batch, k, V_t] fp32 ([batch, m, V_t] at ``positions``)
        """Every position's row of ``q'`` (None), or only those at ``positions`` (the same values: the rows are
        built alike, each from its own position's span)."""
        probs, span = self.probs, self.span
        if positions is not None:
            span = _Span(*(t.gather(1, positions) for t in span))
        source, at, mass, merged, first, piece, live = span
        # q_s(t2d[t]): the source rows, then their columns through t2d (index_select, not advanced indexing:
        # the same copies, ~1.7x faster on the CPU), 0 where t2d[t] = -1
        t2d = self.cross.t2d  # [V_t] int32
        q = probs[torch.arange(probs.shape[0], device=probs.device)[:, None], source]  # [batch, m, V_d]
        q = q.index_select(2, t2d.clamp_min(0)).masked_fill_(t2d < 0, 0.0)  # [batch, m, V_t]
        take = torch.where(merged & (first >= 0), mass, 0.0)
        q.scatter_add_(2, first.clamp_min(0)[..., None], -take[..., None])
        q.clamp_min_(0.0)
        at = at[..., None]
        x = torch.where(merged, mass, q.gather(2, at)[..., 0])  # the merged token: its path probability
        q.masked_fill_(piece[..., None], 0.0)  # a split token's later piece: a point mass at x_j
        q.scatter_(2, at, x.masked_fill_(piece, 1.0)[..., None])
        return q.mul_(live[..., None])

    def at_drafts(self) -> torch.Tensor:  # [batch, k] fp32
        """``q'_j(x_j)`` (``x_j`` clamped to 0 where nothing was proposed) without the dense rows: each
        position's entry of :meth:`rows` at its own token, bit for bit. A merge's subtraction at ``d2t[y_s]``
        is not needed here: at a merged position its own token's entry is the path probability, and elsewhere
        it subtracts nothing."""
        probs = self.probs
        source, at, mass, merged, _first, piece, live = self.span
        d = self.cross.t2d[at]  # [batch, k] int32
        rows = torch.arange(probs.shape[0], device=probs.device)[:, None]
        q = torch.where(d >= 0, probs[rows, source, d.clamp_min(0)], 0.0)  # q_s(t2d[x_j])
        q = torch.where(merged, mass, q)
        q = q.masked_fill_(piece, 1.0)
        return q * live


def target_proposal_reference(
    probs: torch.Tensor,  # [batch, k, V_d] fp32, twins folded
    target_ids: torch.Tensor,  # [batch, k] int64, -1 where nothing was proposed
    cross: CrossProposal,
    positions: torch.Tensor | None = None,  # [batch, m] int64 target positions; None: all k
) -> torch.Tensor:  # [batch, k, V_t] fp32 ([batch, m, V_t] at ``positions``)
    """``q'`` of the module docstring, dense: every position's row, or only those at ``positions``
    (:meth:`TargetProposal.rows`)."""
    return TargetProposal(probs, target_ids, cross).rows(positions)


class _Span(NamedTuple):
    """Per target position (each [batch, k]): what its row of ``q'`` is built from."""

    source: torch.Tensor  # int64: the drafter position whose row it reads
    at: torch.Tensor  # int64: x_j, 0 where nothing was proposed
    mass: torch.Tensor  # fp32: the span's path probability
    merged: torch.Tensor  # bool: an n-gram merge (proposed)
    first: torch.Tensor  # int64: d2t[y_s]
    piece: torch.Tensor  # bool: a split token's later piece (proposed)
    live: torch.Tensor  # fp32: 1 where proposed or at the stop at an untranslatable token, else 0


def _span_terms(probs: torch.Tensor, target_ids: torch.Tensor, cross: CrossProposal) -> _Span:
    # Path probability of each span: a difference of cumulative log-probabilities along the draft.
    path = (
        drafted_path(probs, cross.drafter_ids) if cross.path is None else cross.path
    )  # [batch, k]: r_u(y_u)
    cumulative = torch.nn.functional.pad(path.clamp_min(1e-30).log().cumsum(1), (1, 0))  # [batch, k + 1]
    mass = (cumulative.gather(1, cross.span_end) - cumulative.gather(1, cross.source)).exp()  # [batch, k]
    proposed = target_ids >= 0
    width = cross.span_end - cross.source  # drafter tokens behind each position
    merged = (width >= 2) & proposed
    first = cross.d2t[cross.drafter_ids.gather(1, cross.source)].long()  # d2t[y_s]
    previous = torch.nn.functional.pad(cross.source[:, :-1], (1, 0), value=-1)
    piece = (cross.source == previous) & proposed  # [batch, k]
    # Not proposed, a position is one drafter token wide only at the stop at a token with no translation.
    live = (proposed | (width == 1)).to(probs.dtype)
    return _Span(cross.source, target_ids.clamp_min(0), mass, merged, first, piece, live)
