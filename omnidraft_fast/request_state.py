"""One request's device state, and the states kept from earlier requests for later ones.

A request's state (:class:`RequestState`, laid out by ``Rounds.begin``) is a handful of fixed-shape device
tensors that every stage of a round reads and writes in place (docs/architecture.md). With
``EngineConfig(cuda_graphs=True)`` the captured stages hold those very tensors, so a later request with the
same shapes and settings (the *key*) takes over an earlier one's state, caches and graphs
(:class:`KeptStates`) and has its fresh values copied in (:func:`refill`): its graphs replay from the first
round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .adaptive import DraftLength
from .experience import Recorder
from .graphs import StageGraphs
from .kept_logits import KeptLogits
from .models import SlotKVCache
from .processors import Processors

__all__ = ["COUNTERS", "KeptStates", "RequestState", "refill"]

# Per-request device counters (see GenerationStats for their meaning); "invalid" counts rows with bad logits.
# The order is the one Rounds._count sums them in: the per-row counts, then the per-position ones.
COUNTERS = (
    "rounds", "row_rounds", "drafter_proposed", "drafter_accepted", "invalid", "proposed", "accepted",
    "merged_proposed", "merged_accepted", "split_proposed", "split_accepted", "deferred",
)  # fmt: skip


@dataclass
class RequestState:
    """Device state of one request (fixed shapes for the whole request; see docs/architecture.md)."""

    tokens: torch.Tensor  # [batch, slots + 1] committed target tokens by slot
    pad: int  # columns of left padding added to the prompt (EngineConfig.prompt_bucket)
    lengths: torch.Tensor  # [batch] committed slots (dummy slot and padding included)
    start: torch.Tensor  # [batch] first slot of each row's prompt
    generated: torch.Tensor  # [batch] new tokens so far
    done: torch.Tensor  # [batch] bool
    eos_ids: torch.Tensor  # [num_eos]
    d_tokens: torch.Tensor  # [batch, drafter slots + margin] the drafter's context by slot, in drafter ids
    d_start: torch.Tensor  # [batch] first slot of each row's drafter context
    d_lengths: torch.Tensor  # [batch] committed drafter slots
    window: int  # drafter tokens re-fed by the first draft step of a round
    units: torch.Tensor | None  # [V_d] drafted tokens before merges, with split tokens (None: d2t)
    draft_ids: torch.Tensor  # [batch, k] drafter ids
    draft_probs: torch.Tensor  # [batch, k, V_d] fp32 ([batch, k, 0] verifying by exact match: no q read)
    draft_probs_t1: torch.Tensor | None  # [batch, k, V_d] fp32 T=1 drafter probabilities, for cascade rules
    rule: torch.Tensor | None  # [batch] int64 deferral rule ids (None: exact speculative sampling)
    alpha: torch.Tensor | None  # [batch] fp32
    counters: (
        torch.Tensor
    )  # [len(COUNTERS)] int64, summed over rounds (read at the end; "invalid" at every host read)
    recorder: Recorder | None  # labels for the online learners (EngineConfig.distill / adaptive)
    processors: Processors | None  # the request's logits processing (None: none)
    # output_logits / output_scores: "logits" (raw) and/or "scores" (processed, before the sampling warpers
    # unless the rounds warp them, Processing.warps), the target's at each new token (kept_logits.py)
    kept_logits: KeptLogits
    invalid: torch.Tensor  # [batch] bool rows with NaN/inf logits this round
    ran: torch.Tensor  # [] bool the last round had a row still generating (not one past the end)
    # [3] int64 what the host read between rounds takes (SpeculativeEngine._decode): all rows done, rows with
    # bad logits so far (counters' "invalid"), the most new tokens of a row; written at the end of each
    # round's commit, so that with cuda_graphs the read launches nothing
    flags: torch.Tensor
    draft_length: DraftLength | None  # the round's adaptive stopping state (EngineConfig.adaptive)
    # [batch] int64 tokens each row drafted this round where rows may draft fewer than k (draft_length's
    # count, or prompt lookup's); None: every running row drafts k
    drafted: torch.Tensor | None
    graphs: StageGraphs  # the request's captured round stages (EngineConfig.cuda_graphs), with its generator


class _Kept(NamedTuple):
    key: tuple  # the request's shapes and every setting its stages read as a Python value
    state: RequestState
    caches: tuple[SlotKVCache, ...]  # target, then drafter (none with prompt lookup)


class KeptStates:
    """The states of recent requests with both models' caches and their captured stages, for later requests
    with the same key: at most ``capacity``, the least recently used released first."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: list[_Kept] = []  # the most recently used last

    def take(self, key: tuple) -> tuple[RequestState, tuple[SlotKVCache, ...]] | None:
        """The state and caches kept under ``key``, no longer kept (``keep`` them again); None if none."""
        entry = next((e for e in self._entries if e.key == key), None)
        if entry is None:
            return None
        self._entries.remove(entry)
        return entry.state, entry.caches

    def keep(self, key: tuple, state: RequestState, caches: tuple[SlotKVCache, ...]) -> None:
        """Keep a request's state and caches under ``key`` (a capacity of 0 keeps nothing)."""
        if self.capacity == 0:
            return
        self._entries.append(_Kept(key, state, caches))
        while len(self._entries) > self.capacity:
            self._entries.pop(0).state.graphs.close()

    def holds(self, state: RequestState) -> bool:
        return any(e.state is state for e in self._entries)

    def drop(self, state: RequestState) -> None:
        """Keep ``state`` no longer (its graphs are the caller's to close)."""
        self._entries = [e for e in self._entries if e.state is not state]

    def release(self) -> None:
        """Free every kept state, cache and graph."""
        for entry in self._entries:
            entry.state.graphs.close()
        self._entries.clear()


def refill(kept, fresh) -> None:
    """Copy a fresh request state's tensors into the kept one's, in place: captured stages read those
    (``KeptStates``). Tensors both share (the bridge's maps) stay as they are; numbers are taken over
    (the prompt's padding; the others are equal by the reuse key)."""
    if isinstance(fresh, torch.Tensor):
        if fresh is not kept:
            kept.copy_(fresh)
    elif isinstance(fresh, KeptLogits):
        kept.refill(fresh)
    elif isinstance(fresh, dict):
        for name, value in fresh.items():
            refill(kept[name], value)
    elif isinstance(fresh, (RequestState, DraftLength, Recorder, Processors)):
        for name, value in vars(fresh).items():
            if isinstance(value, (int, float)):
                setattr(kept, name, value)
            elif name != "graphs":
                refill(getattr(kept, name), value)
