"""SpeculativeEngine: owns a target and a drafter, and runs requests through speculative decoding.

A request: resolve and check the arguments (``request.py``), lay out the device state and prefill
(``rounds.py``), run rounds until every row is done with one small host read between rounds, or between
units of ``EngineConfig(rounds_per_sync=n)`` rounds (are all rows done, did a model produce NaN/inf
logits, is the n-gram table over half full, how long is the longest row), then cut the output
like ``model.generate()`` does. The rounds themselves live in ``rounds.py``; with
``EngineConfig(cuda_graphs=True)`` they run as captured stages (``graphs.py``). Between requests the
online learners (``learner.py``) train the drafter's LoRA adapter and the acceptance head on what the
rounds recorded; with ``EngineConfig(in_flight_rounds=n)`` they also step every n rounds, as one more
stage of fixed shapes (captured too), so that the request's next rounds draft with the update.
"""

from __future__ import annotations

import inspect
import time
import warnings
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .bridge import VocabBridge, check_tokenizer, token_bytes
from .config import CascadeConfig, EngineConfig
from .distill import adapter_names
from .learner import OnlineLearner
from .locks import ModelsBusy, holding, refuse_nested
from .memory import check_fits
from .models import CausalLM
from .ngram import NGramTable
from .request import Request, resolve_request
from .request_state import COUNTERS, RequestState
from .rounds import Rounds
from .state import StateParts, load_state, save_state
from .stats import GenerationStats, StageTimer
from .stopping import Criteria, Stops, StopStrings
from .vocabulary import Vocabulary, added_tokens
from .warpers import sampling_warpers

__all__ = ["GenerateOutput", "SpeculativeEngine"]

# Keyword names of transformers' generate() that mean the same as ours.
_ALIASES = {"num_assistant_tokens": "num_draft_tokens", "inputs": "input_ids"}
# Keywords transformers' generate() takes that this engine does not, and why (None or False: accepted).
_UNSUPPORTED = {
    "inputs_embeds": "the engine drafts and verifies token ids: pass `input_ids`",
    "past_key_values": "each request builds its own caches from the prompt: pass the whole prompt as `input_ids`",
    "cache": "each request builds its own caches from the prompt: pass the whole prompt as `input_ids`",
    "negative_prompt_ids": "classifier-free guidance is not supported",
    "negative_prompt_attention_mask": "classifier-free guidance is not supported",
    "synced_gpus": "the engine runs on one device",
    "custom_generate": "the engine is its own decoding loop",
    "position_ids": "positions follow from `attention_mask` (each row's first real token is position 0, as "
    "model.generate() computes them for left padding): drop `position_ids`",
    "cache_position": "the engine places every token in its own caches: drop `cache_position`",
}

# generate()'s per-call arguments that a SpeculativeEngine takes once, when it is built.
_BUILT_WITH = {
    "drafter": "SpeculativeEngine(target, drafter)",
    "assistant_model": "SpeculativeEngine(target, drafter)",
    "drafter_tokenizer": "SpeculativeEngine(target, drafter, drafter_tokenizer=...)",
    "assistant_tokenizer": "SpeculativeEngine(target, drafter, drafter_tokenizer=...)",
    "target_tokenizer": "SpeculativeEngine(target, drafter, target_tokenizer=...)",
    "engine_config": "SpeculativeEngine(target, drafter, config=EngineConfig(...))",
    "config": "SpeculativeEngine(target, drafter, config=EngineConfig(...))",
}


@dataclass
class GenerateOutput(GenerateDecoderOnlyOutput):
    """What ``generate(..., return_dict_in_generate=True)`` returns: transformers' ``GenerateDecoderOnlyOutput``
    (a ``ModelOutput``: ``out.sequences``, ``out["sequences"]``, ``out[0]``, ``"scores" in out``, ``keys()``,
    ``to_tuple()``; ``attentions``, ``hidden_states`` and ``cache`` stay None) plus ``stats``.

    With output_scores / output_logits, as transformers: one [batch, V_t] fp32 tensor per new token, the
    target's scores (its logits after the request's processors and sampling warpers, processors.py;
    log-softmaxed with renormalize_logits) or raw logits at that token, whichever rule chose it; NaN past
    a row's end."""

    stats: GenerationStats | None = None


