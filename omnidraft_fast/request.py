"""One request, resolved: generate()'s keyword arguments and a GenerationConfig turned into checked values.

Precedence follows ``model.generate()``: explicit keyword arguments, then the
``generation_config`` argument, then the model's own ``generation_config``, then
transformers' documented defaults (greedy; when sampling, temperature 1,
top-k 50, top-p 1; 20 new tokens when no length is set). Every GenerationConfig field is either
honoured, known to leave the output unchanged, or refused with an error: none is
ignored silently.

The draft settings transformers reads from the *assistant's* ``generation_config``
(``num_assistant_tokens``, ``assistant_confidence_threshold``) are read from the drafter's
too, below the call and the ``generation_config`` argument and above the target's own; unset
everywhere, the engine's ``EngineConfig`` decides (not transformers' defaults of 20 tokens and 0.4).

An engine without a drafter drafts by prompt lookup (``kernels/lookup.py``): ``prompt_lookup_num_tokens`` is its
draft length (else ``num_assistant_tokens``, else the ``EngineConfig``'s) and ``max_matching_ngram_size``
(default 2, as in transformers) the longest suffix it matches. An engine with a drafter refuses both
fields, where transformers would quietly draft by prompt lookup and leave the assistant unused.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from .advice import advise
from .config import CascadeConfig, SamplingParams, check_confidence_threshold, is_int, is_positive, plain
from .kernels.sampling import MIN_TEMPERATURE
from .processing import Processing

__all__ = ["Request", "resolve_request"]

_INT64 = (-(2**63), 2**63 - 1)  # token ids are held as int64 tensors, as in transformers
# Fields transformers takes from the assistant model's generation_config (candidate_generator.py).
_ASSISTANT_FIELDS = ("num_assistant_tokens", "assistant_confidence_threshold")

# transformers' defaults for the fields we honour, used when neither the caller nor the model sets them.
_DEFAULT_NEW_TOKENS = 20  # when no length is set at all
_DEFAULTS: dict[str, Any] = {
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
}
# What transformers makes of these fields set to None: no warper, greedy (unlike unset: top-k 50).
_NONE_MEANS: dict[str, Any] = {"do_sample": False, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
_HONOURED = {
    "max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p",
    "eos_token_id", "pad_token_id", "num_assistant_tokens", "return_dict_in_generate",
    "assistant_confidence_threshold", "output_scores", "output_logits", "max_time", "stop_strings",
    "num_return_sequences", "prompt_lookup_num_tokens", "max_matching_ngram_size", *Processing.field_names(),
}  # fmt: skip
_LOOKUP_FIELDS = ("prompt_lookup_num_tokens", "max_matching_ngram_size")
_DEFAULT_LOOKUP_NGRAM = 2  # transformers' max_matching_ngram_size when unset or 0
# Fields that change how transformers runs, never which tokens come out (or only apply to other models).
_NO_EFFECT = {
    "transformers_version", "_from_model_config", "bos_token_id", "decoder_start_token_id", "use_cache",
    "cache_implementation", "cache_config", "compile_config", "disable_compile", "max_cache_len",
    "is_assistant", "low_memory", "prefill_chunk_size", "num_assistant_tokens_schedule",
    "assistant_lookbehind", "target_lookbehind", "length_penalty",
    "early_stopping",
    # read by group beam search only, which num_beams > 1 asks for (refused): with one beam transformers
    # decodes greedily or samples whatever they hold (advice.py says they are ignored)
    "num_beam_groups", "diversity_penalty",
}  # fmt: skip
# Fields whose value here means "off": allowed at that value, refused otherwise.
_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "num_beams": (1,), "output_attentions": (False,), "use_mtp": (False,),
    "output_hidden_states": (False,),
    "guidance_scale": (1.0,), "penalty_alpha": (0.0,), "token_healing": (False,),
}  # fmt: skip


@dataclass(frozen=True)
class Request:
    """A checked request. ``input_ids`` is on the target's device, ``prompt_lengths`` on the host."""

    input_ids: torch.Tensor  # [batch, prompt] int64, left padded
    prompt_lengths: torch.Tensor  # [batch] int64, tokens per row without padding (host)
    max_new_tokens: int
    sampling: SamplingParams
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    num_draft_tokens: int
    confidence_threshold: float | None  # rows stop drafting below this drafter confidence (None: off)
    streamer: Any
    return_dict_in_generate: bool
    output_scores: bool = False  # return the target's processed scores per new token (needs the dict)
    output_logits: bool = False  # return the target's raw logits per new token (needs the dict)
    # logits processing, extra warpers and the caller's processors (processors.py)
    processing: Processing = field(default_factory=Processing)
    max_time: float | None = None  # seconds after which no further round starts (None: no limit)
    stop_strings: tuple[str, ...] = ()  # a row ends at the first new token completing one (stopping.py)
    stopping_criteria: tuple[Any, ...] = ()  # the caller's: a row ends at the first new token they stop at
    cascade: CascadeConfig | None = None
    alphas: tuple[float, ...] = ()  # one per row when ``cascade`` is set
    lookup_ngram: int | None = None  # prompt lookup's longest matched suffix (None: a drafter drafts)

    @property
    def kept_logits(self) -> tuple[str, ...]:
        """What of the target's logits at every new token is returned: "logits" (raw) and/or "scores"
        (processed); as in transformers, only with ``return_dict_in_generate``."""
        wanted = (("logits", self.output_logits), ("scores", self.output_scores))
        return tuple(name for name, on in wanted if on and self.return_dict_in_generate)


