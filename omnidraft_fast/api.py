"""``generate()``: the drop-in for ``model.generate()``, including transformers' assisted-generation names."""

from __future__ import annotations

import threading
from typing import Any

import torch

from .bridge import check_tokenizer
from .config import CascadeConfig, EngineConfig
from .engine import GenerateOutput, SpeculativeEngine

__all__ = ["generate"]

# Engines built for a target live on the target (attribute below), so repeated calls reuse an engine and
# what it learned, and the engines go away with the model. One per (drafter, tokenizers, EngineConfig), by
# identity; the least recently used beyond _KEPT_ENGINES go (a fresh tokenizer or drafter object per call
# would otherwise pile them up). Hold a SpeculativeEngine to keep one for good.
_ENGINES_ATTR = "_omnidraft_engines"
_KEPT_ENGINES = 4
_ENGINES_LOCK = threading.Lock()  # calls from several threads find or build one engine per key


class _EngineList(list):
    """The engines attached to a model. Copies and pickles of the model start without them."""

    def __deepcopy__(self, memo):
        return _EngineList()

    def __copy__(self):
        return _EngineList()

    def __reduce__(self):
        return (_EngineList, ())


def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor | None = None,
    generation_config: Any = None,
    logits_processor: Any = None,
    stopping_criteria: Any = None,
    prefix_allowed_tokens_fn: Any = None,
    *,
    drafter: torch.nn.Module | None = None,
    tokenizer: Any = None,
    drafter_tokenizer: Any = None,
    attention_mask: torch.Tensor | None = None,
    num_draft_tokens: int | None = None,
    streamer: Any = None,
    assistant_model: torch.nn.Module | None = None,
    assistant_tokenizer: Any = None,
    engine_config: EngineConfig | None = None,
    cascade: CascadeConfig | None = None,
    **kwargs: Any,
) -> torch.Tensor | GenerateOutput:
    """Speculative decoding of ``model`` with a small ``drafter``, called like ``model.generate()``.

    Greedy output is token-for-token that of ``model.generate(do_sample=False)``; sampled output follows
    the target's distribution exactly (temperature, top-k, top-p), except where asked otherwise: a
    ``cascade`` verifies against its deferral rule, and a drafter with another vocabulary under
    ``translation="omnidraft"`` (the default) is approximately lossless where the n-gram table merged
    (``EngineConfig.translation``). ``kwargs`` are ``GenerationConfig``
    fields, as ``model.generate()`` takes them (``max_new_tokens``, ``do_sample``, ``temperature``,
    ``eos_token_id``, ...; ``None`` overrides too); those left unset resolve as there: the model's
    generation_config, then transformers' defaults (so sampling without ``top_k`` uses top-k 50; pass
    ``top_k=0`` to switch it off).

    ``cascade=CascadeConfig(rule, alpha)`` trades fidelity to the target for speed with a
    speculative-cascade deferral rule (``None``, the default: exact).

    ``assistant_model``, ``assistant_tokenizer`` and ``num_assistant_tokens`` are accepted as the names
    transformers uses for ``drafter``, ``drafter_tokenizer`` and ``num_draft_tokens``.

    Without a drafter, ``prompt_lookup_num_tokens=k`` (and ``max_matching_ngram_size``, default 2) drafts by
    prompt lookup, as in transformers: up to ``k`` tokens copied from where the context's last tokens
    occurred before (``kernels/lookup.py``), verified exactly.

    Example::

        import omnidraft_fast
        ids = omnidraft_fast.generate(target, **tokenizer(["Hello"], return_tensors="pt"),
                                      drafter=small, max_new_tokens=32)
    """
    if engine_config is not None and not isinstance(engine_config, EngineConfig):
        raise TypeError(
            f"`engine_config` must be an omnidraft_fast.EngineConfig or None, got {type(engine_config).__name__}: "
            "pass EngineConfig(...) (e.g. engine_config=omnidraft_fast.EngineConfig(num_draft_tokens=5))"
        )
    drafter = _one_of("drafter", drafter, "assistant_model", assistant_model)
    if drafter is None and not _asks_prompt_lookup(model, generation_config, kwargs):
        raise ValueError(
            "no drafter: pass `drafter=` (or transformers' `assistant_model=`), a small causal LM that proposes "
            "tokens for the target to verify, or `prompt_lookup_num_tokens=k` to draft by prompt lookup (copying "
            "from the prompt, no drafter)"
        )
    check_tokenizer(tokenizer, "tokenizer")
    check_tokenizer(drafter_tokenizer, "drafter_tokenizer")
    check_tokenizer(assistant_tokenizer, "assistant_tokenizer")
    drafter_tokenizer = _one_of(
        "drafter_tokenizer", drafter_tokenizer, "assistant_tokenizer", assistant_tokenizer
    )
    engine = _engine_for(model, drafter, tokenizer, drafter_tokenizer, engine_config)
    return engine.generate(
        input_ids,
        generation_config,
        logits_processor,
        stopping_criteria,
        prefix_allowed_tokens_fn,
        attention_mask=attention_mask,
        num_draft_tokens=num_draft_tokens,
        streamer=streamer,
        cascade=cascade,
        **kwargs,
    )