class SpeculativeEngine:
    """Speculative decoding of ``target`` with ``drafter``; holds what lives across requests.

    Args:
        target: the model whose output distribution is reproduced (a Hugging Face causal LM).
        drafter: a smaller causal LM that proposes tokens. Same device as ``target``; any dtype. None:
            draft by prompt lookup, copying continuations from each row's own context (``kernels/lookup.py``;
            transformers' ``prompt_lookup_num_tokens``); no tokenizers, learning, cascades or confidence
            threshold then.
        target_tokenizer, drafter_tokenizer: needed only when the vocabularies differ.
        config: see :class:`EngineConfig`.

    Example::

        engine = SpeculativeEngine(target, drafter)
        out = engine.generate(**tokenizer(["def f(x):"], return_tensors="pt"), max_new_tokens=64)
        print(engine.stats.summary())
    """

    def __init__(
        self,
        target: torch.nn.Module,
        drafter: torch.nn.Module | None,
        *,
        target_tokenizer: Any = None,
        drafter_tokenizer: Any = None,
        config: EngineConfig | None = None,
    ):
        config = EngineConfig() if config is None else config
        if not isinstance(config, EngineConfig):
            raise TypeError(f"`config` must be an EngineConfig, got {type(config).__name__}")
        if drafter is None:
            _check_lookup_config(config, drafter_tokenizer)
        self.target = CausalLM(target, "model", lean=config.lean_forward)
        self.drafter = None if drafter is None else CausalLM(drafter, "drafter", lean=config.lean_forward)
        if self.drafter is not None and self.target.device != self.drafter.device:
            raise ValueError(
                f"the target is on {self.target.device} and the drafter on {self.drafter.device}; put both on one "
                "device (e.g. drafter.to(target.device)); their dtypes may differ"
            )
        if all(model.width_limit is None for model in self._models):  # prompts are padded
            # A padded prompt is at least a bucket wide, and so is the cache its prefill attends over
            bucket = config.prompt_bucket
            check_fits(
                f"`prompt_bucket`={bucket}",
                self.target.mask_bytes(bucket, bucket),
                "the target's prefill attention mask (prompts are padded to a multiple of the bucket: at least "
                f"{bucket:,} x {bucket:,} entries a row)",
                (self.device,),
            )
        self.config = config
        self.built_on = self.device  # the bridge, the table, the learners and kept graphs live there
        check_tokenizer(target_tokenizer, "target_tokenizer")
        check_tokenizer(drafter_tokenizer, "drafter_tokenizer")
        self.bridge = self._bridge(target_tokenizer, drafter_tokenizer)
        self._check_cascade(config.cascade)  # the engine's default, refused when built
        self.ngram: NGramTable | None = None
        if self.bridge is not None and config.translation != "tli":
            if config.ngram_preseed:
                self.ngram = NGramTable.seeded(config.ngram_capacity, config.ngram_max_len, self.bridge.t2ds,
                                               self.bridge.t2ds_len, device=self.device)  # fmt: skip
            else:
                self.ngram = NGramTable(config.ngram_capacity, config.ngram_max_len, device=self.device)
        self.target_tokenizer = target_tokenizer
        # tokenizer -> (what its tokens' bytes were read from, the bytes), for stop strings; an entry goes with
        # its tokenizer (one loaded per request would otherwise be kept, with its table, for good)
        self._token_bytes: weakref.WeakKeyDictionary[Any, tuple[tuple, list[bytes | None]]] = (
            weakref.WeakKeyDictionary()
        )
        self.drafter_tokenizer = drafter_tokenizer
        self.learner: OnlineLearner | None = None
        if config.distill is not None or config.adaptive is not None:
            # peft puts its layers in the drafter for a moment; their initial weights are drawn from torch's
            # RNG without moving the caller's (a seeded first request samples as a seeded second one does)
            devices = [self.device] if self.device.type == "cuda" else []
            with self._holding("SpeculativeEngine()"), torch.random.fork_rng(devices=devices):
                self.learner = OnlineLearner(
                    self.drafter,
                    self.bridge,
                    self.target.vocab_size,
                    config.distill,
                    config.adaptive,
                    adapter_name=_adapter_name(target, drafter),
                    # captured stages read the served weights where they were at capture
                    merge_always=config.in_flight_rounds is not None or config.cuda_graphs,
                    frozen=list(target.parameters()),
                    translation=config.translation,
                    split_tokens=config.split_tokens,
                )
        self.rounds = Rounds(self.target, self.drafter, self.bridge, self.ngram, self.learner, config)
        self.stats = GenerationStats()
        self.last_stats = GenerationStats()

    @property
    def device(self) -> torch.device:
        return self.target.device

    def save_state(self, path: str | Path) -> None:
        """Save what the engine learned (n-gram table with its bridge, LoRA adapter, acceptance head) to
        one safetensors file."""
        with self._holding("save_state()"):
            save_state(self, path)

    def load_state(self, path: str | Path, strict: bool = True) -> StateParts:
        """Restore a state saved by an engine for the same tokenizer pair and configuration; with
        ``strict=False``, the parts the file and this engine have in common (``state.py``)."""
        with self._holding("load_state()"):
            return load_state(self, path, strict)

    def _holding(self, what: str, wait: bool = True):
        """This engine's models to itself for the duration (``locks.py``): requests in other threads wait."""
        return holding(tuple(model.model for model in self._models), what, wait)

    @property
    def _models(self) -> tuple[CausalLM, ...]:
        """The target, then the drafter if there is one."""
        return (self.target,) if self.drafter is None else (self.target, self.drafter)

    def resized_models(self) -> list[CausalLM]:
        """The models whose vocabulary changed since this engine was built (``resize_token_embeddings``)."""
        return [model for model in self._models if model.current_vocab_size() != model.vocab_size]

    def moved_models(self) -> list[CausalLM]:
        """The models moved to another device since this engine was built (``model.to(...)``)."""
        return [model for model in self._models if model.device != self.built_on]

    def release(self, wait: bool = True) -> None:
        """Free what ``EngineConfig(cuda_graphs=True)`` keeps of earlier requests for later ones (their
        device states, both models' caches, the captured graphs and their memory). A request after the models'
        tensors were cast, reloaded with ``assign=True`` or rebound does so itself (moving the models to
        another device needs a new engine); the next request captures afresh. ``wait=False``: release now if
        no request in another thread holds the models, else leave it (what the engine keeps then goes with
        it, or with the next ``release()``)."""
        try:
            with self._holding("release()", wait):
                self.rounds.release()
        except ModelsBusy:
            if wait:
                raise

    def _check_cascade(self, cascade: CascadeConfig | None) -> None:
        """Refuse a cascade this engine cannot verify."""
        if cascade is not None and self.drafter is None:
            raise ValueError(
                "`cascade` decides between the drafter's and the target's distributions, and prompt lookup has no "
                "drafter: drop `cascade` (prompt lookup is verified exactly), or pass a drafter"
            )
        if cascade is not None and self.bridge is not None and self.config.translation == "exact":
            raise ValueError(
                "`cascade` needs verification against the drafter's probabilities, and translation='exact' "
                "verifies by exact match; use EngineConfig(translation='omnidraft' or 'tli') with cascades"
            )

    def _bridge(self, target_tokenizer: Any, drafter_tokenizer: Any) -> VocabBridge | None:
        """The vocabulary bridge, or None when drafter and target share one vocabulary (or there is no
        drafter)."""
        if self.drafter is None:
            return None
        both = target_tokenizer is not None and drafter_tokenizer is not None
        padded_alike = self.target.vocab_size == self.drafter.vocab_size
        vocabularies = None  # (target's, drafter's): each read once, and passed where it is needed
        if both and target_tokenizer is drafter_tokenizer:
            both = not padded_alike  # one vocabulary: no bridge unless padded differently
        elif both:
            vocabularies = Vocabulary.read(target_tokenizer), Vocabulary.read(drafter_tokenizer)
            if vocabularies[0].ids == vocabularies[1].ids:
                both = not padded_alike  # same tokens, padded differently
        if not both:
            if not padded_alike:
                raise ValueError(
                    f"the target's vocabulary has {self.target.vocab_size} ids and the drafter's "
                    f"{self.drafter.vocab_size}: cross-vocabulary drafting needs both tokenizers "
                    "(`target_tokenizer=` for the target and `drafter_tokenizer=` for the drafter; generate()'s "
                    "`tokenizer=` and `drafter_tokenizer=`/`assistant_tokenizer=`)"
                )
            return None
        target_vocabulary, drafter_vocabulary = vocabularies or (Vocabulary.read(target_tokenizer),) * 2
        _check_tokenizer_fits(
            target_vocabulary.highest,
            drafter_vocabulary.highest,
            self.target.vocab_size,
            self.drafter.vocab_size,
        )
        bridge = VocabBridge.from_vocabularies(
            drafter_vocabulary,
            target_vocabulary,
            drafter_vocab_size=self.drafter.vocab_size,
            target_vocab_size=self.target.vocab_size,
        )
        if bridge.num_direct <= len(bridge.target_eos):
            raise ValueError(
                "no drafter token stands for the same bytes as a target token (empty intersection): check that "
                "`target_tokenizer` and `drafter_tokenizer` (generate()'s `tokenizer` and "
                "`drafter_tokenizer`/`assistant_tokenizer`) are the tokenizers of these models"
            )
        return bridge.to(self.device)

    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        generation_config: Any = None,
        logits_processor: Any = None,
        stopping_criteria: Any = None,
        prefix_allowed_tokens_fn: Any = None,
        *,
        attention_mask: torch.Tensor | None = None,
        num_draft_tokens: int | None = None,
        streamer: Any = None,
        cascade: CascadeConfig | None = None,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor | GenerateOutput:
        """Generate like ``target.generate()``: ``kwargs`` are ``GenerationConfig`` fields (``max_new_tokens``,
        ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``eos_token_id``, ``pad_token_id``,
        ``return_dict_in_generate``, ``stop_strings``, the logits processors' options, ...). As there, they
        override ``generation_config`` and the model's own, ``None`` included (``eos_token_id=None``: no
        EOS); unset ones resolve as there (see ``request.py``).

        ``cascade`` (default: the engine config's) verifies against a speculative-cascade deferral rule
        instead of the target exactly (``CascadeConfig``). ``tokenizer`` (default: the engine's target
        tokenizer) is the target's, which ``stop_strings`` need, as in transformers. ``logits_processor``,
        ``prefix_allowed_tokens_fn`` and ``stopping_criteria`` are called one row at a time
        (``processors.py``, ``stopping.py``); the first two run inside the round, so not with
        ``cuda_graphs``. The arguments before ``attention_mask`` may be passed by position, in
        ``model.generate()``'s order.

        Returns ``[batch, prompt + new]`` token ids, padded with ``pad_token_id`` (0 without one) after a
        row's end, or a :class:`GenerateOutput` when ``return_dict_in_generate=True``.
        """
        refuse_nested((model.model for model in self._models), "generate()")  # before any work (locks.py)
        if resized := self.resized_models():
            model = resized[0]
            raise ValueError(
                f"the {model.name}'s vocabulary changed from {model.vocab_size} to {model.current_vocab_size()} ids "
                "since this engine was built (resize_token_embeddings?): build a new SpeculativeEngine "
                "(omnidraft_fast.generate() does so itself)"
            )
        if moved := self.moved_models():
            model = moved[0]
            raise ValueError(
                f"the {model.name} moved from {self.built_on} to {model.device} since this engine was built, and the "
                "engine's vocabulary bridge, n-gram table, learners and kept graphs did not: build a new "
                "SpeculativeEngine after moving the models (omnidraft_fast.generate() does so itself), and "
                "save_state/load_state to take what it learned along"
            )
        device = self.built_on  # every model's now (moved_models): read once, not a parameter walk per use
        # the GenerationConfig fields passed, None included (it overrides, as in transformers)
        explicit = {} if num_draft_tokens is None else {"num_assistant_tokens": num_draft_tokens}
        for name, value in kwargs.items():
            ours = _ALIASES.get(name)
            if ours == "input_ids":
                if input_ids is not None and value is not None:
                    raise TypeError("pass the prompt once: as `input_ids` or as `inputs`, not both")
                input_ids = value if value is not None else input_ids
            elif ours == "num_draft_tokens":
                if num_draft_tokens is not None and value is not None and value != num_draft_tokens:
                    raise ValueError(f"`num_draft_tokens`={num_draft_tokens} and `{name}`={value} disagree")
                if value is not None:
                    explicit["num_assistant_tokens"] = value
            elif name == "token_type_ids":
                if (
                    value is not None
                    and "token_type_ids" in inspect.signature(self.target.model.forward).parameters
                ):
                    raise ValueError(
                        f"`token_type_ids` are not fed to the model by omnidraft_fast, and "
                        f"{type(self.target.model).__name__} embeds them even when they are all zero, so its output "
                        "would differ from model.generate()'s with them; drop them (e.g. "
                        "tokenizer(..., return_token_type_ids=False)) to generate as without them"
                    )
                if value is not None and bool((torch.as_tensor(value) != 0).any()):
                    raise ValueError("non-zero `token_type_ids` are not supported by causal LM generation")
            elif name in _generation_config_fields():
                explicit[name] = value
            elif name in _UNSUPPORTED and value is not None and value is not False:
                raise TypeError(f"`{name}` is not supported by omnidraft_fast: {_UNSUPPORTED[name]}")
            elif name in _BUILT_WITH:
                raise TypeError(
                    f"SpeculativeEngine.generate() got `{name}`, which an engine takes when it is built: "
                    f"{_BUILT_WITH[name]} (omnidraft_fast.generate() takes it per call)"
                )
            elif name not in _UNSUPPORTED:
                raise TypeError(
                    f"generate() got an unexpected keyword argument `{name}`: it is no argument of generate() and "
                    "no transformers GenerationConfig field; check its spelling, or drop it"
                )

        request = resolve_request(
            model_generation_config=getattr(self.target.model, "generation_config", None),
            drafter_generation_config=None
            if self.drafter is None
            else getattr(self.drafter.model, "generation_config", None),
            vocab_size=self.target.vocab_size,
            position_limit=self.target.position_limit,
            device=device,
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=generation_config,
            explicit=explicit,
            default_draft_tokens=self.config.num_draft_tokens,
            streamer=streamer,
            default_confidence_threshold=self.config.confidence_threshold,
            cascade=cascade if cascade is not None else self.config.cascade,
            logits_processor=logits_processor,
            stopping_criteria=stopping_criteria,
            prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
            prompt_lookup=self.drafter is None,
        )
        self.target.check_rope_switch(int(request.prompt_lengths.max()), request.max_new_tokens)
        if request.processing.calls_python and self.config.cuda_graphs:
            raise ValueError(
                "`logits_processor`, `prefix_allowed_tokens_fn` and `watermarking_config` run Python at every "
                "drafted position, which a captured round cannot: use an engine with "
                "EngineConfig(cuda_graphs=False) for such requests"
            )
        self._check_cascade(request.cascade)
        check_tokenizer(tokenizer, "tokenizer")
        stops = self._stops(request, tokenizer or self.target_tokenizer)
        self.rounds.check_widths(request)
        # From torch's global RNG when sampling (torch.manual_seed reproduces runs), drawn before waiting for
        # other threads' requests on these models (whose callers may seed it meanwhile); a greedy request
        # leaves that RNG untouched, as transformers' greedy generate() does.
        seed = 0 if request.sampling.greedy else int(torch.randint(2**62, (1,)))
        # Triton launches and graph captures go to the current CUDA device: make it the engine's.
        with (
            self._holding("generate()"),
            torch.cuda.device(device) if device.type == "cuda" else nullcontext(),
        ):
            try:
                sequences, stats, logits = self._run(request, stops, seed)
            except torch.cuda.OutOfMemoryError:
                self.rounds.release()  # what the kept graphs hold is the caller's to retry with
                raise
            self.last_stats = stats
            self.stats.add(stats)
        if request.return_dict_in_generate:
            return GenerateOutput(sequences=sequences, stats=stats, **self._scores(request, logits))
        return sequences

    # ---------------------------------------------------------------------------------------------
    def _stops(self, request: Request, tokenizer: Any) -> Stops | None:
        """The request's host-side stop conditions (None without stop strings or stopping criteria)."""
        checks = []
        if request.stop_strings:
            checks.append(self._stop_strings(request, tokenizer))
        if request.stopping_criteria:
            rows = request.input_ids.cpu().tolist()
            checks.append(Criteria(request.stopping_criteria, rows, request.input_ids.device))
        return Stops(checks) if checks else None

    def _stop_strings(self, request: Request, tokenizer: Any) -> StopStrings:
        """The request's stop-string state; the tokenizer's token bytes are computed once per tokenizer, and
        again after tokens were added to it (``_tokens_read``)."""
        if tokenizer is None:
            raise ValueError(
                "`stop_strings` need the target's tokenizer to read tokens as text: pass tokenizer=... (as with "
                "transformers' generate), or build the engine with target_tokenizer=..."
            )
        read = _tokens_read(tokenizer)
        kept = self._token_bytes.get(tokenizer)
        if kept is not None and kept[0] == read:
            pieces = kept[1]
        else:
            table = token_bytes(tokenizer, self.target.vocab_size)
            pieces = list(table.pieces)
            for index, content in table.special.items():  # read as their text, as transformers' stop strings
                if index < len(pieces):
                    pieces[index] = content.encode()
            self._token_bytes[tokenizer] = (read, pieces)
        prompts = [
            row[row.shape[0] - int(length) :].tolist()
            for row, length in zip(request.input_ids.cpu(), request.prompt_lengths, strict=True)
        ]
        return StopStrings(request.stop_strings, pieces, prompts)

    def _run(
        self, request: Request, stops: Stops | None, seed: int
    ) -> tuple[torch.Tensor, GenerationStats, dict[str, torch.Tensor]]:
        """Sequences, stats and what the request keeps of the target's logits ([batch, new, V_t] each);
        ``seed`` seeds the request's generator."""
        device = request.input_ids.device  # the engine's (resolve_request put the prompt there)
        time_stages = self.config.time_stages
        timer = StageTimer(device.type != "cuda" if time_stages is None else time_stages, device)
        began = time.perf_counter()
        state = self.rounds.begin(request, seed)
        batch, prompt = request.input_ids.shape
        serving = self.learner.serving() if self.learner is not None else nullcontext()
        failed = True
        try:
            if request.streamer is not None:
                request.streamer.put(request.input_ids.cpu())
            with serving, torch.no_grad():
                timed_out = self._decode(state, request, timer, stops)
            failed = False
        finally:
            self.rounds.end(state, failed)
            if request.streamer is not None:
                _end_stream(request.streamer, failed)

        if state.recorder is not None:
            self._learn(state, request, timer)  # the labels not handed over yet, between requests

        if stops is not None and request.eos_token_ids:  # rows that ended at a stop end there
            for row, count in stops.cuts.items():
                state.generated[row] = count
        elif stops is not None and len(stops.cuts) == batch:  # no EOS: every row ends with the last to stop
            state.generated.clamp_(max=max(stops.cuts.values()))
        if timed_out:  # as transformers stops every row at once: rows still going end at the shortest of them
            going = ~state.done
            state.generated.clamp_(max=int(state.generated[going].min()))
        generated = state.generated.cpu()
        longest = int(generated.max())
        sequences = state.tokens[:, 1 + state.pad : 1 + state.pad + prompt + longest].clone()
        # Past a row's end (EOS, a stop string, max_time): pad_token_id, or 0 when there is none.
        columns = torch.arange(longest, device=device)
        tail = sequences[:, prompt:]
        tail.masked_fill_(columns >= state.generated[:, None], request.pad_token_id or 0)
        # the counters and the n-gram table's size in one read
        read = (
            state.counters if self.ngram is None else torch.cat([state.counters, self.ngram.size()[None]])
        ).tolist()
        counters = dict(zip(COUNTERS, read[: len(COUNTERS)], strict=True))
        del counters["invalid"]  # rows with bad logits: an error at the host read, not a statistic
        stats = GenerationStats(
            requests=1,
            **counters,
            ngram_table_size=read[-1] if self.ngram is not None else 0,
            new_tokens=int(generated.sum()),
            target_calls=batch + counters["row_rounds"],
            seconds=time.perf_counter() - began,
            stage_seconds=timer.seconds,
        )
        return sequences, stats, state.kept_logits.result(longest, state.generated)

    def _decode(
        self,
        state: RequestState,
        request: Request,
        timer: StageTimer,
        stops: Stops | None = None,
    ) -> bool:
        """Prefill both models, then run rounds until every row is done (or ``max_time`` has passed, as
        transformers' MaxTimeCriteria, checked at each host read; then returns True): ``rounds_per_sync``
        rounds (and the in-flight learning steps due among them) between two host reads."""
        began = time.perf_counter()
        self.rounds.prefill(state, request, timer)
        per_sync = self.rounds.rounds_per_sync(request)
        every = self.config.in_flight_rounds if state.recorder is not None else None
        rounds = 0
        # The n-gram table's size is read only while it may be past half full: between two reads it grows by
        # at most a slot per token the rounds emit (batch x (k + 1) a round), so from a size read, the reads
        # until that bound passes half the capacity leave it out (the table's scan costs as much as a round's
        # bookkeeping). It evicts at the same reads as with a size read at each.
        table_bound = None  # an upper bound on the table's size at the next read (None: read it)
        growth = state.tokens.shape[0] * (request.num_draft_tokens + 1) * per_sync
        while True:
            before = state.lengths.clone() if request.streamer is not None or stops is not None else None
            due = tuple(j for j in range(per_sync) if every is not None and (rounds + j + 1) % every == 0)
            if per_sync == 1:
                self.rounds.run(state, request, timer)
                if due:  # the next round drafts with the update
                    self._learn_in_flight(state, request, timer)
            else:
                learn = self._in_flight_step(state, request) if due else None
                self.rounds.run_unit(state, request, timer, per_sync, learn, due)
            rounds += per_sync
            with timer("host"):
                half = None if self.ngram is None else self.ngram.capacity // 2
                sized = half is not None and (table_bound is None or table_bound > half)
                # the round's flags (RequestState.flags), and the table's size while it may be past half full
                flags = torch.cat([state.flags, self.ngram.size()[None]]) if sized else state.flags
                all_done, invalid, most, *table_size = flags.tolist()  # the one read per round (per sync)
                state.kept_logits.flush(state.generated, most)
            if sized:
                table_bound = table_size = table_size[0]
                if table_size > half:
                    self.ngram.evict()
                    table_bound = None
            if table_bound is not None:
                table_bound += growth
            if invalid:
                processed = (
                    ", or the request's logits processing left a position no token (e.g. every token "
                    "suppressed or banned)"
                    if state.processors is not None
                    else ""
                )
                models = "the model" if self.drafter is None else "the model or the drafter"
                raise ValueError(
                    f"{models} produced NaN or +inf logits (or a row of all -inf): check its weights and dtype "
                    f"(fp16 overflow is a common cause){processed}; nothing was returned"
                )
            if stops is not None:
                all_done = self._stop(stops, state, request, before) or all_done
            if request.streamer is not None:
                self._stream(request.streamer, state, before, stops)
            if all_done:
                return False
            if request.max_time is not None and time.perf_counter() - began > request.max_time:
                return True

    def _learn_in_flight(self, state: RequestState, request: Request, timer: StageTimer) -> None:
        """The in-flight learning step as a stage of its own (captured with ``cuda_graphs``, like the
        rounds), timed into the learners' stats."""
        began = time.perf_counter()
        state.graphs.run("learn", self._in_flight_step(state, request), timer, "update")
        self.learner.seconds += time.perf_counter() - began

    def _in_flight_step(self, state: RequestState, request: Request) -> Callable[[StageTimer], None]:
        """The learners' step on the labels of the last ``in_flight_rounds`` rounds: fixed shapes, no host
        read (a stage, or part of one with ``rounds_per_sync``)."""
        width = self.config.in_flight_rounds * self.rounds.slots_per_round(request.num_draft_tokens)

        def learn(timer: StageTimer) -> None:
            with timer("update"):
                window = state.recorder.window(
                    state.d_tokens,
                    state.d_start,
                    state.d_lengths,
                    width,
                    self.drafter.cache.max_slots,
                    request.sampling,
                    # After a round past the end (rounds_per_sync), no step: the labels of the last rounds
                    # go to the learners with the request's rows, as with a read after every round.
                    take=state.ran,
                )
                self.learner.step_in_flight(window)

        return learn

    def _learn(self, state: RequestState, request: Request, timer: StageTimer) -> None:
        """Hand the rows' new labels to the online learners, which step when ``interval`` rows are in."""
        with timer("update"):
            self.learner.observe(
                state.recorder.examples(
                    state.d_tokens,
                    state.d_start,
                    state.d_lengths,
                    request.sampling,
                )
            )

    @staticmethod
    def _scores(request: Request, kept: dict[str, torch.Tensor]) -> dict[str, Any]:
        """``logits`` and ``scores`` as transformers returns them, from the target's logits kept by the rounds."""
        out = {name: tuple(values.unbind(1)) for name, values in kept.items()}
        if "scores" in kept:
            out["scores"] = tuple(_final_scores(request, kept["scores"]).unbind(1))
        return out

    @staticmethod
    def _stop(stops: Stops, state: RequestState, request: Request, before: torch.Tensor) -> bool:
        """Note where a stop condition ends a row with a token of this round (``stops.cuts``: its new
        tokens through that one; the output is cut after the request, so that what the rounds recorded
        stays whole) and mark it done; returns whether every row is done now (a host read of the round's
        new tokens).

        As transformers, which pads a stopped row only when an EOS id is set: without one, a stopped row
        goes on generating until every row has stopped, and then all of them end at the longest cut (rows
        short of it go on to it); a row reaching ``max_new_tokens`` first ends them all there."""
        pads = bool(request.eos_token_ids)
        begin, end, generated, done = torch.stack(  # one read of the rows' positions
            [before, state.lengths, state.generated, state.done.long()]
        ).tolist()
        low, high = min(begin), max(end)
        tokens = state.tokens[:, low:high].tolist()  # every row's new tokens in one copy
        for row, (first, last) in enumerate(zip(begin, end, strict=True)):
            if last == first or row in stops.cuts:
                continue
            scores = None
            if stops.reads_scores and "scores" in state.kept_logits.out:  # as output_scores returns them
                count = last - first
                kept = state.kept_logits.out["scores"][row, generated[row] - count : generated[row]]
                scores = _final_scores(request, kept[None])[0]
            keep = stops.first_stop(row, tokens[row][first - low : last - low], scores)
            if keep is not None:
                stops.cuts[row] = generated[row] - (last - first - keep)
                if pads:
                    state.done[row] = True
                    done[row] = True
        if not pads and len(stops.cuts) == len(done):
            last_cut = max(stops.cuts.values())
            for row, count in enumerate(generated):
                if count >= last_cut and not done[row]:
                    state.done[row] = True
                    done[row] = True
        return all(done)

    @staticmethod
    def _stream(streamer: Any, state: RequestState, before: torch.Tensor, stops: Stops | None) -> None:
        begin, end = int(before[0]), int(state.lengths[0])
        if stops is not None and 0 in stops.cuts:  # the row ended at a stop string: stream through it
            end = min(end, end - int(state.generated[0]) + stops.cuts[0])
        if end > begin:
            streamer.put(state.tokens[0, begin:end].cpu())