def _generation_fields(config) -> dict[str, Any]:
    if config is None:
        return {}
    if hasattr(config, "to_diff_dict"):
        return {key: value for key, value in _diff_dict(config).items() if value is not None}
    raise TypeError(
        f"`generation_config` must be a transformers.GenerationConfig, got {type(config).__name__}"
    )


def _diff_dict(config) -> dict[str, Any]:
    """``config.to_diff_dict()``: its fields that differ from a default ``GenerationConfig``'s, and its
    transformers version. transformers' own deep-copies every field (``to_dict``) and builds and copies a
    default config at each call, read here for every request from the model's and the drafter's configs:
    the default's fields are taken once, and only the fields that may differ are copied and converted as
    ``to_dict`` does (a field equal to its default is left out either way; ``dtype`` and dicts, which
    ``to_dict`` converts, are always taken through it). A subclass with its own ``to_diff_dict`` or
    ``to_dict`` is asked."""
    from transformers import GenerationConfig

    cls = type(config)
    if cls.to_diff_dict is not GenerationConfig.to_diff_dict or cls.to_dict is not GenerationConfig.to_dict:
        return config.to_diff_dict()
    global _DEFAULT_FIELDS
    if _DEFAULT_FIELDS is None:
        _DEFAULT_FIELDS = GenerationConfig().to_dict()
    candidates = {
        key: value
        for key, value in config.__dict__.items()
        if key not in _DEFAULT_FIELDS
        or key in ("dtype", "transformers_version")
        or isinstance(value, dict)
        or value != _DEFAULT_FIELDS[key]
    }
    # to_dict on those alone: a deep copy, the serialisation-only keys dropped, the version, dtypes as strings
    converted = copy.deepcopy(candidates)
    for key in _NOT_SERIALISED:
        converted.pop(key, None)
    converted["transformers_version"] = _DEFAULT_FIELDS["transformers_version"]
    config.dict_dtype_to_str(converted)
    return {
        key: value
        for key, value in converted.items()
        if key not in _DEFAULT_FIELDS or key == "transformers_version" or value != _DEFAULT_FIELDS[key]
    }


_NOT_SERIALISED = ("_commit_hash", "_original_object_hash", "_mask_length")  # what to_dict leaves out
_DEFAULT_FIELDS: dict[str, Any] | None = None  # GenerationConfig().to_dict(), on first use


def _as_id_tuple(value, name: str) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, torch.Tensor) or type(value).__module__ == "numpy":  # arrays and numpy scalars
        value = value.tolist()
    if is_int(value):
        values = [value]
    elif isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        values = list(value)
    else:
        raise TypeError(f"`{name}` must be an int or a list of ints, got {value!r}")
    if not all(is_int(v) and _INT64[0] <= v <= _INT64[1] for v in values):
        raise TypeError(f"`{name}` must be an int or a list of ints, got {value!r}")
    return tuple(values)


