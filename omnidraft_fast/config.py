"""Configuration: frozen dataclasses validated on construction. Defaults live here and nowhere else."""

from __future__ import annotations

import dataclasses
import math
import numbers
import sys
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["AdaptiveConfig", "CascadeConfig", "DistillConfig", "EngineConfig", "SamplingParams"]

# rule -> (lowest alpha, highest alpha, highest included); ids follow kernels/cascade.py's RULES
_ALPHA_RANGES = {
    "chow": (0.0, 1.0, True),
    "diff": (-1.0, 1.0, True),
    "opt": (0.0, math.inf, False),
    "token_v1": (-1.0, 1.0, True),
    "token_v2": (-1.0, 1.0, True),
    "token_v3": (-1.0, 1.0, True),
    "lossy": (0.0, 1.0, False),
}


def plain(value: Any) -> Any:
    """numpy scalars (which transformers takes as numbers) as Python bools, ints and floats, in lists too."""
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    if isinstance(value, bool) or type(value).__module__ != "numpy":
        return value
    if getattr(getattr(value, "dtype", None), "kind", None) == "b":  # numpy.bool_, not a numbers.Integral
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    return float(value) if isinstance(value, numbers.Real) else value


def _plain_fields(config) -> None:
    """A frozen config's numpy numbers as Python ones, before its checks (``plain``)."""
    for field in dataclasses.fields(config):
        object.__setattr__(config, field.name, plain(getattr(config, field.name)))


@dataclass(frozen=True)
class CascadeConfig:
    """A speculative-cascade deferral rule (SPEC §3; the maths is in ``kernels/cascade.py``).

    The verifier accepts drafted tokens against a mixture ``pi`` of drafter and target chosen by the rule,
    trading fidelity to the target for speed; ``cascade=None`` is exact speculative sampling.

    Args:
        rule: ``"chow"`` (defer when ``max q < 1 - alpha``; alpha in [0, 1]), ``"diff"`` (``max q < max p -
            alpha``; [-1, 1]), ``"opt"`` (``max q < max p - alpha * TV(q, p)``; alpha >= 0),
            ``"token_v1"`` / ``"token_v2"`` / ``"token_v3"`` (token-specific: keep the drafted token when
            ``q(v) >= max p - alpha`` / ``p(v) >= max p - alpha`` / ``p(v) >= (1 - alpha) max p``; [-1, 1])
            or ``"lossy"`` (lossy speculative decoding: accept with ``min(1, p / ((1 - alpha) q))``;
            [0, 1)).
        alpha: the rule's leniency, one number or one per prompt of the batch (its ``num_return_sequences``
            copies share it). Larger is more lenient
            (faster, further from the target). chow 0, diff -1, token_v1..v3 -1 and lossy 0 are exact
            speculative sampling; chow 1, diff 1 and token_v1..v3 1 accept every drafted token.
    """

    rule: Literal["chow", "diff", "opt", "token_v1", "token_v2", "token_v3", "lossy"]
    alpha: float | tuple[float, ...]

    def __post_init__(self):
        _plain_fields(self)
        if not isinstance(self.rule, str) or self.rule not in _ALPHA_RANGES:
            raise ValueError(f"`rule` must be one of {', '.join(_ALPHA_RANGES)}, got {self.rule!r}")
        if isinstance(self.alpha, (list, tuple)):
            object.__setattr__(self, "alpha", tuple(self.alpha))
            values = self.alpha
            if not values:
                raise ValueError("`alpha` is an empty sequence; give one number, or one per row")
        else:
            values = (self.alpha,)
        low, high, closed = _ALPHA_RANGES[self.rule]
        for value in values:  # numpy's numbers too
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
                raise TypeError(f"`alpha` must be a number or a sequence of numbers, got {self.alpha!r}")
            if not (low <= value <= high if closed else low <= value < high):
                bracket = "]" if closed else ")"
                raise ValueError(
                    f"`alpha` for rule {self.rule!r} must be in [{low:g}, {high:g}{bracket}, got {value!r}"
                )
        floats = tuple(float(value) for value in values)
        object.__setattr__(self, "alpha", floats if isinstance(self.alpha, tuple) else floats[0])

    def alphas(self, batch: int) -> tuple[float, ...]:
        """One alpha per row of a batch of ``batch`` rows (prompts: ``num_return_sequences`` copies of a
        prompt share its alpha)."""
        if not isinstance(self.alpha, tuple):
            return (float(self.alpha),) * batch
        if len(self.alpha) != batch:
            raise ValueError(
                f"`cascade.alpha` has {len(self.alpha)} values for a batch of {batch} prompts; give one number "
                "or one per prompt (the num_return_sequences copies of a prompt share its alpha)"
            )
        return tuple(float(a) for a in self.alpha)