def _asks_prompt_lookup(model: torch.nn.Module, generation_config: Any, kwargs: dict[str, Any]) -> bool:
    """Whether the call asks for prompt lookup: ``prompt_lookup_num_tokens`` set by the call, else by the
    ``generation_config`` argument, else by the model's, as transformers resolves it."""
    if "prompt_lookup_num_tokens" in kwargs:
        return kwargs["prompt_lookup_num_tokens"] is not None
    for config in (generation_config, getattr(model, "generation_config", None)):
        value = getattr(config, "prompt_lookup_num_tokens", None)
        if value is not None:
            return True
    return False


def _one_of(name: str, value: Any, alias: str, alias_value: Any) -> Any:
    if value is not None and alias_value is not None and value is not alias_value:
        raise ValueError(f"`{name}` and `{alias}` name the same thing; pass one of them")
    return value if value is not None else alias_value


def _engine_for(model, drafter, tokenizer, drafter_tokenizer, config) -> SpeculativeEngine:
    """The model's engine for these arguments, built if it has none. The lock is held only to read and
    change the list, never while an engine is built or released (both wait for the models' requests in
    other threads, ``locks.py``, whose streamers may call this)."""
    config = EngineConfig() if config is None else config
    key = (drafter, tokenizer, drafter_tokenizer, config)
    with _ENGINES_LOCK:
        engine = _kept_engine(model, *key)
    if engine is not None:
        return engine
    built = SpeculativeEngine(
        model, drafter, target_tokenizer=tokenizer, drafter_tokenizer=drafter_tokenizer, config=config
    )
    dropped = []
    with _ENGINES_LOCK:
        engine = _kept_engine(model, *key)  # another thread's, built meanwhile
        if engine is None:
            engine = built
            engines = getattr(model, _ENGINES_ATTR)
            engines.append(engine)
            dropped = engines[: max(0, len(engines) - _KEPT_ENGINES)]
            del engines[: len(dropped)]
    for old in dropped:  # what it keeps goes with it now, or with its request in another thread
        old.release(wait=False)
    return engine


def _kept_engine(model, drafter, tokenizer, drafter_tokenizer, config) -> SpeculativeEngine | None:
    """The model's engine for these arguments, made the most recently used, or None."""
    engines = getattr(model, _ENGINES_ATTR, None)
    if engines is None:
        engines = _EngineList()
        object.__setattr__(model, _ENGINES_ATTR, engines)
    # An engine built before the model's vocabulary changed (resize_token_embeddings), or before the models
    # moved to another device, no longer fits them.
    engines[:] = [engine for engine in engines if not engine.resized_models() and not engine.moved_models()]
    for index, engine in enumerate(engines):
        if (
            (None if engine.drafter is None else engine.drafter.model) is drafter
            and engine.target_tokenizer is tokenizer
            and engine.drafter_tokenizer is drafter_tokenizer
            and engine.config == config
        ):
            engines.append(engines.pop(index))  # the most recently used last
            return engine
    return None