def _check_unused_id(value, name: str) -> None:
    """A token id that changes nothing here (``bos_token_id``, ``decoder_start_token_id``: no prompt is
    made from them) is still refused where ``model.generate()`` refuses it: it makes an int64 tensor of
    every one, which a string or an int beyond int64 fails."""
    if value is None or isinstance(value, torch.Tensor):
        return
    try:
        torch.tensor(value, dtype=torch.int64)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise TypeError(
            f"`{name}` must be a token id (an int within int64) or a list of them, got {value!r}; "
            "model.generate() refuses it too"
        ) from None


def resolve_request(
    *,
    model_generation_config,
    vocab_size: int,
    position_limit: int | None,
    device: torch.device,
    input_ids,
    attention_mask,
    generation_config,
    explicit: dict[str, Any],
    default_draft_tokens: int,
    streamer,
    default_confidence_threshold: float | None = None,
    cascade: CascadeConfig | None = None,
    drafter_generation_config=None,
    logits_processor=None,
    stopping_criteria=None,
    prefix_allowed_tokens_fn=None,
    prompt_lookup: bool = False,
) -> Request:
    """Merge and check everything a request says. ``explicit``: keyword arguments given (None = unset);
    ``logits_processor``, ``stopping_criteria``, ``prefix_allowed_tokens_fn``: the caller's Python, as
    ``generate()`` takes it; ``prompt_lookup``: the engine has no drafter and drafts by prompt lookup."""
    fields = _generation_fields(model_generation_config)
    drafter_fields = _generation_fields(drafter_generation_config)
    fields.update({key: drafter_fields[key] for key in _ASSISTANT_FIELDS if key in drafter_fields})
    given = _generation_fields(generation_config)  # the caller's generation_config
    fields.update(given)
    for key, value in explicit.items():  # an explicit None overrides, as transformers' update() applies it
        if value is not None:
            fields[key] = value
        elif key in _NONE_MEANS:
            fields[key] = _NONE_MEANS[key]
        else:
            fields.pop(key, None)
    fields = {key: plain(value) for key, value in fields.items()}

    for key, value in fields.items():
        if key in _HONOURED or key in _NO_EFFECT:
            continue
        if key in _OFF_VALUES and value in _OFF_VALUES[key]:
            continue
        raise ValueError(
            f"generation option `{key}={value!r}` is not supported by omnidraft_fast; remove it (or set it to its "
            "neutral value) from the call and from the model's/your generation_config."
        )

    ids, prompt_lengths = _check_inputs(input_ids, attention_mask, vocab_size, device)
    pad_token_id = fields.get("pad_token_id")
    eos_ids = _as_id_tuple(fields.get("eos_token_id"), "eos_token_id")
    if pad_token_id is None and eos_ids:
        pad_token_id = eos_ids[0]  # as transformers does
    if (
        isinstance(pad_token_id, torch.Tensor)
        and pad_token_id.numel() == 1
        and not pad_token_id.is_meta
        and not (
            pad_token_id.is_floating_point() or pad_token_id.is_complex() or pad_token_id.dtype == torch.bool
        )
    ):
        pad_token_id = int(pad_token_id.item())  # as eos_token_id, transformers takes a tensor too
    if pad_token_id is not None and not (is_int(pad_token_id) and _INT64[0] <= pad_token_id <= _INT64[1]):
        raise TypeError(f"`pad_token_id` must be an int (a token id, within int64), got {pad_token_id!r}")
    for name in ("bos_token_id", "decoder_start_token_id"):
        _check_unused_id(fields.get(name), name)
    if attention_mask is None and pad_token_id is not None:
        fix = (
            "pass the tokenizer's attention_mask (e.g. **tokenizer(texts, padding=True, padding_side='left', "
            "return_tensors='pt'))"
        )
        if pad_token_id not in eos_ids:
            if bool((ids == pad_token_id).any()):
                # As model.generate(): a pad id that is no EOS id masks every one of its tokens out.
                try:
                    ids, prompt_lengths = _check_inputs(ids, ids != pad_token_id, vocab_size, device)
                except ValueError as error:
                    raise ValueError(
                        f"no `attention_mask` was given, so it is inferred as model.generate() does, "
                        f"`input_ids != pad_token_id` ({pad_token_id}), and that mask is unusable: {error}. "
                        f"{fix}, or attention_mask=torch.ones_like(input_ids) if those are real tokens."
                    ) from None
        else:
            # model.generate() attends to every token then; left padding would be read as prompt.
            leading_pad = ids[:, 0] == pad_token_id
            if leading_pad.any() and not leading_pad.all():
                raise ValueError(
                    f"`input_ids` look left-padded (some rows start with pad_token_id={pad_token_id}) but no "
                    f"`attention_mask` was given; {fix}. If those rows really begin with token {pad_token_id}, "
                    "pass attention_mask=torch.ones_like(input_ids)."
                )

    if stopping_criteria is not None and (
        not isinstance(stopping_criteria, (list, tuple)) or not all(map(callable, stopping_criteria))
    ):
        raise TypeError(
            "`stopping_criteria` must be a list (e.g. a StoppingCriteriaList) of stopping criteria, callables "
            f"(input_ids, scores) -> bool tensor; got {stopping_criteria!r}"
        )
    eos_criterion = _criterion(stopping_criteria, "EosTokenCriteria")
    if (
        eos_criterion is not None
        and eos_ids
        and set(eos_criterion.eos_token_id.flatten().tolist()) != set(eos_ids)
    ):
        # transformers' generate() would stop rows at its ids only, eos_token_id still acting on the logits
        raise ValueError(
            f"an EosTokenCriteria in `stopping_criteria` stops at {eos_criterion.eos_token_id.flatten().tolist()} "
            f"and `eos_token_id` is {list(eos_ids)}: transformers lets the criterion take the place of the one "
            "eos_token_id makes (rows no longer end at eos_token_id); pass one set of EOS ids, as eos_token_id"
        )
    max_new_tokens = fields.get("max_new_tokens")
    length_criterion = _criterion(stopping_criteria, "MaxLengthCriteria")
    if length_criterion is not None:
        # The caller's MaxLengthCriteria takes the place of the one the length options make, as transformers'
        # generate() merges the lists: it decides the length (a new token at least).
        if not is_int(length_criterion.max_length):
            raise ValueError(
                f"a MaxLengthCriteria in `stopping_criteria` must have an int max_length, got "
                f"{length_criterion.max_length!r}"
            )
        max_new_tokens = max(1, length_criterion.max_length - ids.shape[1])
        if fields.get("forced_eos_token_id") is not None:
            raise ValueError(
                "`forced_eos_token_id` forces an EOS at the last token the length options allow, and a "
                "MaxLengthCriteria in `stopping_criteria` sets another length (transformers then forces it "
                "mid-way and goes on): drop one of them"
            )
    elif max_new_tokens is None and "max_length" in fields:
        if not is_int(fields["max_length"]):
            raise ValueError(
                f"`max_length` must be an int (prompt + new tokens), got {fields['max_length']!r}"
            )
        max_new_tokens = fields["max_length"] - ids.shape[1]
        if max_new_tokens <= 0:
            raise ValueError(
                f"`max_length`={fields['max_length']} leaves no room after the {ids.shape[1]}-token prompt; "
                "pass max_new_tokens instead."
            )
    elif max_new_tokens is None:
        # Nothing set a length: transformers generates 20 new tokens, within the position limit.
        max_new_tokens = _DEFAULT_NEW_TOKENS
        if position_limit is not None:
            max_new_tokens = min(max_new_tokens, position_limit - ids.shape[1])
            if max_new_tokens <= 0:
                raise ValueError(
                    f"the {ids.shape[1]}-token prompt leaves no room for a new token within the model's position "
                    f"limit of {position_limit}; shorten the prompt."
                )
    if not is_int(max_new_tokens) or max_new_tokens <= 0:
        raise ValueError(f"`max_new_tokens` must be an int >= 1, got {max_new_tokens!r}")
    longest = int(prompt_lengths.max())
    if position_limit is not None and longest + max_new_tokens > position_limit:
        raise ValueError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = {longest + max_new_tokens} exceeds "
            f"the model's position limit of {position_limit}; lower max_new_tokens or shorten the prompt."
        )

    do_sample = fields.get("do_sample", _DEFAULTS["do_sample"])
    if do_sample:
        temperature = fields.get("temperature", _DEFAULTS["temperature"])
        # transformers refuses temperature <= 0 (and NaN) when sampling; here 0 would mean greedy and NaN
        # would sample garbage, so both are refused rather than silently changing the request.
        if not (is_positive(temperature) or temperature == math.inf):
            raise ValueError(
                f"`temperature` must be a number > 0 when sampling (do_sample=True), got {temperature!r}; "
                "for greedy decoding pass do_sample=False"
            )
        if temperature < MIN_TEMPERATURE:  # transformers' sampling fails there too (NaN probabilities)
            raise ValueError(
                f"`temperature`={temperature!r} is too small to sample with: logits / temperature overflows "
                f"float32 below {MIN_TEMPERATURE:g}; for its limit, greedy decoding, pass do_sample=False"
            )
        sampling = SamplingParams(
            temperature=float(temperature),
            top_k=fields.get("top_k", _DEFAULTS["top_k"]),
            top_p=_number(fields.get("top_p", _DEFAULTS["top_p"]), "top_p"),
        )
    else:
        # Greedy ignores the sampling knobs, as transformers does, but bad values are still an error.
        SamplingParams(
            temperature=_number(fields.get("temperature", 1.0), "temperature"),
            top_k=fields.get("top_k", 0),
            top_p=_number(fields.get("top_p", 1.0), "top_p"),
        )
        sampling = SamplingParams()

    copies = fields.get("num_return_sequences", 1)
    if not is_int(copies) or copies < 1:
        raise ValueError(f"`num_return_sequences` must be an int >= 1, got {copies!r}")
    if copies > 1 and sampling.greedy:
        raise ValueError(
            f"`num_return_sequences`={copies} needs sampling (greedy copies would all be the same, and "
            "transformers refuses them too): pass do_sample=True, or num_return_sequences=1"
        )
    rows = ids.shape[0]  # the caller's rows; each is generated `copies` times, the copies adjacent
    if copies > 1:
        ids, prompt_lengths = ids.repeat_interleave(copies, 0), prompt_lengths.repeat_interleave(copies, 0)

    draft, lookup_ngram = _draft_settings(fields, default_draft_tokens, prompt_lookup)
    # A round emits at most k + 1 tokens: a draft longer than max_new_tokens cannot pay (transformers'
    # assisted generation caps its candidates likewise, at one fewer).
    draft = min(draft, max_new_tokens)

    processing = Processing.resolve(
        fields,
        sampling=sampling,
        eos_ids=eos_ids,
        vocab=vocab_size,
        copies=copies,
        prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
        logits_processor=logits_processor,
    )
    max_time = fields.get("max_time")
    if max_time is not None and not (is_positive(max_time) or max_time == math.inf):
        raise ValueError(f"`max_time` must be a number of seconds > 0, got {max_time!r}")

    stop_strings = fields.get("stop_strings")
    stop_strings = () if stop_strings is None else stop_strings
    if isinstance(stop_strings, str):
        stop_strings = (stop_strings,)
    if not isinstance(stop_strings, (list, tuple)) or not all(isinstance(t, str) and t for t in stop_strings):
        raise ValueError(f"`stop_strings` must be a non-empty string or a list of them, got {stop_strings!r}")
    if stop_strings and _criterion(stopping_criteria, "StopStringCriteria") is not None:
        raise ValueError(
            "a StopStringCriteria in `stopping_criteria` and `stop_strings` both stop at strings, and transformers "
            "lets the criterion take the place of the one stop_strings makes (its strings alone would stop "
            "rows); pass one of them"
        )

    # Rows of a batch that end before the others are padded with pad_token_id: rows ending at an EOS id of
    # the vocabulary, or at a stop (which ends a row only when an EOS id is set, as in transformers).
    ends_early = any(0 <= eos < vocab_size for eos in eos_ids) or bool(
        eos_ids and (stop_strings or stopping_criteria)
    )
    if pad_token_id is not None and not 0 <= pad_token_id < vocab_size and ids.shape[0] > 1 and ends_early:
        source = "" if "pad_token_id" in fields else " (eos_token_id[0], as no pad_token_id is set)"
        raise ValueError(
            f"`pad_token_id`={pad_token_id}{source} lies outside the target's vocabulary [0, {vocab_size}), "
            "and a batch's rows that end before the others are padded with it (model.generate() then feeds it "
            "to the model, which fails); pass a token id of the vocabulary, e.g. the tokenizer's pad_token_id"
        )

    threshold = fields.get("assistant_confidence_threshold", default_confidence_threshold)
    if threshold is not None:
        check_confidence_threshold("assistant_confidence_threshold", threshold)
        if prompt_lookup:
            raise ValueError(
                f"`assistant_confidence_threshold`={threshold!r} stops a drafter's draft at a token it is unsure of, "
                "and prompt lookup has no drafter: drop it (from the call and the generation_config), or pass a "
                "drafter"
            )

    if streamer is not None and not all(callable(getattr(streamer, name, None)) for name in ("put", "end")):
        raise TypeError(
            f"`streamer` must have the methods `put(token_ids)` and `end()` of transformers' streamers, got "
            f"{type(streamer).__name__}: pass e.g. transformers.TextStreamer(tokenizer), or a BaseStreamer subclass"
        )
    if streamer is not None and ids.shape[0] > 1:
        raise ValueError(
            "`streamer` supports one row only (batch size 1, num_return_sequences=1, as in transformers); "
            "stream one prompt at a time."
        )
    if cascade is not None and not isinstance(cascade, CascadeConfig):
        raise TypeError(
            f"`cascade` must be an omnidraft_fast.CascadeConfig(rule, alpha) or None, got {type(cascade).__name__}"
        )

    advise(
        fields,
        {**given, **explicit},
        sampled=not sampling.greedy,
        prompt_width=ids.shape[1],
        max_new_tokens=max_new_tokens,
        rows=rows,
        masked=attention_mask is not None,
        eos_ids=eos_ids,
        pad_token_id=pad_token_id,
        replaced=tuple(
            ("logits_processor", option, type(processor).__name__)
            for option, processor in processing.overrides
        )
        + (() if length_criterion is None else (("stopping_criteria", "max_length", "MaxLengthCriteria"),)),
    )
    return Request(
        input_ids=ids,
        prompt_lengths=prompt_lengths,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        eos_token_ids=eos_ids,
        pad_token_id=pad_token_id,
        num_draft_tokens=draft,
        confidence_threshold=float(threshold) if threshold else None,
        streamer=streamer,
        return_dict_in_generate=bool(fields.get("return_dict_in_generate", False)),
        output_scores=bool(fields.get("output_scores", False)),
        output_logits=bool(fields.get("output_logits", False)),
        processing=processing,
        max_time=None if max_time is None else float(max_time),
        stop_strings=tuple(stop_strings),
        stopping_criteria=tuple(stopping_criteria or ()),
        cascade=cascade,
        alphas=() if cascade is None else tuple(a for a in cascade.alphas(rows) for _ in range(copies)),
        lookup_ngram=lookup_ngram,
    )


