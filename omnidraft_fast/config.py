"""Configuration: frozen dataclasses validated on construction. Defaults live here and nowhere else."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = ["CascadeConfig", "EngineConfig", "SamplingParams"]

# rule -> (lowest alpha, highest alpha, highest included); ids follow kernels/verify.py's RULES
_ALPHA_RANGES = {
    "chow": (0.0, 1.0, True),
    "diff": (-1.0, 1.0, True),
    "opt": (0.0, math.inf, False),
    "token_v1": (-1.0, 1.0, True),
    "token_v2": (-1.0, 1.0, True),
    "token_v3": (-1.0, 1.0, True),
    "lossy": (0.0, 1.0, False),
}


@dataclass(frozen=True)
class CascadeConfig:
    """A speculative-cascade deferral rule (SPEC §3; the maths is in ``kernels/verify.py``).

    The verifier accepts drafted tokens against a mixture ``pi`` of drafter and target chosen by the rule,
    trading fidelity to the target for speed; ``cascade=None`` is exact speculative sampling.

    Args:
        rule: ``"chow"`` (defer when ``max q < 1 - alpha``; alpha in [0, 1]), ``"diff"`` (``max q < max p -
            alpha``; [-1, 1]), ``"opt"`` (``max q < max p - alpha * TV(q, p)``; alpha >= 0),
            ``"token_v1"`` / ``"token_v2"`` / ``"token_v3"`` (token-specific: keep the drafted token when
            ``q(v) >= max p - alpha`` / ``p(v) >= max p - alpha`` / ``p(v) >= (1 - alpha) max p``; [-1, 1])
            or ``"lossy"`` (lossy speculative decoding: accept with ``min(1, p / ((1 - alpha) q))``;
            [0, 1)).
        alpha: the rule's leniency, one number or one per row of the batch. Larger is more lenient
            (faster, further from the target). chow 0, diff -1, token_v1..v3 -1 and lossy 0 are exact
            speculative sampling; chow 1, diff 1 and token_v1..v3 1 accept every drafted token.
    """

    rule: Literal["chow", "diff", "opt", "token_v1", "token_v2", "token_v3", "lossy"]
    alpha: float | tuple[float, ...]

    def __post_init__(self):
        if self.rule not in _ALPHA_RANGES:
            raise ValueError(f"`rule` must be one of {', '.join(_ALPHA_RANGES)}, got {self.rule!r}")
        if isinstance(self.alpha, (list, tuple)):
            object.__setattr__(self, "alpha", tuple(self.alpha))
            values = self.alpha
            if not values:
                raise ValueError("`alpha` is an empty sequence; give one number, or one per row")
        else:
            values = (self.alpha,)
        low, high, closed = _ALPHA_RANGES[self.rule]
        for value in values:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise TypeError(f"`alpha` must be a number or a sequence of numbers, got {self.alpha!r}")
            if not (low <= value <= high if closed else low <= value < high):
                bracket = "]" if closed else ")"
                raise ValueError(
                    f"`alpha` for rule {self.rule!r} must be in [{low:g}, {high:g}{bracket}, got {value!r}"
                )

    def alphas(self, batch: int) -> tuple[float, ...]:
        """One alpha per row of a batch of ``batch`` rows."""
        if not isinstance(self.alpha, tuple):
            return (float(self.alpha),) * batch
        if len(self.alpha) != batch:
            raise ValueError(
                f"`cascade.alpha` has {len(self.alpha)} values for a batch of {batch} rows; give one number "
                "or one per row"
            )
        return tuple(float(a) for a in self.alpha)


@dataclass(frozen=True)
class EngineConfig:
    """What an engine keeps across requests.

    Args:
        num_draft_tokens: draft length ``k`` used when a request does not give one.
        translation: how drafted tokens become target tokens when the vocabularies differ (ignored when
            they are shared). ``"omnidraft"``: direct map plus n-gram merges with OmniDraft's probability
            redistribution, verified by speculative sampling (the paper's method; greedy output is exact,
            sampled output approximately lossless). ``"tli"``: direct map only, the drafter's unmappable
            tokens suppressed and ``q`` renormalised over the intersection (exactly lossless). ``"exact"``:
            merges allowed, every position verified by exact match against a draw from ``p`` (lossless
            for any proposal).
        ngram_capacity: slots of the n-gram table (rounded up to a power of two).
        ngram_max_len: the longest run of drafter tokens merged into one target token (N).
        ngram_preseed: fill the table with the drafter spelling of every target token at start.
        max_spelling: the most drafter tokens a recovered/bonus target token is spelled with when fed
            back to the drafter (the first draft step of a round re-feeds ``max_spelling + 1`` tokens).
            The rare target tokens spelled longer (e.g. long runs of one character) are left out of
            the drafter's context; the target's output is unaffected.
        cascade: the deferral rule used when a request does not give one (``None``: exact speculative
            sampling). Needs verification against ``q`` (not ``translation="exact"``).
        time_stages: measure the time of each stage of a round (draft, verify, commit, ...). On CUDA this
            synchronises the device at every stage boundary, which stalls the pipeline, so ``None`` (the
            default) means on for CPU and off for CUDA.
    """

    num_draft_tokens: int = 4
    translation: Literal["omnidraft", "tli", "exact"] = "omnidraft"
    ngram_capacity: int = 1 << 16
    ngram_max_len: int = 4
    ngram_preseed: bool = True
    max_spelling: int = 16
    cascade: CascadeConfig | None = None
    time_stages: bool | None = None

    def __post_init__(self):
        if not isinstance(self.num_draft_tokens, int) or self.num_draft_tokens < 1:
            raise ValueError(f"`num_draft_tokens` must be an int >= 1, got {self.num_draft_tokens!r}")
        if self.translation not in ("omnidraft", "tli", "exact"):
            raise ValueError(f"`translation` must be 'omnidraft', 'tli' or 'exact', got {self.translation!r}")
        if not isinstance(self.ngram_capacity, int) or self.ngram_capacity < 1:
            raise ValueError(f"`ngram_capacity` must be an int >= 1, got {self.ngram_capacity!r}")
        if not isinstance(self.ngram_max_len, int) or self.ngram_max_len < 2:
            raise ValueError(f"`ngram_max_len` must be an int >= 2, got {self.ngram_max_len!r}")
        if not isinstance(self.max_spelling, int) or self.max_spelling < 1:
            raise ValueError(f"`max_spelling` must be an int >= 1, got {self.max_spelling!r}")
        if self.cascade is not None and not isinstance(self.cascade, CascadeConfig):
            raise TypeError(f"`cascade` must be a CascadeConfig or None, got {type(self.cascade).__name__}")
        if self.time_stages not in (None, True, False):
            raise TypeError(f"`time_stages` must be True, False or None, got {self.time_stages!r}")


@dataclass(frozen=True)
class SamplingParams:
    """The sampling rule of one request, applied to drafter and target alike.

    ``temperature == 0`` means greedy. ``top_k == 0`` and ``top_p == 1`` switch those filters off.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(
                f"`temperature` must be a number >= 0, got {self.temperature!r}; use do_sample=False for greedy"
            )
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"`top_k` must be an int >= 0 (0 switches top-k off), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"`top_p` must be in (0, 1] (1 switches top-p off), got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
