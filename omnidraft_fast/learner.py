"""The engine's online learners: LoRA distillation of the drafter and the acceptance head, between requests.

Served rows arrive as :class:`~omnidraft_fast.experience.Example`s. Every ``interval`` rows the learner
runs the drafter teacher-forced over them (with its adapter on) and takes one optimiser step:

    distillation on, mode "alternating" (default)
        1 drafter step on the hybrid distillation loss (``distill.py``)
        2 the head trains alone on a replay of recent rows, its labels recomputed under the updated
          drafter (``adaptive.expected_acceptance``), ``head_steps`` steps
    mode "joint"
        1 one backward pass through distillation loss + head loss with verification's labels: the
          head and the adapter step together (the head's loss trains the adapter too)
    distillation off
        the head trains alone as above (alternating), or on the new rows with verification's labels
        (joint)

This runs between requests, never inside a round, and only touches the adapter and the head: the base
drafter's weights never change.

With ``EngineConfig(in_flight_rounds=n)`` the learners also step every n rounds in the middle of a request
(:meth:`OnlineLearner.step_in_flight`), on the labels its rows recorded since the last step. That step
has fixed shapes and reads nothing back to the host, so the engine captures it like a round's stages
(``graphs.py``): it takes a :class:`~omnidraft_fast.experience.Window` of the new slots, and scores them
with the drafter attending to its own serving cache for the context before them (no recomputation of
the context; its keys and values are constants to the gradient). Losses are masked means, the
optimisers' steps are gated on the device (:mod:`~omnidraft_fast.optim`), and the head trains on the
window (its replay buffer is filled between requests). Step counts and the last losses live on the
device and are read only when :attr:`OnlineLearner.stats` is.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Literal

import torch

from .adaptive import AcceptanceHead, acceptance_loss, confidence_logit, expected_acceptance
from .bridge import VocabBridge
from .config import AdaptiveConfig, DistillConfig, SamplingParams
from .distill import LoraAdapter, hybrid_distillation_loss
from .experience import Example, Recorder, Window
from .memory import check_fits
from .models import CausalLM, head_inputs
from .optim import AdamW

__all__ = ["LearnerStats", "OnlineLearner"]

# Logit elements one teacher-forced pass may hold (rows are split into passes above it).
_PASS_BUDGET = 1 << 27


@dataclass
class LearnerStats:
    """What the learners did: rows handed over between requests, optimiser steps (in flight too), the last
    losses, time spent training."""

    rows: int = 0
    distill_steps: int = 0
    head_steps: int = 0
    distill_loss: float = float("nan")
    head_loss: float = float("nan")
    # wall time spent training: the steps between requests, and in flight those run as a stage of their own
    # (rounds_per_sync=1); with rounds_per_sync > 1 an in-flight step runs inside the unit of rounds (one
    # captured graph) and its time counts as the rounds' (the engine's stage "rounds")
    seconds: float = 0.0


@dataclass
class _Pass:
    """One teacher-forced pass over some rows, flattened to the labelled positions."""

    kl_logits: torch.Tensor  # [P, V_d] drafter logits predicting KL slots
    kl_targets: torch.Tensor  # [P, V_d] target logits there
    kl_rows: torch.Tensor  # [P] int64 the row (of the pass's) each comes from
    kl_law: torch.Tensor | None  # [P, 2] fp32 the target's law over its vocabulary there (Example.law)
    ce_logits: torch.Tensor  # [Q, V_d]
    ce_tokens: torch.Tensor  # [Q]
    head_hidden: torch.Tensor  # [R, H] hidden states predicting head-labelled slots
    head_input: torch.Tensor | None  # [R] the head's confidence input there (None: a head without it)
    head_tokens: torch.Tensor  # [R] int64 the drafted tokens the labels are about
    head_labels: torch.Tensor  # [R] verification's labels
    head_kl: torch.Tensor  # [R] index into the KL positions (-1: none), for recomputed labels


class OnlineLearner:
    """The learners of one engine (``EngineConfig.distill`` and/or ``EngineConfig.adaptive``).

    Args:
        drafter: the engine's drafter.
        bridge: the vocabulary bridge (``None`` for a shared vocabulary).
        target_vocab_size: ids of the target's vocabulary.
        distill, adaptive: the configurations (at least one given).
        adapter_name: the LoRA adapter's name when ``distill`` does not set one.
        merge_always: serve merged LoRA weights from the first request on, rewritten in place after
            each update (captured rounds, in-flight learning: the tensors they read stay the same).
        frozen: parameters the adapter must not touch (the target's).
        translation, split_tokens: the engine's (``EngineConfig``), which the alternating mode's recomputed
            head labels follow across vocabularies: exact match's acceptance with ``"exact"``, the drafter
            restricted to the directly mapped ids with ``"tli"``, split tokens' mass on their first piece.
    """

    def __init__(
        self,
        drafter: CausalLM,
        bridge: VocabBridge | None,
        target_vocab_size: int,
        distill: DistillConfig | None,
        adaptive: AdaptiveConfig | None,
        adapter_name: str,
        merge_always: bool = False,
        frozen: list[torch.nn.Parameter] = (),
        translation: Literal["omnidraft", "tli", "exact"] = "omnidraft",
        split_tokens: bool = True,
    ):
        device, vocab = drafter.device, drafter.vocab_size
        if adaptive is not None:  # before the drafter gets an adapter
            hidden_size = drafter.model.get_output_embeddings().weight.shape[1]
            # the head is built on the CPU, then moved: its blocks' weights, their gradients, AdamW's moments
            check_fits(
                f"`AdaptiveConfig.blocks`={adaptive.blocks}",
                4 * 4 * adaptive.blocks * (hidden_size * hidden_size + hidden_size),
                f"the acceptance head ({adaptive.blocks:,} blocks of {hidden_size}x{hidden_size} float32 weights, "
                "their gradients and AdamW moments)",
                ("cpu", device),
            )
        self.drafter, self.distill_config, self.adaptive_config = drafter, distill, adaptive
        # The alternating mode's recomputed head labels follow verification (adaptive.expected_acceptance):
        # across vocabularies, exact match's acceptance with translation="exact", a TLI drafter's law over
        # the directly mapped ids, split tokens' mass on their first piece, the target's law over its whole
        # vocabulary read at the directly mapped ids, through two numbers the rounds keep
        # (adaptive.target_law).
        cross = bridge is not None
        self.exact_match = cross and translation == "exact"
        self.draftable = bridge.mappable if cross and translation == "tli" else None
        self.keeps_law = cross and adaptive is not None and adaptive.mode == "alternating"
        if bridge is None:
            self.support = torch.ones(vocab, dtype=torch.bool, device=device)
            self.twins = torch.empty(2, 0, dtype=torch.int64, device=device)
            self.label_map = torch.arange(vocab, device=device)
            self.direct = torch.ones(target_vocab_size, dtype=torch.bool, device=device)
            self.canonical = torch.arange(vocab, device=device)
        else:
            d2t, t2d = bridge.d2t.long(), bridge.t2d.long()
            # Canonical drafter ids with a target twin: S of distill.py.
            self.support = (d2t >= 0) & (t2d[d2t.clamp_min(0)] == torch.arange(vocab, device=device))
            self.twins = bridge.twins
            self.label_map = d2t.clamp_min(0)
            self.direct = t2d >= 0
            # each drafter id, or the canonical twin its probability is folded onto
            self.canonical = torch.arange(vocab, device=device).index_copy(0, self.twins[0], self.twins[1])
        # what verification folds: twins, and split tokens' mass where sampled requests split them
        splits = bridge is not None and split_tokens and translation != "tli"
        self.proposal_twins = torch.cat([self.twins, bridge.split_twins], 1) if splits else self.twins
        self.adapter = None
        if distill is not None:
            # merge_always: the drafter serves the same merged tensors from the first request on, so that
            # captured rounds see every update (made in the middle of a request, or between requests)
            self.adapter = LoraAdapter(
                drafter.model,
                distill,
                distill.adapter_name or adapter_name,
                merge_always=merge_always,
                frozen=frozen,
            )
            self.optimizer = AdamW(
                self.adapter.parameters, lr=distill.lr, betas=distill.betas, weight_decay=distill.weight_decay
            )
        self.head = None
        if adaptive is not None:
            self.head = AcceptanceHead(
                hidden_size, adaptive.blocks, adaptive.prior, adaptive.confidence_input
            ).to(device)
            self.head_optimizer = AdamW(
                self.head.parameters(), lr=adaptive.lr, weight_decay=adaptive.weight_decay
            )
            self.replay: deque[Example] = deque(maxlen=adaptive.replay)
        self.interval = distill.interval if distill is not None else adaptive.interval
        self.enabled = True  # False: requests are served with what was learned, and teach nothing
        self.pending: list[Example] = []
        self.rows = 0  # rows handed over between requests
        self.seconds = 0.0  # spent training (the engine adds the in-flight steps' time)
        self.losses = torch.full((2,), torch.nan, device=device)  # the last distillation and head losses

    @property
    def stats(self) -> LearnerStats:
        """What the learners did so far (reads the device's step counts and losses: not inside a round)."""
        zero = self.losses.new_zeros(())
        counts = [self.optimizer.steps if self.adapter is not None else zero]
        counts.append(self.head_optimizer.steps if self.head is not None else zero)
        distill_steps, head_steps, distill_loss, head_loss = torch.cat(
            [torch.stack(counts), self.losses]
        ).tolist()
        return LearnerStats(
            rows=self.rows,
            distill_steps=int(distill_steps),
            head_steps=int(head_steps),
            distill_loss=distill_loss,
            head_loss=head_loss,
            seconds=self.seconds,
        )

    def serving(self):
        """Context of a request: the drafter with its adapter merged while the engine drafts."""
        return self.adapter.serving() if self.adapter is not None else nullcontext()

    def recorder(
        self,
        batch: int,
        drafter_slots: int,
        spelling_width: int,
        emitted: int,
        dtype,
        handed: torch.Tensor,
        sampling: SamplingParams,
    ) -> Recorder:
        return Recorder(
            batch, drafter_slots, spelling_width, emitted, self.label_map, self.direct, dtype, handed,
            sampling if self.keeps_law else None,
        )  # fmt: skip

    def observe(self, examples: list[Example]) -> None:
        """Take a finished request's rows; train once ``interval`` rows with labels are waiting. A row with
        none left (the in-flight steps took them all) is dropped: it would cost a training pass for nothing
        and push labelled rows out of the head's replay (one host read)."""
        self.rows += len(examples)
        if examples:
            labelled = torch.stack([_labelled(row).any() for row in examples]).tolist()
            self.pending.extend(row for row, keep in zip(examples, labelled, strict=True) if keep)
        if len(self.pending) >= self.interval:
            self.step()

    def step(self) -> None:
        """One training step on the waiting rows (module docstring), then forget them."""
        rows, self.pending = self.pending, []
        if not rows:
            return
        began = time.perf_counter()
        joint = self.adaptive_config is not None and self.adaptive_config.mode == "joint"
        if self.adapter is not None:
            self._distill_step(rows, with_head=joint)
        elif joint:
            self._head_step(rows, recompute=False)
        if self.head is not None and not joint:
            self.replay.extend(rows)
            self._head_step(list(self.replay), recompute=True)
        self.seconds += time.perf_counter() - began

    def step_in_flight(self, window: Window) -> None:
        """One training step in the middle of a request, on the labels of ``window`` (module docstring):
        the same steps as :meth:`step`, in fixed shapes, with no host read. It runs inside the request's
        ``serving`` context: the LoRA layers come back for the step, then the merge is rewritten in place."""
        joint = self.adaptive_config is not None and self.adaptive_config.mode == "joint"
        with self.adapter.paused() if self.adapter is not None else nullcontext():
            if self.adapter is not None:
                self._distill_window(window, with_head=joint)
            elif joint:
                self._head_window(window, recompute=False)
            if self.head is not None and not joint:
                self._head_window(window, recompute=True)

    # ---------------------------------------------------------------------------------------------
    def _distill_step(self, rows: list[Example], with_head: bool) -> None:
        config = self.distill_config
        parameters = self._trained(with_head)
        self.optimizer.zero_grad()
        if with_head:
            self.head_optimizer.zero_grad()
        total_labels, total_head = _counts(rows)
        distill_sum, head_sum = self.losses.new_zeros(()), self.losses.new_zeros(())
        with self.adapter.active(), _only_trainable(self.drafter.model, parameters), torch.enable_grad():
            for chunk in self._passes(rows):
                part = self._run(chunk, grad=True)
                loss = hybrid_distillation_loss(
                    part.kl_logits,
                    part.kl_targets,
                    part.ce_logits,
                    part.ce_tokens,
                    self.support,
                    self.twins,
                    config.ngram_weight,
                ) * ((part.kl_logits.shape[0] + part.ce_tokens.numel()) / max(1, total_labels))
                distill_sum += loss.detach()
                if with_head and part.head_labels.numel():
                    head = acceptance_loss(
                        self.head.logits(part.head_hidden, part.head_input),
                        part.head_labels,
                        self.adaptive_config.reject_weight,
                    ) * (part.head_labels.numel() / max(1, total_head))
                    head_sum += head.detach()
                    loss = loss + head
                loss.backward()
        stepped = self._adapter_step(torch.tensor(total_labels > 0, device=distill_sum.device))
        self.losses[0] = torch.where(stepped, distill_sum, self.losses[0])
        if with_head and total_head:
            self._head_optimizer_step(head_sum, None)

    def _distill_window(self, window: Window, with_head: bool) -> None:
        """:meth:`_distill_step` on a window: masked losses, steps gated on there being labels."""
        self.optimizer.zero_grad()
        if with_head:
            self.head_optimizer.zero_grad()
        with (
            self.adapter.active(),
            _only_trainable(self.drafter.model, self._trained(with_head)),
            torch.enable_grad(),
        ):
            logits, hidden = self.drafter.score(window.inputs, window.slots)
            flat = logits.flatten(0, 1)
            loss = hybrid_distillation_loss(
                flat,
                window.targets.flatten(0, 1),
                flat,
                window.tokens.flatten(),
                self.support,
                self.twins,
                self.distill_config.ngram_weight,
                kl_mask=window.kl.flatten(),
                ce_mask=window.ce.flatten(),
            )
            total = loss
            if with_head:
                head = acceptance_loss(
                    self.head.logits(hidden, self._head_input(logits, window.drafted)),
                    window.head,
                    self.adaptive_config.reject_weight,
                    window.has_head,
                )
                total = total + head
            total.backward()
        stepped = self._adapter_step((window.kl | window.ce).any())
        self.losses[0] = torch.where(stepped, loss.detach(), self.losses[0])
        if with_head:
            self._head_optimizer_step(head.detach(), window.has_head.any())

    def _head_window(self, window: Window, recompute: bool) -> None:
        """:meth:`_head_step` on a window: the hidden states of the current drafter, masked losses."""
        with self.adapter.active() if self.adapter is not None else nullcontext(), torch.no_grad():
            logits, hidden = self.drafter.score(window.inputs, window.slots)
        labels = window.head
        if recompute:
            fresh = self._relabel(
                logits.flatten(0, 1),
                window.targets.flatten(0, 1),
                window.drafted.flatten(),
                window.sampling,
                None if window.law is None else window.law.flatten(0, 1),
            )
            labels = torch.where(window.kl, fresh.view_as(labels), labels)
        inputs = self._head_input(logits, window.drafted)
        self._fit_head(hidden.float(), inputs, labels, window.has_head, recompute)

    def _head_step(self, rows: list[Example], recompute: bool) -> None:
        """The head alone, on hidden states of the current drafter (no gradient into the drafter)."""
        hidden, inputs, labels = [], [], []
        with self.adapter.active() if self.adapter is not None else nullcontext(), torch.no_grad():
            for chunk in self._passes(rows):
                part = self._run(chunk, grad=False)
                label = part.head_labels
                if recompute and part.kl_logits.shape[0]:
                    at = part.head_kl.clamp_min(0)
                    fresh = torch.zeros_like(label)
                    rows = part.kl_rows[at]
                    for sampling in {row.sampling for row in chunk}:  # positions sampled alike, together
                        same = torch.tensor([row.sampling == sampling for row in chunk], device=rows.device)
                        group = torch.nonzero(same[rows])[:, 0]
                        fresh[group] = self._relabel(
                            part.kl_logits[at[group]],
                            part.kl_targets[at[group]],
                            part.head_tokens[group],
                            sampling,
                            None if part.kl_law is None else part.kl_law[at[group]],
                        )
                    label = torch.where(part.head_kl >= 0, fresh, label)
                hidden.append(part.head_hidden.float())
                inputs.append(part.head_input)
                labels.append(label)
        hidden, labels = torch.cat(hidden), torch.cat(labels)
        inputs = None if inputs[0] is None else torch.cat(inputs)
        if labels.numel():
            self._fit_head(hidden, inputs, labels, None, recompute)

    def _fit_head(
        self,
        hidden: torch.Tensor,
        inputs: torch.Tensor | None,
        labels: torch.Tensor,
        mask: torch.Tensor | None,
        recompute: bool,
    ) -> None:
        """The head's optimiser steps on fixed hidden states (and confidence inputs): ``head_steps`` of them
        on recomputed labels, one on verification's; with a ``mask``, only where it is set (and no step when
        it is all off)."""
        labelled = None if mask is None else mask.any()
        config = self.adaptive_config
        with torch.enable_grad():
            for _ in range(config.head_steps if recompute else 1):
                self.head_optimizer.zero_grad()
                loss = acceptance_loss(self.head.logits(hidden, inputs), labels, config.reject_weight, mask)
                loss.backward()
                self._head_optimizer_step(loss.detach(), labelled)

    def _head_optimizer_step(self, loss: torch.Tensor, gate: torch.Tensor | None) -> None:
        """Step the head unless ``gate`` is off or its ``loss`` is not finite; keep the loss if it stepped."""
        stepped = loss.isfinite() if gate is None else gate & loss.isfinite()
        self.head_optimizer.step(stepped)
        self.losses[1] = torch.where(stepped, loss, self.losses[1])

    def _passes(self, rows: list[Example]) -> Iterator[list[Example]]:
        """Rows grouped so that one pass holds at most ``_PASS_BUDGET`` logits."""
        vocab = self.drafter.vocab_size
        chunk: list[Example] = []
        for row in sorted(rows, key=lambda r: r.ids.numel()):
            longest = max([r.ids.numel() for r in chunk] + [row.ids.numel()])
            if chunk and (len(chunk) + 1) * longest * vocab > _PASS_BUDGET:
                yield chunk
                chunk = []
            chunk.append(row)
        if chunk:
            yield chunk

    def _run(self, rows: list[Example], grad: bool) -> _Pass:
        """Teacher-forced drafter pass over ``rows``; the positions each loss needs."""
        device = self.support.device
        length = max(r.ids.numel() for r in rows)
        ids = torch.zeros(len(rows), length, dtype=torch.int64, device=device)
        mask = torch.zeros(len(rows), length, dtype=torch.int64, device=device)
        kl = torch.full((len(rows), length), -1, dtype=torch.int64, device=device)
        ce = torch.zeros(len(rows), length, dtype=torch.bool, device=device)
        head = torch.full((len(rows), length), torch.nan, dtype=torch.float32, device=device)
        drafted = torch.zeros(len(rows), length, dtype=torch.int64, device=device)
        row_of = []
        offset = 0
        for i, row in enumerate(rows):
            n = row.ids.numel()
            ids[i, :n], mask[i, :n], ce[i, :n], head[i, :n] = row.ids, 1, row.ce, row.head
            drafted[i, :n] = row.drafted
            kl[i, :n] = torch.where(row.kl >= 0, row.kl + offset, -1)
            row_of.append(torch.full((row.logits.shape[0],), i, device=device))
            offset += row.logits.shape[0]
        targets = torch.cat([r.logits for r in rows])  # [sum n, V_d]
        laws = None if any(r.law is None for r in rows) else torch.cat([r.law for r in rows])  # [sum n, 2]
        row_of = torch.cat(row_of)

        # Positions as the rounds give them (CausalLM: clamped to the drafter's position limit): a row's
        # context can run past the limit (the drafts a finished row accepted past its end, a spelling longer
        # than the target's tokens), where a table of absolute positions has no row for it.
        positions = torch.arange(length, device=device).expand(len(rows), length)
        if self.drafter.position_limit is not None:
            positions = positions.clamp(max=self.drafter.position_limit - 1)
        with head_inputs(self.drafter.model) as captured, torch.set_grad_enabled(grad):
            logits = self.drafter.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False
            ).logits
        hidden = captured[-1]  # [rows, length, H]
        # The prediction of slot u comes from position u - 1; slot 0 (the first token) has none.
        kl, ce, head, drafted = kl[:, 1:], ce[:, 1:], head[:, 1:], drafted[:, 1:]
        logits, hidden, ids = logits[:, :-1], hidden[:, :-1], ids[:, 1:]
        at_kl, at_ce, at_head = kl >= 0, ce, ~head.isnan()
        kl_index = torch.full_like(kl, -1)
        kl_index[at_kl] = torch.arange(int(at_kl.sum()), device=device)
        return _Pass(
            kl_logits=logits[at_kl],
            kl_targets=targets[kl[at_kl]],
            kl_rows=row_of[kl[at_kl]],
            kl_law=None if laws is None else laws[kl[at_kl]],
            ce_logits=logits[at_ce],
            ce_tokens=ids[at_ce],
            head_hidden=hidden[at_head],
            head_input=self._head_input(logits[at_head], drafted[at_head]),
            head_tokens=drafted[at_head],
            head_labels=head[at_head],
            head_kl=kl_index[at_head],
        )

    def _relabel(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        drafted: torch.Tensor,
        sampling: SamplingParams,
        law: torch.Tensor | None,
    ) -> torch.Tensor:
        """The labels of positions under the current drafter (``adaptive.expected_acceptance``): its ``logits``
        [n, V_d], the target's ``targets`` [n, V_d] and its ``law`` [n, 2] over its vocabulary (None: over
        ``targets``),
        the ``drafted`` tokens [n] (read by a head with the confidence input) of a request sampled by
        ``sampling``."""
        tokens = self.canonical[drafted] if self.head.confidence_input else None
        return expected_acceptance(
            logits,
            targets,
            self.support,
            self.proposal_twins,
            sampling,
            tokens,
            exact_match=self.exact_match,
            law=law,
            draftable=self.draftable,
        )

    def _head_input(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor | None:
        """The head's confidence input for the drafter's predictions ``logits`` [..., V_d] of ``tokens``
        [...] (``AdaptiveConfig.confidence_input``); None for a head without it."""
        if self.head is None or not self.head.confidence_input:
            return None
        return confidence_logit(logits.detach(), tokens)  # no autograd record of the [R, V] softmax

    def _adapter_step(self, gate: torch.Tensor) -> torch.Tensor:
        """Clip the adapter's gradients and step it, unless ``gate`` (there are labels) is off or they are not finite
        (a NaN or inf anywhere skips the step, as a loss scaler does, so a bad batch cannot wreck the
        adapter); the merge follows. Returns whether it stepped (0-d bool, on the device)."""
        parameters, max_norm = self.adapter.parameters, self.distill_config.max_grad_norm
        if max_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
        stepped = gate & norm.isfinite()
        self.optimizer.step(stepped)
        self.adapter.updated()
        return stepped

    def _trained(self, with_head: bool) -> list[torch.nn.Parameter]:
        return list(self.adapter.parameters) + (list(self.head.parameters()) if with_head else [])


def _counts(rows: list[Example]) -> tuple[int, int]:
    """Labelled positions (KL + CE) and head-labelled positions over ``rows``, slot 0 excluded."""
    labels = sum(int(((r.kl[1:] >= 0) | r.ce[1:]).sum()) for r in rows)
    heads = sum(int((~r.head[1:].isnan()).sum()) for r in rows)
    return labels, heads


def _labelled(row: Example) -> torch.Tensor:
    """[L - 1] bool: the row's slots with any label (KL, CE or the head's), slot 0 excluded (``_counts``)."""
    return (row.kl[1:] >= 0) | row.ce[1:] | ~row.head[1:].isnan()


@contextmanager
def _only_trainable(model: torch.nn.Module, parameters: list[torch.nn.Parameter]) -> Iterator[None]:
    """Gradients for ``parameters`` only: the base drafter's weights are left out of the backward pass."""
    keep = {id(p) for p in parameters}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in keep]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)