def _criterion(stopping_criteria, name: str) -> Any:
    """The first of the caller's ``stopping_criteria`` of transformers' class ``name`` (not a subclass), or None."""
    from transformers.generation import stopping_criteria as criteria

    return next((c for c in stopping_criteria or () if type(c) is getattr(criteria, name)), None)


def _draft_settings(
    fields: dict[str, Any], default_draft_tokens: int, prompt_lookup: bool
) -> tuple[int, int | None]:
    """The draft length k (before the cut to ``max_new_tokens``) and prompt lookup's longest matched suffix
    (None when a drafter drafts), checked."""
    if not prompt_lookup:
        asked = [name for name in _LOOKUP_FIELDS if name in fields]
        if asked:
            raise ValueError(
                f"`{asked[0]}`={fields[asked[0]]!r} asks for prompt lookup, which drafts without a drafter, and this "
                "engine drafts with its drafter: drop it, or call omnidraft_fast.generate(model, ..., "
                "prompt_lookup_num_tokens=k) without a drafter (or use SpeculativeEngine(model, drafter=None))"
            )
    if prompt_lookup and "prompt_lookup_num_tokens" in fields:
        name, draft = "prompt_lookup_num_tokens", fields["prompt_lookup_num_tokens"]
    else:
        name, draft = (
            "num_draft_tokens`/`num_assistant_tokens",
            fields.get("num_assistant_tokens", default_draft_tokens),
        )
    if not is_int(draft) or draft < 1:
        raise ValueError(f"`{name}` (draft length k) must be an int >= 1, got {draft!r}")
    if not prompt_lookup:
        return draft, None
    ngram = fields.get("max_matching_ngram_size", _DEFAULT_LOOKUP_NGRAM)
    if is_int(ngram) and ngram == 0:  # transformers reads `max_matching_ngram_size or 2`
        ngram = _DEFAULT_LOOKUP_NGRAM
    if not is_int(ngram) or ngram < 1:
        raise ValueError(
            f"`max_matching_ngram_size` (the longest context suffix prompt lookup matches) must be an int >= 1 "
            "(0: the default, 2), "
            f"got {ngram!r}"
        )
    return draft, ngram


