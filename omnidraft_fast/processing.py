"""A request's logits-processing settings, checked: transformers' logits processors and the sampling
warpers beyond temperature, top-k and top-p that ``generate()`` takes, and the caller's processors. What
each does to the target's logits, and in which order: ``processors.py``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from typing import Any

import torch

from .config import SamplingParams, is_int, is_number, is_positive

__all__ = ["Processing"]


def _token_ids(value, name: str, vocab: int, empty: bool = False) -> tuple[int, ...]:
    """A list of token ids of the target's vocabulary (one int allowed too), non-empty unless ``empty``."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    values = [value] if is_int(value) else value
    if not isinstance(values, (list, tuple)) or not (values or empty) or not all(is_int(v) for v in values):
        kind = "a list" if empty else "a non-empty list"
        raise ValueError(f"`{name}` must be a token id or {kind} of them, got {value!r}")
    outside = sorted({v for v in values if not 0 <= v < vocab})
    if outside:
        raise ValueError(f"`{name}` holds ids outside the target's vocabulary [0, {vocab}): {outside}")
    return tuple(values)


def _watermark(value):
    """``watermarking_config`` -> a transformers ``WatermarkingConfig`` (a dict is read as one, as
    ``GenerationConfig`` reads it: from transformers 5.25, a dict with ``ngram_len``, a field only SynthID's
    config has, is a ``SynthIDTextWatermarkingConfig``). SynthID's processor keeps state across calls that
    assumes one call per new token, which verifying drafted positions breaks: refused."""
    from transformers.generation import WatermarkingConfig

    synthid = "SynthID watermarking keeps per-step state that speculative decoding cannot replay"
    if isinstance(value, dict):
        if "ngram_len" in value:
            raise ValueError(
                f"`watermarking_config` {value!r} holds `ngram_len`, which makes it a SynthID watermarking "
                f"config (as transformers reads a dict); {synthid}: drop it, or pass a green-list "
                "WatermarkingConfig"
            )
        try:
            value = WatermarkingConfig.from_dict(value)
        except TypeError as error:  # an unknown key: its __init__ names it, not the argument
            raise ValueError(
                f"`watermarking_config` {value!r} is not a WatermarkingConfig's fields ({error}); pass e.g. "
                "WatermarkingConfig(bias=2.0, greenlist_ratio=0.25) or a dict of its fields"
            ) from None
    if not isinstance(value, WatermarkingConfig):
        raise ValueError(
            f"`watermarking_config` must be a transformers WatermarkingConfig (green-list watermarking), got "
            f"{type(value).__name__}; {synthid}"
        )
    value.validate()  # as GenerationConfig.validate() does: its errors name `watermarking_config` and the key
    return value


# The logits processors transformers' generate() makes from a generation config, in its order, by the option
# (the slot in ``processors.py``) that makes each and the transformers class it makes. A caller's processor
# of the same class takes that slot instead, as generate() merges the caller's list into its own ("the custom
# one takes precedence"); the caller's others come after every slot.
_SLOTS = (
    ("sequence_bias", "SequenceBiasLogitsProcessor"),
    ("encoder_repetition_penalty", "EncoderRepetitionPenaltyLogitsProcessor"),
    ("repetition_penalty", "RepetitionPenaltyLogitsProcessor"),
    ("no_repeat_ngram_size", "NoRepeatNGramLogitsProcessor"),
    ("encoder_no_repeat_ngram_size", "EncoderNoRepeatNGramLogitsProcessor"),
    ("bad_words_ids", "NoBadWordsLogitsProcessor"),
    ("min_length", "MinLengthLogitsProcessor"),
    ("min_new_tokens", "MinNewTokensLengthLogitsProcessor"),
    ("prefix_allowed_tokens_fn", "PrefixConstrainedLogitsProcessor"),
    ("forced_bos_token_id", "ForcedBOSTokenLogitsProcessor"),
    ("forced_eos_token_id", "ForcedEOSTokenLogitsProcessor"),
    ("remove_invalid_values", "InfNanRemoveLogitsProcessor"),
    ("exponential_decay_length_penalty", "ExponentialDecayLengthPenalty"),
    ("suppress_tokens", "SuppressTokensLogitsProcessor"),
    ("begin_suppress_tokens", "SuppressTokensAtBeginLogitsProcessor"),
)