@dataclass(frozen=True)
class DistillConfig:
    """Online hybrid distillation of the drafter into a LoRA adapter while it serves (SPEC §4).

    Every served row leaves its drafter context and, at each target token it emitted, the target's
    logits read into the drafter's vocabulary (taken from verification: no second target pass). Every
    ``interval`` served rows the engine takes one optimiser step on what it kept, then clears it. The loss
    per drafter position is the reverse KL ``KL(q || p)`` over the directly mapped vocabulary where the
    emitted target token has a drafter twin, and ``ngram_weight * -log q(d)`` on each drafter sub-token
    ``d`` of the target tokens that have none (n-gram tokens) and on each drafted split token whose target
    pieces were all emitted (``EngineConfig.split_tokens``). With a shared vocabulary it is pure on-policy
    reverse-KL distillation.

    Args:
        rank: LoRA rank (8..128).
        lora_alpha: LoRA scaling numerator (the update is scaled by ``lora_alpha / rank``); default ``rank``.
        target_modules: the drafter's ``nn.Linear`` modules that get an adapter; ``"all-linear"`` is every
            projection of attention and MLP (peft's name; the LM head is left out).
        interval: served rows between two optimiser steps.
        lr, weight_decay, betas: AdamW, constant learning rate.
        ngram_weight: ``lambda``, the weight of the cross-entropy term (n-gram tokens, split tokens).
        max_grad_norm: gradient clipping (``None``: none).
        adapter_name: the adapter's name on the drafter; by default one is derived from the target, so
            one drafter serving several targets carries one adapter per target and switches between them
            without reloading.
    """

    rank: int = 32
    lora_alpha: float | None = None
    target_modules: str | tuple[str, ...] = "all-linear"
    interval: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    ngram_weight: float = 0.2
    max_grad_norm: float | None = 1.0
    adapter_name: str | None = None

    def __post_init__(self):
        _plain_fields(self)
        if not is_int(self.rank) or not 8 <= self.rank <= 128:
            raise ValueError(f"`rank` must be an int in [8, 128], got {self.rank!r}")
        if self.lora_alpha is not None and not (is_positive(self.lora_alpha)):
            raise ValueError(f"`lora_alpha` must be a number > 0 or None, got {self.lora_alpha!r}")
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if not (
            isinstance(self.target_modules, str)
            or (
                isinstance(self.target_modules, tuple)
                and self.target_modules
                and all(isinstance(m, str) for m in self.target_modules)
            )
        ):
            raise TypeError(
                f"`target_modules` must be a string or a sequence of names, got {self.target_modules!r}"
            )
        _check_interval("interval", self.interval, sys.maxsize, _ROWS_HELD)
        if not is_positive(self.lr):
            raise ValueError(f"`lr` must be a number > 0, got {self.lr!r}")
        if not is_number(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"`weight_decay` must be a number >= 0, got {self.weight_decay!r}")
        if isinstance(self.betas, (list, tuple)):
            object.__setattr__(self, "betas", tuple(self.betas))
        if (
            not isinstance(self.betas, tuple)
            or len(self.betas) != 2
            or not all(is_number(b) and 0 <= b < 1 for b in self.betas)
        ):
            raise ValueError(f"`betas` must be two numbers in [0, 1), got {self.betas!r}")
        if not is_number(self.ngram_weight) or self.ngram_weight < 0:
            raise ValueError(f"`ngram_weight` must be a number >= 0, got {self.ngram_weight!r}")
        if self.max_grad_norm is not None and not is_positive(self.max_grad_norm):
            raise ValueError(f"`max_grad_norm` must be a number > 0 or None, got {self.max_grad_norm!r}")
        if self.adapter_name is not None and (
            not isinstance(self.adapter_name, str) or not self.adapter_name or "." in self.adapter_name
        ):
            raise ValueError(
                f"`adapter_name` must be a non-empty string without '.' (it names modules) or None, got "
                f"{self.adapter_name!r}"
            )


