"""Counters and per-stage timings of speculative decoding."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch

__all__ = ["GenerationStats", "StageTimer"]


@dataclass
class GenerationStats:
    """What speculative decoding did, for one request or summed over an engine's requests.

    ``proposed``/``accepted`` count drafted tokens, in the target's vocabulary, of rows still generating;
    ``drafter_proposed``/``drafter_accepted`` the drafter tokens behind them; ``merged_*`` the target
    tokens that came from n-gram merges, ``split_*`` those that came from splitting a drafted token with no
    target twin (``EngineConfig.split_tokens``); ``deferred`` the proposed positions where the verifier deferred to
    the target (every position under exact speculative sampling; see ``CascadeConfig``). ``rounds`` counts rounds (one target forward each) and
    ``row_rounds`` rounds summed over active rows. ``ngram_table_size``: entries after the request.
    """

    requests: int = 0
    rounds: int = 0
    row_rounds: int = 0
    proposed: int = 0
    accepted: int = 0
    drafter_proposed: int = 0
    drafter_accepted: int = 0
    merged_proposed: int = 0
    merged_accepted: int = 0
    split_proposed: int = 0
    split_accepted: int = 0
    deferred: int = 0
    ngram_table_size: int = 0
    new_tokens: int = 0
    target_calls: int = 0
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed drafted tokens."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def deferral_rate(self) -> float:
        """Deferred / proposed positions: 1 for exact speculative sampling, lower for lenient cascades."""
        return self.deferred / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per row per round: accepted drafts plus the recovered or bonus token."""
        return self.new_tokens / self.row_rounds if self.row_rounds else 0.0

    @property
    def target_calls_per_token(self) -> float:
        """Target forward passes (prefill included) per new token, summed over rows."""
        return self.target_calls / self.new_tokens if self.new_tokens else 0.0

    @property
    def drafted_per_round(self) -> float:
        """Drafter tokens drafted per row per round: ``k``, or fewer where rows stop early (an acceptance
        head, a confidence threshold)."""
        return self.drafter_proposed / self.row_rounds if self.row_rounds else 0.0

    @property
    def ngram_hits_per_round(self) -> float:
        """Target tokens proposed from n-gram merges, per row per round (as ``drafted_per_round``)."""
        return self.merged_proposed / self.row_rounds if self.row_rounds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    def add(self, other: GenerationStats) -> None:
        for name in _SUMMED:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.ngram_table_size = other.ngram_table_size  # a level, not a count: the latest
        self.seconds += other.seconds
        for stage, seconds in other.stage_seconds.items():
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds

    def as_dict(self) -> dict[str, float | int | dict[str, float]]:
        return {
            "requests": self.requests,
            "rounds": self.rounds,
            "row_rounds": self.row_rounds,
            "proposed": self.proposed,
            "accepted": self.accepted,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "drafter_proposed": self.drafter_proposed,
            "drafter_accepted": self.drafter_accepted,
            "drafted_per_round": round(self.drafted_per_round, 4),
            "merged_proposed": self.merged_proposed,
            "merged_accepted": self.merged_accepted,
            "split_proposed": self.split_proposed,
            "split_accepted": self.split_accepted,
            "deferred": self.deferred,
            "deferral_rate": round(self.deferral_rate, 4),
            "ngram_hits_per_round": round(self.ngram_hits_per_round, 4),
            "ngram_table_size": self.ngram_table_size,
            "mean_accepted_length": round(self.mean_accepted_length, 4),
            "new_tokens": self.new_tokens,
            "target_calls": self.target_calls,
            "target_calls_per_token": round(self.target_calls_per_token, 4),
            "tokens_per_second": round(self.tokens_per_second, 2),
            "seconds": round(self.seconds, 4),
            "stage_seconds": {stage: round(s, 4) for stage, s in self.stage_seconds.items()},
        }

    def summary(self) -> str:
        stages = ", ".join(f"{name} {seconds * 1e3:.1f} ms" for name, seconds in self.stage_seconds.items())
        return (
            f"{self.new_tokens} new tokens in {self.seconds:.3f} s ({self.tokens_per_second:.1f} tok/s), "
            f"{self.rounds} rounds, acceptance {self.acceptance_rate:.1%} ({self.accepted}/{self.proposed}), "
            f"mean accepted length {self.mean_accepted_length:.2f}, "
            f"drafted per round {self.drafted_per_round:.2f}, "
            f"target calls per token {self.target_calls_per_token:.3f}"
            + (f", deferral rate {self.deferral_rate:.1%}" if self.deferred != self.proposed else "")
            + (
                f", n-gram merges {self.merged_accepted}/{self.merged_proposed} accepted "
                f"({self.ngram_hits_per_round:.2f} per round, table {self.ngram_table_size})"
                if self.merged_proposed or self.ngram_table_size
                else ""
            )
            + (
                f", split tokens {self.split_accepted}/{self.split_proposed} accepted"
                if self.split_proposed
                else ""
            )
            + (f"; stages: {stages}" if stages else "")
        )


_SUMMED = (
    "requests", "rounds", "row_rounds", "proposed", "accepted", "drafter_proposed", "drafter_accepted",
    "merged_proposed", "merged_accepted", "split_proposed", "split_accepted", "deferred", "new_tokens",
    "target_calls",
)  # fmt: skip


class StageTimer:
    """Accumulates wall time per stage into a dict. On CUDA it synchronises at each boundary (profiling only).

    Each timed stage is also a ``torch.profiler.record_function`` range named ``stage:<name>``, so a
    profiler trace of an engine with ``EngineConfig(time_stages=True)`` shows the stages (``benchmarks/scale.py``).
    """

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled, self.device = enabled, device
        self.sync = enabled and device.type == "cuda"
        self.seconds: dict[str, float] = {}

    def __call__(self, stage: str) -> AbstractContextManager[None]:
        return _Timed(self, stage) if self.enabled else _UNTIMED


_UNTIMED = nullcontext()


class _Timed:
    """One timed stage of a :class:`StageTimer` (a class, not a generator: a round enters about ten)."""

    __slots__ = ("begin", "range", "stage", "timer")

    def __init__(self, timer: StageTimer, stage: str):
        self.timer, self.stage = timer, stage

    def __enter__(self) -> None:
        if self.timer.sync:
            torch.cuda.synchronize()
        self.begin = time.perf_counter()
        # The profiler range only while a profiler records: entering one costs about as much as the rest
        self.range = None
        if torch.autograd._profiler_enabled():
            self.range = torch.profiler.record_function(f"stage:{self.stage}")
            self.range.__enter__()

    def __exit__(self, *exc) -> None:
        try:
            if self.range is not None:
                self.range.__exit__(*exc)
        finally:
            timer = self.timer
            if timer.sync:
                torch.cuda.synchronize()
            timer.seconds[self.stage] = timer.seconds.get(self.stage, 0.0) + time.perf_counter() - self.begin