def _made_slots(fields: dict[str, Any], out: dict[str, Any], eos_ids: tuple[int, ...], prefix_fn) -> set[str]:
    """The slots whose processor transformers' generate() makes for these resolved options, on its conditions
    (``_get_logits_processor``; a minimum length needs an EOS id, and ``min_new_tokens`` makes ``min_length``
    the prompt's width plus it)."""
    made = {name for name in ("sequence_bias", "bad_words_ids", "forced_bos_token_id", "forced_eos_token_id",
                              "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens")
            if fields.get(name) is not None}  # fmt: skip
    made |= {name for name in ("encoder_repetition_penalty", "repetition_penalty") if out[name] != 1.0}
    made |= {name for name in ("no_repeat_ngram_size", "encoder_no_repeat_ngram_size") if out[name] > 0}
    if eos_ids and ("min_new_tokens" in fields or out["min_length"] > 0):
        made.add("min_length")
    if eos_ids and out["min_new_tokens"] > 0:
        made.add("min_new_tokens")
    if prefix_fn is not None:
        made.add("prefix_allowed_tokens_fn")
    if out.get("remove_invalid_values"):
        made.add("remove_invalid_values")
    return made


def _merged(processors, made: set[str]) -> tuple[tuple, tuple]:
    """The caller's ``processors`` merged as generate() merges them: ((slot, processor), ...) for the first
    of each made slot's class, and the others in order, each object once."""
    from transformers.generation import logits_process

    overrides, used = [], set()
    for slot, name in _SLOTS:
        cls = getattr(logits_process, name, None)
        match = next((proc for proc in processors if slot in made and type(proc) is cls), None)
        if match is not None:
            overrides.append((slot, match))
            used.add(id(match))
    tail = []
    for proc in processors:
        if id(proc) not in used:
            used.add(id(proc))
            tail.append(proc)
    return tuple(overrides), tuple(tail)