def _end_stream(streamer: Any, failed: bool) -> None:
    """``streamer.end()``, also after a request that ``failed`` (transformers calls it after a finished one
    only), so that a consumer waiting for the end (``TextIteratorStreamer``) is let go. The failed request's
    own error is the one the caller gets: an error ``end()`` raises then (a streamer whose consumer went away
    fails in both) is a warning instead of taking its place."""
    if not failed:
        streamer.end()
        return
    try:
        streamer.end()
    except Exception as error:
        warnings.warn(
            f"the streamer's end() raised {type(error).__name__}: {error} after the request had failed; the "
            "request's own error is raised",
            RuntimeWarning,
            stacklevel=4,  # generate()'s caller
        )


def _final_scores(request: Request, scores: torch.Tensor) -> torch.Tensor:
    """[batch, new, V] the target's scores kept by the rounds (processed there) -> transformers' ``scores``:
    through its remaining sampling warpers in its order, log-softmaxed with ``renormalize_logits``."""
    flat = scores.flatten(0, 1)
    if not request.processing.warps:  # else the rounds warped them already
        flat = sampling_warpers(request.sampling)(None, flat)
    if request.processing.renormalize_logits:
        flat = flat.log_softmax(-1)
    return flat.view_as(scores)


def _check_lookup_config(config: EngineConfig, drafter_tokenizer: Any) -> None:
    """Refuse what an engine without a drafter (prompt lookup) cannot do, naming the setting."""
    if drafter_tokenizer is not None:
        raise ValueError("`drafter_tokenizer` was given without a drafter: pass the drafter too, or drop it")
    for name, value, what in (
        ("distill", config.distill, "distils a drafter"),
        ("adaptive", config.adaptive, "trains an acceptance head on a drafter's hidden states"),
        ("confidence_threshold", config.confidence_threshold, "stops a drafter's draft where it is unsure"),
    ):
        if value is not None:
            raise ValueError(
                f"EngineConfig(`{name}`=...) {what}, and an engine without a drafter drafts by prompt lookup: pass a "
                f"drafter, or leave `{name}` unset"
            )