@dataclass(frozen=True)
class AdaptiveConfig:
    """Adaptive draft length from a learned acceptance head (SPEC §5).

    A small MLP on the drafter's last hidden state gives ``a_i``, the probability that drafted token ``i``
    is accepted given that all before it were. A row stops drafting after token ``i`` once
    ``1 - prod_{j<=i} a_j > gamma`` (and ``i >= k_min``); ``num_draft_tokens`` is ``k_max``. The head learns
    online from verification's acceptance probabilities ``min(1, p(y) / q(y))`` (``p(y)`` where
    ``translation="exact"`` verifies by exact match) with a binary cross-entropy weighted ``reject_weight``
    on the reject side. Across vocabularies (ours: the SPEC leaves it open) the head stays per drafter
    token: a target token's acceptance is credited to the first drafter token of its span (an n-gram
    merge's other drafter tokens get 1, so the product over a span is the target token's acceptance), a
    drafted split token gets the product over its verified target pieces, and a drafted token with no
    target token, where the draft stops, gets 0 (verification always rejects it).

    Args:
        gamma: stop once the probability that some drafted token is rejected exceeds it (0.7 suits code
            and maths, 0.3 open text).
        k_min: fewest drafted tokens per round.
        mode: ``"alternating"`` (after each distillation step, the head trains alone on a replay of recent
            rows with labels recomputed under the current drafter) or ``"joint"`` (head and drafter in one
            backward pass on the same rows, with verification's labels; the head's loss also trains the
            drafter's adapter).
        blocks: residual ``x + SiLU(W x)`` blocks before the final linear layer (an engine whose device
            cannot hold them, with their gradients and AdamW moments, refuses them).
        interval: served rows between two training steps of the head (the distiller's when distillation
            is on, so that both learn from the same rows).
        replay: rows kept for the alternating mode's replay (at most ``sys.maxsize``, a deque's limit).
        head_steps: optimiser steps of the head per training step in the alternating mode.
        lr, weight_decay: AdamW for the head.
        reject_weight: ``w``, the weight of the reject side of the cross-entropy.
        prior: the acceptance the untrained head predicts (its output bias), without ``confidence_input``.
        confidence_input: the head also reads the drafter's T=1 probability of the drafted token
            (``a = sigmoid(f(h) + w logit(q(y)))``, ours): untrained it predicts that confidence, so it starts
            where ``EngineConfig(confidence_threshold=...)`` starts and learns from there.
    """

    gamma: float = 0.7
    k_min: int = 1
    mode: Literal["alternating", "joint"] = "alternating"
    blocks: int = 2
    interval: int = 8
    replay: int = 64
    head_steps: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.01
    reject_weight: float = 6.0
    prior: float = 0.8
    confidence_input: bool = False

    def __post_init__(self):
        _plain_fields(self)
        if not is_number(self.gamma) or not 0 < self.gamma < 1:
            raise ValueError(f"`gamma` must be in (0, 1), got {self.gamma!r}")
        if not is_int(self.k_min) or self.k_min < 1:
            raise ValueError(f"`k_min` must be an int >= 1, got {self.k_min!r}")
        if self.mode not in ("alternating", "joint"):
            raise ValueError(f"`mode` must be 'alternating' or 'joint', got {self.mode!r}")
        if not is_int(self.blocks) or self.blocks < 0:
            raise ValueError(f"`blocks` must be an int >= 0, got {self.blocks!r}")
        _check_interval("interval", self.interval, sys.maxsize, _ROWS_HELD)
        _check_interval("replay", self.replay, sys.maxsize, _ROWS_HELD)
        _check_interval("head_steps", self.head_steps)
        if not is_positive(self.lr):
            raise ValueError(f"`lr` must be a number > 0, got {self.lr!r}")
        if not is_number(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"`weight_decay` must be a number >= 0, got {self.weight_decay!r}")
        if not is_positive(self.reject_weight):
            raise ValueError(f"`reject_weight` must be a number > 0, got {self.reject_weight!r}")
        if not is_number(self.prior) or not 0 < self.prior < 1:
            raise ValueError(f"`prior` must be in (0, 1), got {self.prior!r}")
        if not isinstance(self.confidence_input, bool):
            raise TypeError(f"`confidence_input` must be True or False, got {self.confidence_input!r}")


