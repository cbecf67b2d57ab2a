"""What serving teaches the drafter: per-request recording in the round, and the rows it leaves behind.

Online learning (SPEC §4 and §5) trains on the drafter's own committed context, teacher-forced, so the
only things the round has to keep are labels by drafter cache slot. A label at slot ``u`` is about the
drafter's prediction *of* the token at slot ``u`` (made from the hidden state at ``u - 1``):

    kl[u]    >= 0   the emitted target token behind slot u has a drafter twin: reverse KL against the
                    target's distribution at that token (row ``kl[u]`` of ``logits``, the target's logits
                    read into the drafter's vocabulary through the bridge; no second target pass)
    ce[u]           slot u is a drafter sub-token of an emitted target token with no twin (an n-gram
                    token), or a drafted split token whose pieces the target all emitted
                    (``EngineConfig.split_tokens``): cross-entropy on the committed drafter token
    head[u]  in [0, 1] or NaN
                    the acceptance head's label: verification's acceptance probability of the target
                    position whose span starts at u (the drafted token there, accepted or rejected: its
                    context is the committed one; for a split token, the product over its verified
                    pieces; 0 for a drafted token with no target token, where the draft stopped), 1 at
                    the other slots of an accepted merged span
    drafted[u]      the drafter token ``head[u]`` is about: the one drafted at u, which differs from the
                    committed one where verification rejected it (the head's confidence input reads it)

Everything is written with fixed shapes (rows that write nothing aim at a spare column), so recording
adds no host sync to a round. The labels leave in one of two forms, each label once: as ragged
:class:`Example` rows (:meth:`Recorder.examples`, one host read, for the learners' steps between
requests) or, in the middle of a request, as a fixed-shape :class:`Window` of every slot labelled since
the last hand-over (:meth:`Recorder.window`, no host read: a captured stage can hold it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .adaptive import target_law
from .config import SamplingParams

__all__ = ["Example", "Recorder", "Window"]


@dataclass
class Example:
    """One served row, ready to train on (tensors on the engine's device)."""

    ids: torch.Tensor  # [L] int64 the drafter's committed context (prompt spelling + what was emitted)
    kl: torch.Tensor  # [L] int64 row of `logits` for the KL term at each slot, -1 where none
    ce: torch.Tensor  # [L] bool n-gram sub-token and split-token slots (cross-entropy term)
    head: torch.Tensor  # [L] fp32 acceptance-head label, NaN where none
    logits: torch.Tensor  # [m, V_d] the target's logits, in drafter ids, at the emitted tokens `kl` reads
    drafted: torch.Tensor  # [L] int64 the drafter token the head label at each slot is about
    sampling: SamplingParams  # the request's (temperature, top-k, top-p)
    first_logit: int = 0  # the new token `logits[0]` is at (`kl + first_logit` indexes the row's new tokens)
    law: torch.Tensor | None = None  # [m, 2] fp32 adaptive.target_law at those tokens (None: not kept)


@dataclass
class Window:
    """The labels of ``width`` drafter slots per row from the first one not handed over yet, in fixed
    shapes (``[batch, width]``). Slot ``u``'s label is about the prediction made at slot ``u - 1``; slots
    past a row's committed context are padding, with every mask off."""

    inputs: torch.Tensor  # [batch, width] int64 the drafter tokens at slots u - 1, which predict slot u
    slots: torch.Tensor  # [batch, width] int64 u - 1, clamped inside the drafter's cache
    tokens: torch.Tensor  # [batch, width] int64 the committed drafter token at u (cross-entropy target)
    kl: torch.Tensor  # [batch, width] bool a KL label at u
    targets: torch.Tensor  # [batch, width, V_d] the target's logits in drafter ids there (zeros elsewhere)
    ce: torch.Tensor  # [batch, width] bool a cross-entropy label at u (n-gram sub-token or split token)
    head: torch.Tensor  # [batch, width] fp32 acceptance-head labels (0 where none)
    has_head: torch.Tensor  # [batch, width] bool
    drafted: torch.Tensor  # [batch, width] int64 the drafter token the head label at u is about
    sampling: SamplingParams  # the request's (temperature, top-k, top-p)
    law: torch.Tensor | None = None  # [batch, width, 2] fp32 adaptive.target_law there (None: not kept)


class Recorder:
    """Per-request label buffers, filled round by round (see the module docstring).

    Args:
        batch: rows of the request.
        drafter_slots: width of the drafter's token buffer.
        spelling_width: most drafter tokens one recovered/bonus token is spelled with.
        emitted: most target tokens a row can emit (``max_new_tokens + k + 1``).
        label_map: [V_d] int64 target id standing for each drafter id (0 where none; masked in the loss).
        direct: [V_t] bool target ids that have a drafter twin.
        dtype: of the stored target logits (the target's).
        handed: [batch] int64 drafter slot of each row from which labels are not handed over yet (the
            end of its prompt); updated in place by each hand-over.
        sampling: the request's sampling, where the head's recomputed labels read the target's law over its
            whole vocabulary at each emitted token (``adaptive.target_law``); None keeps none.
    """

    def __init__(
        self,
        batch: int,
        drafter_slots: int,
        spelling_width: int,
        emitted: int,
        label_map: torch.Tensor,
        direct: torch.Tensor,
        dtype: torch.dtype,
        handed: torch.Tensor,
        sampling: SamplingParams | None = None,
    ):
        device = label_map.device
        self.label_map, self.direct = label_map, direct
        self.spelling_width = spelling_width
        self.spare_slot, self.spare_row = drafter_slots, emitted
        # One spare column / row at the end takes the writes of positions that record nothing.
        self.kl = torch.full((batch, drafter_slots + 1), -1, dtype=torch.int64, device=device)
        self.ce = torch.zeros(batch, drafter_slots + 1, dtype=torch.bool, device=device)
        self.head = torch.full((batch, drafter_slots + 1), torch.nan, dtype=torch.float32, device=device)
        self.drafted = torch.full((batch, drafter_slots + 1), -1, dtype=torch.int64, device=device)
        self.logits = torch.empty(batch, emitted + 1, label_map.shape[0], dtype=dtype, device=device)
        self.sampling = sampling
        self.law = None if sampling is None else torch.zeros(batch, emitted + 1, 2, device=device)
        self.handed = handed  # [batch] per row, the drafter slot up to which labels were handed over

    def record(
        self,
        *,
        target_logits: torch.Tensor,  # [batch, k+1, V_t]
        draft_ids: torch.Tensor,  # [batch, k] int64 the drafter tokens drafted
        proposal: torch.Tensor,  # [batch, k] int64 target ids proposed, -1 where none
        output_tokens: torch.Tensor,  # [batch, k+1] int64 emitted (accepted + recovered/bonus), -1 padded
        num_accepted: torch.Tensor,  # [batch] int64
        accept_probs: torch.Tensor,  # [batch, k] fp32 verification's acceptance probabilities
        source: torch.Tensor,  # [batch, k] int64 first drafter position behind each target position
        span_end: torch.Tensor,  # [batch, k] int64 drafter tokens consumed by target positions 1..j+1
        slots: torch.Tensor,  # [batch, k+1] int64 drafter slots each target position took this round
        split: torch.Tensor,  # [batch, k] bool drafted (not spelled) pieces of a split token
        kept: torch.Tensor,  # [batch] int64 tokens committed this round (0 for finished rows)
        generated: torch.Tensor,  # [batch] int64 emitted tokens before this round
        d_lengths: torch.Tensor,  # [batch] int64 drafter slots committed before this round
    ) -> None:
        """Label the drafter slots a round committed. ``slots`` lays the round's target positions out in
        the drafter's context (``feedback.py``): drafted positions take their span of drafted tokens
        (none for the pieces of a split token but the last), the others their spelling."""
        batch, k = proposal.shape
        device = proposal.device
        j = torch.arange(k + 1, device=device)  # target positions of the block
        kept_j = j < kept[:, None]  # [batch, k+1]

        # The target's logits at every kept token, in drafter ids.
        rows = torch.where(kept_j, generated[:, None] + j, self.spare_row)  # [batch, k+1]
        labels = target_logits[:, :, self.label_map]  # [batch, k+1, V_d]
        self.logits.scatter_(1, rows[..., None].expand_as(labels), labels)
        if self.law is not None:  # the target's law over its whole vocabulary, which those logits are part of
            law = target_law(target_logits, self.sampling)  # [batch, k+1, 2]
            self.law.scatter_(1, rows[..., None].expand_as(law), law)

        # Drafter slots of each target position: [first, first + length).
        length = slots
        first = d_lengths[:, None] + length.cumsum(1) - length
        # A drafted split token is a drafter token of bytes the target emitted, like an n-gram sub-token.
        pieces = torch.cat([split, split.new_zeros(batch, 1)], 1)
        twin = self.direct[output_tokens.clamp_min(0)] & ~pieces  # [batch, k+1] a drafter twin stands there
        direct = twin & kept_j & (length >= 1)

        spare = self.spare_slot
        self.kl.scatter_(1, torch.where(direct, first, spare), torch.where(direct, rows, -1))
        offsets = torch.arange(max(k, self.spelling_width), device=device)  # every slot a span can cover
        inside = offsets < length[..., None]  # [batch, k+1, W]
        ngram = (~twin & kept_j)[..., None] & inside
        flat = torch.where(ngram, first[..., None] + offsets, spare).flatten(1)
        self.ce.scatter_(1, flat, ngram.flatten(1))

        # Acceptance-head labels: at the first slot of each drafted token, the chance that verification
        # kept it (the product over its verified positions: the pieces of a split token share one); 1
        # at the other slots of an accepted merged span.
        # The draft's stop at a drafted token with no target token (kernels/translate.py: proposal -1 with
        # span_end = source + 1) is a drafted token verification always rejects: its label is 0.
        stop = (proposal < 0) & (span_end - source == 1)
        verified = ((proposal >= 0) | stop) & (j[:k] <= num_accepted[:, None]) & kept_j[:, :k]
        probs = torch.where(stop, 0.0, accept_probs)
        same = source[:, :, None] == source[:, None, :]  # [batch, k, k]: positions of one drafted token
        chance = torch.where(same & verified[:, None, :], probs[:, None, :], 1.0).prod(-1)
        leads = verified & (source != torch.cat([source.new_full((batch, 1), -1), source[:, :-1]], 1))
        at_leads = torch.where(leads, first[:, :k], spare)
        self.head.scatter_(1, at_leads, torch.where(leads, chance, torch.nan))
        self.drafted.scatter_(1, at_leads, torch.where(leads, draft_ids.gather(1, source), -1))
        accepted = (j[:k] < num_accepted[:, None]) & kept_j[:, :k] & (span_end - source >= 2)
        inner = (offsets[1:] < length[:, :k, None]) & accepted[..., None]  # [batch, k, W - 1]
        inner_slots = torch.where(inner, first[:, :k, None] + offsets[1:], spare).flatten(1)
        self.head.scatter_(1, inner_slots, torch.where(inner, 1.0, torch.nan).flatten(1))

    def examples(
        self,
        d_tokens: torch.Tensor,  # [batch, drafter slots]
        d_start: torch.Tensor,  # [batch] first slot of each row's drafter context
        d_lengths: torch.Tensor,  # [batch] committed drafter slots
        sampling: SamplingParams,
    ) -> list[Example]:
        """The rows as training examples, each with the labels recorded since the last hand-over (one
        host read of the lengths; outside the rounds). An example holds the row's whole context, its
        labels only once, and of the target's logits only the rows those labels read (after in-flight
        hand-overs, a few of the row's emitted tokens)."""
        out = []
        slot = torch.arange(self.kl.shape[1], device=d_tokens.device)
        labelled = (slot >= self.handed[:, None]) & (slot < d_lengths[:, None])  # slots labelled since then
        kl = torch.where(labelled, self.kl, -1)
        first_row = torch.where(kl >= 0, kl, self.spare_row).amin(1)
        end_row = kl.amax(1) + 1
        bounds = torch.stack([d_start, d_lengths, first_row, end_row]).tolist()
        for start, end, lo, hi, row in zip(*bounds, range(d_tokens.shape[0]), strict=True):
            new = labelled[row, start:end]
            ids, drafted = d_tokens[row, start:end].clone(), self.drafted[row, start:end]
            lo = min(lo, hi)  # no KL label: no logits
            out.append(
                Example(
                    ids=ids,
                    kl=torch.where(kl[row, start:end] >= 0, kl[row, start:end] - lo, -1),
                    ce=self.ce[row, start:end] & new,
                    head=torch.where(new, self.head[row, start:end], torch.nan),
                    logits=self.logits[row, lo:hi].clone(),
                    drafted=torch.where(new & (drafted >= 0), drafted, ids),
                    sampling=sampling,
                    first_logit=lo,
                    law=None if self.law is None else self.law[row, lo:hi].clone(),
                )
            )
        self.handed.copy_(d_lengths)
        return out

    def window(
        self,
        d_tokens: torch.Tensor,  # [batch, drafter slots]
        d_start: torch.Tensor,  # [batch] first slot of each row's drafter context
        d_lengths: torch.Tensor,  # [batch] committed drafter slots
        width: int,
        cache_slots: int,
        sampling: SamplingParams,
        take: torch.Tensor,  # [] bool: False hands nothing over (an empty window; the labels stay)
    ) -> Window:
        """The labels recorded since the last hand-over as a :class:`Window` of ``width`` slots per row,
        with no host read. ``width`` must be at least the drafter slots a row can commit between two
        hand-overs (``Rounds.slots_per_round`` times the rounds): nothing is left out then."""
        batch, device = d_tokens.shape[0], d_tokens.device
        slot = self.handed[:, None] + torch.arange(width, device=device)  # [batch, width] labelled slots u
        # A row's first slot has no context to be predicted from (its prompt spelled to nothing).
        valid = (slot < d_lengths[:, None]) & (slot > d_start[:, None]) & take
        slot = slot.clamp(max=self.spare_slot)  # padding reads the spare column, which holds no label
        kl, head = self.kl.gather(1, slot), self.head.gather(1, slot)
        has_kl, has_head = valid & (kl >= 0), valid & ~head.isnan()
        rows = torch.arange(batch, device=device)[:, None]
        targets = self.logits[rows, kl.clamp_min(0)]  # [batch, width, V_d]
        # Rows of the logits buffer never written are uninitialised memory: keep them out of the loss.
        targets = targets.masked_fill(~has_kl[..., None], 0.0)
        before = (slot - 1).clamp(max=cache_slots - 1)
        tokens, drafted = (
            d_tokens.gather(1, slot.clamp(max=d_tokens.shape[1] - 1)),
            self.drafted.gather(1, slot),
        )
        window = Window(
            inputs=d_tokens.gather(1, before),
            slots=before,
            tokens=tokens,
            kl=has_kl,
            targets=targets,
            ce=valid & self.ce.gather(1, slot),
            head=torch.where(has_head, head, 0.0),
            has_head=has_head,
            drafted=torch.where(has_head & (drafted >= 0), drafted, tokens),
            sampling=sampling,
            law=None
            if self.law is None
            else self.law[rows, kl.clamp_min(0)].masked_fill(~has_kl[..., None], 0),
        )
        self.handed.copy_(torch.where(take, d_lengths, self.handed))
        return window