def _is_bias(value) -> bool:
    """A number, infinite allowed (``-inf`` bans, as ``bad_words_ids`` does), not NaN."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _sequences(value, name: str, vocab: int) -> tuple[tuple[tuple[int, ...], float], ...]:
    """``sequence_bias`` as transformers takes it (a dict of id tuples to floats, or a list of [[ids], bias]
    pairs) -> ((ids, bias), ...)."""
    pairs = list(value.items()) if isinstance(value, dict) else value
    if not isinstance(pairs, (list, tuple)) or not pairs:
        raise ValueError(
            f"`{name}` must be a non-empty dict of token-id tuples to biases, or a list of [[ids], bias] pairs, "
            f"got {value!r}"
        )
    out = []
    for pair in pairs:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not _is_bias(pair[1]):
            raise ValueError(f"`{name}` entries must be (token ids, bias number) pairs, got {pair!r}")
        if pair[1] == float("inf"):  # a +inf logit is what a broken model gives: the rounds refuse it
            raise ValueError(
                f"`{name}` bias +inf for {pair[0]!r}: give a large finite bias (e.g. 1e4) to force the sequence "
                "(-inf bans it)"
            )
        if is_int(pair[0]):  # transformers refuses it too: a key is a sequence, not a token
            raise ValueError(
                f"`{name}` keys are sequences of token ids: write ({pair[0]},) for the one-token sequence, got "
                f"{pair[0]!r}"
            )
        out.append((_token_ids(pair[0], name, vocab), float(pair[1])))
    return tuple(out)


@dataclass(frozen=True)
class Processing:
    """What a request asks of the target's logits besides temperature, top-k and top-p (``processors.py``).
    The defaults are off; build one from generation fields with :meth:`resolve`."""

    sequence_bias: tuple[tuple[tuple[int, ...], float], ...] = ()
    encoder_repetition_penalty: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    encoder_no_repeat_ngram_size: int = 0
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    min_length: int = 0
    min_new_tokens: int = 0
    forced_bos_token_id: int | None = None
    forced_eos_token_id: tuple[int, ...] = ()
    remove_invalid_values: bool = False
    exponential_decay_length_penalty: tuple[int, float] | None = None
    suppress_tokens: tuple[int, ...] = ()
    begin_suppress_tokens: tuple[int, ...] = ()
    top_h: float = 0.0
    min_p: float = 0.0
    typical_p: float = 1.0
    epsilon_cutoff: float = 0.0
    eta_cutoff: float = 0.0
    renormalize_logits: bool = False
    watermarking_config: Any = None  # a transformers WatermarkingConfig (the green-list scheme)
    # The caller's Python, given to generate() (not generation-config fields), and the request's mode:
    prefix_allowed_tokens_fn: Callable[[int, torch.Tensor], list[int]] | None = None
    logits_processor: tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ...] = ()
    # the caller's processors that take a slot of the processors.py pipeline (``_SLOTS``), by slot name
    overrides: tuple[tuple[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]], ...] = ()
    copies: int = 1  # num_return_sequences: rows per caller's row (prefix_allowed_tokens_fn's batch_id)
    sampled: bool = False  # the request samples (the watermark then follows the sampling warpers)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The generation-config fields resolved here (request.py honours them)."""
        caller = ("prefix_allowed_tokens_fn", "logits_processor", "overrides", "copies", "sampled")
        return tuple(field.name for field in dataclass_fields(cls) if field.name not in caller)

    @classmethod
    def resolve(
        cls,
        fields: dict[str, Any],
        *,
        sampling: SamplingParams,
        eos_ids: tuple[int, ...],
        vocab: int,
        copies: int = 1,
        prefix_allowed_tokens_fn=None,
        logits_processor=None,
    ) -> Processing:
        """Check the merged generation ``fields`` and the caller's processors (request.py); greedy requests
        drop the sampling warpers, as transformers does."""
        out: dict[str, Any] = {"copies": copies, "sampled": not sampling.greedy}
        if prefix_allowed_tokens_fn is not None:
            if not callable(prefix_allowed_tokens_fn):
                raise TypeError(
                    "`prefix_allowed_tokens_fn` must be a function (batch_id, input_ids) -> list of allowed "
                    f"token ids, got {type(prefix_allowed_tokens_fn).__name__}"
                )
            out["prefix_allowed_tokens_fn"] = prefix_allowed_tokens_fn
        if logits_processor is not None:
            if not isinstance(logits_processor, (list, tuple)) or not all(map(callable, logits_processor)):
                raise TypeError(
                    "`logits_processor` must be a list (e.g. a LogitsProcessorList) of logits processors, "
                    f"callables (input_ids, scores) -> scores; got {logits_processor!r}"
                )
            out["logits_processor"] = tuple(logits_processor)  # merged into the slots at the end
        for name in ("repetition_penalty", "encoder_repetition_penalty"):
            penalty = fields.get(name, 1.0)
            if not is_positive(penalty):
                raise ValueError(f"`{name}` must be a number > 0 (1.0: off), got {penalty!r}")
            out[name] = float(penalty)
        for name in ("min_length", "min_new_tokens", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size"):
            value = fields.get(name, 0)
            if not is_int(value) or value < 0:
                raise ValueError(f"`{name}` must be an int >= 0 (0: off), got {value!r}")
            out[name] = value
        if "min_new_tokens" in fields:  # transformers then sets min_length to prompt + min_new_tokens
            out["min_length"] = 0
        if fields.get("sequence_bias") is not None:
            out["sequence_bias"] = _sequences(fields["sequence_bias"], "sequence_bias", vocab)
        if fields.get("bad_words_ids") is not None:
            words = fields["bad_words_ids"]
            if (
                not isinstance(words, (list, tuple))
                or not words
                or not all(isinstance(w, (list, tuple)) for w in words)
            ):
                raise ValueError(
                    f"`bad_words_ids` must be a non-empty list of lists of token ids, got {words!r}"
                )
            words = tuple(_token_ids(word, "bad_words_ids", vocab) for word in words)
            out["bad_words_ids"] = tuple(
                word for word in words if not (len(word) == 1 and word[0] in eos_ids)
            )
        for name in ("forced_eos_token_id", "suppress_tokens", "begin_suppress_tokens"):
            if fields.get(name) is not None:  # nothing to suppress suppresses nothing, as in transformers
                out[name] = _token_ids(fields[name], name, vocab, empty=name != "forced_eos_token_id")
        bos = fields.get("forced_bos_token_id")
        if bos is not None:
            if not is_int(bos):
                raise ValueError(f"`forced_bos_token_id` must be one token id, got {bos!r}")
            out["forced_bos_token_id"] = _token_ids(bos, "forced_bos_token_id", vocab)[0]
        # Forcing only suppressed tokens leaves no token at the forcing step (transformers refuses it too).
        suppressed = set(out.get("suppress_tokens", ()))
        for name in ("forced_bos_token_id", "forced_eos_token_id"):
            forced = out.get(name)
            forced = {forced} if isinstance(forced, int) else set(forced or ())
            if forced and forced <= suppressed:
                raise ValueError(
                    f"every token of `{name}` ({sorted(forced)}) is also in `suppress_tokens`, which leaves no "
                    f"token at the step that forces it: drop the overlap from `{name}` or `suppress_tokens` "
                    "(to hold back an early EOS, use `min_new_tokens`)"
                )
        watermark = fields.get("watermarking_config")
        if watermark is not None:
            out["watermarking_config"] = _watermark(watermark)
        for name in ("remove_invalid_values", "renormalize_logits"):
            value = fields.get(name, False)
            if not isinstance(value, bool):
                raise ValueError(f"`{name}` must be True or False, got {value!r}")
            out[name] = value
        decay = fields.get("exponential_decay_length_penalty")
        if decay is not None:
            if (
                not isinstance(decay, (list, tuple))
                or len(decay) != 2
                or isinstance(decay[0], bool)
                or not isinstance(decay[0], int)
                or decay[0] < 0
                or not is_positive(decay[1])
            ):
                raise ValueError(
                    "`exponential_decay_length_penalty` must be (start_index: int >= 0, decay_factor > 0), "
                    f"got {decay!r}"
                )
            out["exponential_decay_length_penalty"] = (decay[0], float(decay[1]))
        # The sampling warpers: (name, off value, whether the value lies in range, the range in words).
        warpers = (
            ("top_h", 0.0, lambda v: 0 <= v <= 1, "(0, 1] (unset: off)"),
            ("min_p", 0.0, lambda v: 0 <= v <= 1, "[0, 1] (0: off)"),
            ("typical_p", 1.0, lambda v: 0 < v <= 1, "(0, 1] (1: off)"),
            ("epsilon_cutoff", 0.0, lambda v: 0 <= v < 1, "[0, 1) (0: off)"),
            ("eta_cutoff", 0.0, lambda v: 0 <= v < 1, "[0, 1) (0: off)"),
        )
        for name, off, in_range, words in warpers:
            value = fields.get(name, off)
            if not is_number(value) or not in_range(value):
                raise ValueError(f"`{name}` must be in {words}, got {value!r}")
            out[name] = off if sampling.greedy else float(value)
        if fields.get("top_h") == 0 and not sampling.greedy:  # transformers' top-h warper refuses it
            raise ValueError(
                "`top_h` must be in (0, 1] when sampling, got 0; drop it (unset: off) to sample without top-h"
            )
        if "logits_processor" in out:
            made = _made_slots(fields, out, eos_ids, prefix_allowed_tokens_fn)
            out["overrides"], out["logits_processor"] = _merged(out["logits_processor"], made)
        return cls(**out)

    def needed(self, prompt: int) -> bool:
        """Whether a request with a ``prompt``-wide padded prompt processes the target's logits at all (a
        generation-config field set, ``min_length`` past the prompt, the caller's ``prefix_allowed_tokens_fn``
        or ``logits_processor``)."""
        off = Processing()
        return (
            any(
                getattr(self, name) != getattr(off, name)
                for name in self.field_names()
                if name not in ("min_length", "renormalize_logits")
            )
            or self.min_length > prompt
            or self.prefix_allowed_tokens_fn is not None
            or bool(self.logits_processor or self.overrides)
        )

    @property
    def calls_python(self) -> bool:
        """Whether the round calls Python per row and position (which no CUDA graph can hold): the
        caller's processors, or transformers' watermarking."""
        return (
            self.prefix_allowed_tokens_fn is not None
            or bool(self.logits_processor or self.overrides)
            or self.watermarking_config is not None
        )

    @property
    def warps(self) -> bool:
        """Whether the target's logits go through the sampling warpers here (then verified at T=1, unfiltered)."""
        return (
            (self.sampled and self.watermarking_config is not None)  # it comes after every warper
            or self.top_h > 0
            or self.min_p > 0
            or self.typical_p < 1
            or self.epsilon_cutoff > 0
            or self.eta_cutoff > 0
        )

    def draw(self, sampling: SamplingParams) -> SamplingParams:
        """How the rounds sample a law processed here: with the request's temperature and filters, unless
        the processing warped it already (min-p and the like: ``warps``), then as it is (T=1, unfiltered)."""
        return SamplingParams(temperature=1.0) if self.warps else sampling