def _check_tokenizer_fits(
    target_highest: int, drafter_highest: int, target_vocab: int, drafter_vocab: int
) -> None:
    """Refuse, by the argument's name, a tokenizer whose ids (up to ``*_highest``) run past its model's
    vocabulary (``config.vocab_size``: the rows of its logits), which is not that model's tokenizer; say so
    when the two look swapped."""
    highest = [target_highest, drafter_highest]
    vocabs = (target_vocab, drafter_vocab)
    for index, (name, alias, role) in enumerate(
        (
            ("target_tokenizer", "`tokenizer`", "target"),
            ("drafter_tokenizer", "`drafter_tokenizer`/`assistant_tokenizer`", "drafter"),
        )
    ):
        if highest[index] < vocabs[index]:
            continue
        swapped = highest[1 - index] < vocabs[index] and highest[index] < vocabs[1 - index]
        raise ValueError(
            f"`{name}` (generate()'s {alias}) has ids up to {highest[index]}, but the {role}'s vocabulary "
            f"(config.vocab_size) has {vocabs[index]} ids: it is not the {role}'s tokenizer; pass the {role} model's "
            "own tokenizer"
            + (
                " (the two tokenizers look swapped: the target's goes to `target_tokenizer`, generate()'s "
                "`tokenizer`, the drafter's to `drafter_tokenizer`)"
                if swapped
                else ""
            )
        )


def _tokens_read(tokenizer: Any) -> tuple:
    """What ``token_bytes`` reads of ``tokenizer`` beyond its base vocabulary: its length and
    ``vocabulary.added_tokens``, which ``add_tokens``/``add_special_tokens`` between two requests change
    (transformers' stop strings read the tokenizer as it is at each call)."""
    return len(tokenizer), *added_tokens(tokenizer)


def _adapter_name(target: torch.nn.Module, drafter: torch.nn.Module) -> str:
    """A LoRA adapter name for this target, unused on the drafter (one adapter per target)."""
    vocab = target.get_output_embeddings().weight.shape[0]
    base = f"omnidraft_{type(target).__name__}_{vocab}"
    taken = adapter_names(drafter) | set(getattr(drafter, "peft_config", None) or {})
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    return name


_FIELDS: frozenset[str] | None = None


def _generation_config_fields() -> frozenset[str]:
    """Names of transformers' GenerationConfig fields (computed once, on first use)."""
    global _FIELDS
    if _FIELDS is None:
        from transformers import GenerationConfig

        _FIELDS = frozenset(GenerationConfig().to_dict())
    return _FIELDS