def _number(value, name: str) -> float:
    """A sampling knob as a float, or an error naming it (``float()``'s own names nothing)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a number, got {value!r}") from None


def _check_inputs(input_ids, attention_mask, vocab_size: int, device: torch.device):
    """Validate ids and mask; returns ids on ``device`` and the per-row prompt lengths (on the host)."""
    if input_ids is None:
        raise ValueError(
            "`input_ids` is required: pass token ids, e.g. **tokenizer(text, return_tensors='pt')"
        )
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(
            f"`input_ids` must be a torch.LongTensor [batch, length], got {type(input_ids).__name__}"
        )
    if input_ids.dtype == torch.bool or input_ids.is_floating_point() or input_ids.is_complex():
        raise TypeError(f"`input_ids` must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.ndim != 2:
        hint = " (use input_ids.unsqueeze(0) for one prompt)" if input_ids.ndim == 1 else ""
        raise ValueError(f"`input_ids` must be 2-D [batch, length], got shape {tuple(input_ids.shape)}{hint}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(
            f"`input_ids` is empty (shape {tuple(input_ids.shape)}); give at least one prompt token"
        )
    for name, tensor in (("input_ids", input_ids), ("attention_mask", attention_mask)):
        if isinstance(tensor, torch.Tensor) and tensor.is_meta:
            raise ValueError(
                f"`{name}` is on the meta device (no data); pass a tensor with values, e.g. on {device}"
            )
    ids_host = input_ids.detach().to("cpu", torch.int64)
    low, high = int(ids_host.min()), int(ids_host.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"`input_ids` holds ids in [{low}, {high}] but the model's vocabulary is [0, {vocab_size}); "
            "were they made by another tokenizer?"
        )
    if attention_mask is None:
        prompt_lengths = torch.full((ids_host.shape[0],), ids_host.shape[1], dtype=torch.int64)
    else:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"`attention_mask` must be a torch.Tensor, got {type(attention_mask).__name__}")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"`attention_mask` has shape {tuple(attention_mask.shape)} but `input_ids` has "
                f"{tuple(input_ids.shape)}; they must match"
            )
        mask = attention_mask.detach().to("cpu")
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError("`attention_mask` must hold only 0 and 1")
        mask = mask.to(torch.int64)
        prompt_lengths = mask.sum(1)
        if (prompt_lengths == 0).any():
            raise ValueError("a row of `attention_mask` is all zeros: every prompt needs at least one token")
        positions = torch.arange(mask.shape[1])
        expected = (positions >= mask.shape[1] - prompt_lengths[:, None]).to(torch.int64)
        if not torch.equal(mask, expected):
            raise ValueError(
                "`attention_mask` must be left-padded (zeros, then ones, per row); right padding or holes are "
                "not supported: tokenize with padding_side='left'"
            )
    return ids_host.to(device), prompt_lengths