def is_int(value) -> bool:
    """An int that is not a bool (True is no draft length)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A finite int or float (not a bool): what every numeric option must be."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def is_positive(value) -> bool:
    """A finite number > 0."""
    return is_number(value) and value > 0


def check_confidence_threshold(name: str, value) -> None:
    """A drafter-confidence threshold (``EngineConfig.confidence_threshold``): a probability."""
    if not is_number(value) or not 0 <= value <= 1:
        raise ValueError(
            f"`{name}` must be a probability in [0, 1] (0: never stop on confidence), got {value!r}"
        )


def _check_interval(name: str, value, most: int | None = None, why: str = "") -> None:
    """An int >= 1, and <= ``most`` when given (``why``: the reason, shown with the limit)."""
    if not is_int(value) or value < 1:
        raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")
    if most is not None and value > most:
        raise ValueError(f"`{name}` must be at most {most} ({why}), got {value!r}")


# A count of rows the learners keep waiting or replay lives in a Python list or deque, which holds at most
# sys.maxsize items (a deque's maxlen is a C ssize_t): an `interval` past it would never be reached.
_ROWS_HELD = "the most rows a Python list or deque can hold (sys.maxsize)"


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
        ngram_capacity: slots of the n-gram table (rounded up to a power of two); with ``ngram_preseed``
            at least 4 per seed (``NGramTable.seeded``: 512k slots, about 19 MB, for a Qwen target and a
            Mistral drafter). A table larger than the device's memory is refused when the engine is built.
        ngram_max_len: the longest run of drafter tokens merged into one target token (N).
        ngram_preseed: fill the table with the drafter spelling of every target token at start.
        split_tokens: a drafted token with no target twin is proposed as the target tokens that spell its
            bytes (``VocabBridge.d2ts``) and the draft goes on, instead of stopping there (the paper's
            rule; splits are ours). Its first piece takes the token's probability, its later pieces are
            verified as certain, which is exact (``kernels/proposal.py``). Sampled requests split the
            tokens whose first piece has a drafter twin (where that probability can be read); greedy
            requests and ``translation="exact"`` every token; requests with a deferral rule none.
        max_spelling: the most drafter tokens a round spells into the drafter's context for the target
            tokens it did not draft (the recovered/bonus token, after the accepted pieces of a split token
            cut by a rejection); across vocabularies the first draft step of a round re-feeds one token more
            than the smaller of this and the bridge's longest spelling (2 with a shared vocabulary). Of a
            round's spellings that do not fit (rare target tokens such as long runs of one character: GPT-2
            spells the runs of spaces of Llama-3 or Qwen in up to 128 tokens), the drafter's context keeps
            the last ``max_spelling`` tokens, the end of the text; the target's output is unaffected. (A
            merge the n-gram table made keeps its whole drafted run, up to ``ngram_max_len`` tokens,
            whatever this says.)
        cascade: the deferral rule used when a request does not give one (``None``: exact speculative
            sampling). Needs verification against ``q`` (not ``translation="exact"``).
        distill: online distillation of the drafter into a LoRA adapter (``DistillConfig``; ``None``: off).
        adaptive: adaptive draft length from a learned acceptance head (``AdaptiveConfig``; ``None``: no head;
            without a ``confidence_threshold`` either, every round drafts ``num_draft_tokens``).
        confidence_threshold: adaptive draft length from the drafter's confidence, with no head to train: a
            row stops drafting after a token its drafter gave a probability below this (at the request's
            sampling law; at T=1 when greedy); the token is still proposed. transformers'
            ``assistant_confidence_threshold``, which a request may set; 0 (or ``None``) is off.
            Lossless; with ``adaptive`` too, a row stops at the first rule that says so. Like ``adaptive``
            it reads one flag per draft step (the loop ends when every row has stopped), so a round is
            captured as a stage per draft step. ``None``: off.
        time_stages: measure the time of each stage of a round (draft, verify, commit, ...). On CUDA this
            synchronises the device at every stage boundary, which stalls the pipeline, so ``None`` (the
            default) means on for CPU and off for CUDA. Captured stages (``cuda_graphs``) are timed whole.
        in_flight_rounds: with online learning, also take one training step every this many rounds of a
            request, on the labels its rows recorded since the last one (whatever ``interval`` says), so
            that the request's next rounds draft with the update. The step has fixed shapes and no host
            read; with ``cuda_graphs`` it is captured like the rounds, and the merged LoRA weights and the
            head are rewritten in place. The labels left at a request's end go to the learners as usual
            (a row with none left is not handed over: ``interval`` counts rows that still teach). Steps
            taken before a request fails (a caller's processor raising, invalid logits) are kept: they
            learned from rounds verified before the failure, and a non-finite gradient skips its step.
            ``None``: between requests only (SPEC §4).
        rounds_per_sync: rounds run back to back between two host reads of the rows' done flags (the one read
            of the loop; at most a request's ``max_new_tokens``, by which every row is done). ``1``: a read
            after every round, so a request stops as soon as its rows are done. ``n > 1``: n rounds, with the
            in-flight learning steps due among them, run as one stage, so with ``cuda_graphs`` one CUDA graph
            covers drafting, verification and the updates of n rounds without the host; finished rows idle
            through the up to ``n - 1`` rounds past the end (they change nothing and are not counted), the
            n-gram table's eviction is checked once per n rounds, a streamer gets n rounds at a time, and with
            an acceptance head or a confidence threshold the per-step stop read is skipped (rows stop
            proposing as before, but every round runs ``num_draft_tokens`` steps, as prompt lookup's rounds
            are ``num_draft_tokens`` wide; those draw the noise of every step, so such a sampled request
            follows the same law from other draws than with a read per round).
        cuda_graphs: run each round as captured stages (``graphs.py``): on CUDA, CUDA graphs (a stage runs
            eagerly once, is captured on its second run and replayed from then on); on other devices a
            recorder with the same replay semantics, which is slower than eager and serves to check capture
            safety without a GPU. Outputs equal eager mode's. Python inside a captured stage runs only at
            capture: forward hooks on the models do not see replays. The graphs, the request's device state
            and both caches are kept (``kept_graphs``) for later requests of the same shapes and settings
            (batch size, ``prompt_bucket``, ``max_new_tokens``, sampling, EOS ids, draft length, confidence
            threshold, cascade and its per-row alphas, kept logits, logits processing, prompt lookup's
            ``max_matching_ngram_size``, whether the learners are enabled), which replay them from their
            first round; with online learning
            too (the drafter then serves merged LoRA weights rewritten in place, the same tensors at every
            request). ``SpeculativeEngine.release()`` frees what is kept. Captured stages read the models'
            weights where they were at capture: in-place updates (``load_state_dict``) are seen; a request
            after a cast, ``load_state_dict(..., assign=True)``, or a parameter or buffer rebound (or its
            ``.data`` swapped) releases what was kept and captures afresh (every tensor's storage is checked,
            ``CausalLM.weights``; moving the models to another device needs a new engine).
        prompt_bucket: prompts are left-padded inside the engine (the output is as without) to a multiple of
            this many tokens, the drafter's spelled prompt too, so that with ``cuda_graphs`` requests whose
            prompts differ by less share one set of graphs; eager engines pad alike, so that both modes
            compute the same (the attention's width changes float rounding). The padding costs a prefill
            that long at most and is masked everywhere; that prefill's attention mask holds a bucket squared
            entries a row at least, and an engine whose device cannot hold them refuses the bucket. ``1``: no
            padding (graphs are then shared by equal prompt widths only), as for requests with target-side
            logits processing (which counts the prompt's columns) and for models right only within a width
            (chunked or local attention, position-sized buffers, mixed sliding-window and full layers without
            transformers' mask mapping: they serve within that width, which padding could overrun).
        kept_graphs: with ``cuda_graphs``, how many sets of captured stages are kept for later requests, the
            least recently used released first; ``0``: none (every request captures its own). Each set holds
            what one request holds on the device: both models' KV caches (batch x slots x layers x 2 x
            kv_heads x head_dim elements each: about 270 MB for a Llama-3-8B-shaped target at batch 1 and
            2048 slots in bf16, 32x that at batch 32) and its graphs' memory pool; lower it for large
            batches or long contexts.
        lean_forward: run the families ``lean.py`` names (Llama, Mistral, Qwen2, Qwen3, GPT-2; target and
            drafter) through its forward on their own modules, without transformers' per-call Python (the same logits up to
            float rounding); ``False``: transformers' forward for every model.
    """

    num_draft_tokens: int = 4
    translation: Literal["omnidraft", "tli", "exact"] = "omnidraft"
    ngram_capacity: int = 1 << 16
    ngram_max_len: int = 4
    ngram_preseed: bool = True
    split_tokens: bool = True
    max_spelling: int = 16
    cascade: CascadeConfig | None = None
    distill: DistillConfig | None = None
    adaptive: AdaptiveConfig | None = None
    confidence_threshold: float | None = None
    time_stages: bool | None = None
    in_flight_rounds: int | None = None
    rounds_per_sync: int = 1
    cuda_graphs: bool = False
    prompt_bucket: int = 64
    kept_graphs: int = 4
    lean_forward: bool = True

    def __post_init__(self):
        _plain_fields(self)
        if not is_int(self.num_draft_tokens) or self.num_draft_tokens < 1:
            raise ValueError(f"`num_draft_tokens` must be an int >= 1, got {self.num_draft_tokens!r}")
        if self.translation not in ("omnidraft", "tli", "exact"):
            raise ValueError(f"`translation` must be 'omnidraft', 'tli' or 'exact', got {self.translation!r}")
        if not is_int(self.ngram_capacity) or self.ngram_capacity < 1:
            raise ValueError(f"`ngram_capacity` must be an int >= 1, got {self.ngram_capacity!r}")
        if not is_int(self.ngram_max_len) or self.ngram_max_len < 2:
            raise ValueError(f"`ngram_max_len` must be an int >= 2, got {self.ngram_max_len!r}")
        for name in ("ngram_preseed", "split_tokens", "lean_forward"):
            if not isinstance(getattr(self, name), bool):  # 1 == True, but 1 is no switch
                raise TypeError(f"`{name}` must be True or False, got {getattr(self, name)!r}")
        if not is_int(self.max_spelling) or self.max_spelling < 1:
            raise ValueError(f"`max_spelling` must be an int >= 1, got {self.max_spelling!r}")
        if self.cascade is not None and not isinstance(self.cascade, CascadeConfig):
            raise TypeError(f"`cascade` must be a CascadeConfig or None, got {type(self.cascade).__name__}")
        if self.distill is not None and not isinstance(self.distill, DistillConfig):
            raise TypeError(f"`distill` must be a DistillConfig or None, got {type(self.distill).__name__}")
        if self.adaptive is not None and not isinstance(self.adaptive, AdaptiveConfig):
            raise TypeError(
                f"`adaptive` must be an AdaptiveConfig or None, got {type(self.adaptive).__name__}"
            )
        if self.adaptive is not None and self.adaptive.k_min > self.num_draft_tokens:
            raise ValueError(
                f"`adaptive.k_min`={self.adaptive.k_min} exceeds `num_draft_tokens`={self.num_draft_tokens} (k_max)"
            )
        if self.confidence_threshold is not None:
            check_confidence_threshold("confidence_threshold", self.confidence_threshold)
        if self.time_stages is not None and not isinstance(self.time_stages, bool):
            raise TypeError(f"`time_stages` must be True, False or None, got {self.time_stages!r}")
        if self.in_flight_rounds is not None:
            _check_interval("in_flight_rounds", self.in_flight_rounds)
            if self.distill is None and self.adaptive is None:
                raise ValueError(
                    "`in_flight_rounds` hands labels to the online learners: set `distill=` and/or `adaptive=`"
                )
        _check_interval("rounds_per_sync", self.rounds_per_sync)
        if not isinstance(self.cuda_graphs, bool):
            raise TypeError(f"`cuda_graphs` must be True or False, got {self.cuda_graphs!r}")
        _check_interval("prompt_bucket", self.prompt_bucket)
        if not is_int(self.kept_graphs) or self.kept_graphs < 0:
            raise ValueError(f"`kept_graphs` must be an int >= 0, got {self.kept_graphs!r}")


@dataclass(frozen=True)
class SamplingParams:
    """The sampling rule of one request, applied to drafter and target alike.

    ``temperature == 0`` means greedy. ``top_k == 0`` and ``top_p == 1`` switch those filters off.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        _plain_fields(self)
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:  # NaN too
            raise ValueError(
                f"`temperature` must be a number >= 0, got {self.temperature!r}; use do_sample=False for greedy"
            )
        if not is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"`top_k` must be an int >= 0 (0 switches top-k off), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"`top_p` must be in (0, 1] (1 switches top-p off), got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
