"""SpeculativeEngine: owns a target and a drafter and runs the rounds of speculative decoding.

One round, for every row of the batch at once (``k`` = draft length)::

    1 draft      the drafter proposes y_1..y_k          k forwards of 1 token (the first re-feeds a window);
                                                        with an acceptance head, rows stop early (SPEC §5)
    2 translate  drafter ids -> target ids              bridge + n-gram table (cross-vocabulary only)
    3 target     one forward over [pending, x_1..x_k]  logits p_1..p_{k+1}
    4 verify     speculative sampling or a cascade      accepted count + recovered/bonus token per row
    5 commit     append kept tokens per row            EOS / max_new_tokens; rollback is implicit
    6 learn      n-gram inserts; labels for the online learners
    7 host       one small read: are all rows done?

Between requests the online learners (``learner.py``) train the drafter's LoRA adapter and the
acceptance head on what the rounds recorded.

Per-row state is a handful of fixed-shape device tensors (``_Batch``). A row's
committed tokens sit in ``tokens[b, :lengths[b]]`` by cache slot (see
``models.py``): the target's cache holds all of them but the last (the
*pending* token), the drafter's cache holds at least all but the last two. So
a rejection needs no cache work at all: the next round simply writes at the
row's new length, over the rejected slots.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from . import ops
from .adaptive import DraftLength
from .bridge import VocabBridge
from .config import CascadeConfig, EngineConfig, SamplingParams
from .experience import Recorder
from .graphs import StageGraphs
from .kernels.proposal import CrossProposal, fold_twins_
from .kernels.verify import RULES
from .learner import OnlineLearner
from .models import CausalLM
from .ngram import NGramTable
from .request import Request, resolve_request
from .state import load_state, save_state
from .stats import GenerationStats, StageTimer

__all__ = ["GenerateOutput", "SpeculativeEngine"]

# Per-request device counters (see GenerationStats for their meaning); "invalid" counts rows with bad logits.
_COUNTERS = (
    "row_rounds", "proposed", "accepted", "drafter_proposed", "drafter_accepted", "merged_proposed",
    "merged_accepted", "deferred", "invalid",
)  # fmt: skip

# Keyword names of transformers' generate() that mean the same as ours.
_ALIASES = {"num_assistant_tokens": "num_draft_tokens", "inputs": "input_ids"}


@dataclass
class GenerateOutput:
    """What ``generate(..., return_dict_in_generate=True)`` returns."""

    sequences: torch.Tensor  # [batch, prompt + new]
    stats: GenerationStats = field(default_factory=GenerationStats)

    def __getitem__(self, key: str):
        """``out["sequences"]`` works as on transformers' outputs."""
        if key not in ("sequences", "stats"):
            raise KeyError(key)
        return getattr(self, key)


@dataclass
class _Batch:
    """Device state of one request (fixed shapes for the whole request)."""

    tokens: torch.Tensor  # [batch, slots + 1] committed target tokens by slot
    lengths: torch.Tensor  # [batch] committed slots (dummy slot and padding included)
    start: torch.Tensor  # [batch] first slot of each row's prompt
    generated: torch.Tensor  # [batch] new tokens so far
    done: torch.Tensor  # [batch] bool
    eos_ids: torch.Tensor  # [num_eos]
    d_tokens: torch.Tensor  # [batch, drafter slots + margin] the drafter's context by slot, in drafter ids
    d_start: torch.Tensor  # [batch] first slot of each row's drafter context
    d_lengths: torch.Tensor  # [batch] committed drafter slots
    window: int  # drafter tokens re-fed by the first draft step of a round
    draft_ids: torch.Tensor  # [batch, k] drafter ids
    draft_probs: torch.Tensor  # [batch, k, V_d] fp32
    draft_probs_t1: torch.Tensor | None  # [batch, k, V_d] fp32 T=1 drafter probabilities, for cascade rules
    rule: torch.Tensor | None  # [batch] int64 deferral rule ids (None: exact speculative sampling)
    alpha: torch.Tensor | None  # [batch] fp32
    counters: torch.Tensor  # [len(_COUNTERS)] int64, summed over rounds (read once, at the end)
    recorder: Recorder | None  # labels for the online learners (EngineConfig.distill / adaptive)
    invalid: torch.Tensor  # [batch] bool rows with NaN/inf logits this round
    draft_length: DraftLength | None  # the round's adaptive stopping state (EngineConfig.adaptive)
    graphs: StageGraphs  # the request's captured round stages (EngineConfig.cuda_graphs)


class SpeculativeEngine:
    """Speculative decoding of ``target`` with ``drafter``; holds what lives across requests.

    Args:
        target: the model whose output distribution is reproduced (a Hugging Face causal LM).
        drafter: a smaller causal LM that proposes tokens. Same device as ``target``; any dtype.
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
        drafter: torch.nn.Module,
        *,
        target_tokenizer: Any = None,
        drafter_tokenizer: Any = None,
        config: EngineConfig | None = None,
    ):
        if drafter is None:
            raise ValueError(
                "no drafter: pass `drafter=` (or transformers' `assistant_model=`), a small causal LM that "
                "proposes tokens for the target to verify"
            )
        config = EngineConfig() if config is None else config
        if not isinstance(config, EngineConfig):
            raise TypeError(f"`config` must be an EngineConfig, got {type(config).__name__}")
        self.target = CausalLM(target, "model")
        self.drafter = CausalLM(drafter, "drafter")
        if self.target.device != self.drafter.device:
            raise ValueError(
                f"the target is on {self.target.device} and the drafter on {self.drafter.device}; put both on one "
                "device (e.g. drafter.to(target.device)); their dtypes may differ"
            )
        self.config = config
        self.bridge = self._bridge(target_tokenizer, drafter_tokenizer)
        self.ngram: NGramTable | None = None
        if self.bridge is not None and config.translation != "tli":
            self.ngram = NGramTable(config.ngram_capacity, config.ngram_max_len, device=self.device)
            if config.ngram_preseed:
                self.ngram.seed(self.bridge.t2ds, self.bridge.t2ds_len)
        self.target_tokenizer = target_tokenizer
        self.drafter_tokenizer = drafter_tokenizer
        self.learner: OnlineLearner | None = None
        if config.distill is not None or config.adaptive is not None:
            self.learner = OnlineLearner(
                self.drafter,
                self.bridge,
                self.target.vocab_size,
                config.distill,
                config.adaptive,
                adapter_name=_adapter_name(target, drafter),
            )
        self.stats = GenerationStats()
        self.last_stats = GenerationStats()

    @property
    def device(self) -> torch.device:
        return self.target.device

    def save_state(self, path: str | Path) -> None:
        """Save what the engine learned (n-gram table with its bridge, LoRA adapter, acceptance head) to
        one safetensors file."""
        save_state(self, path)

    def load_state(self, path: str | Path) -> None:
        """Restore a state saved by an engine for the same tokenizer pair."""
        load_state(self, path)

    def _bridge(self, target_tokenizer: Any, drafter_tokenizer: Any) -> VocabBridge | None:
        """The vocabulary bridge, or None when drafter and target share one vocabulary."""
        both = target_tokenizer is not None and drafter_tokenizer is not None
        if both and target_tokenizer.get_vocab() == drafter_tokenizer.get_vocab():
            both = self.target.vocab_size != self.drafter.vocab_size  # same tokens, padded differently
        if not both:
            if self.target.vocab_size != self.drafter.vocab_size:
                raise ValueError(
                    f"the target's vocabulary has {self.target.vocab_size} ids and the drafter's "
                    f"{self.drafter.vocab_size}: cross-vocabulary drafting needs both tokenizers "
                    "(`tokenizer=` for the target and `drafter_tokenizer=`/`assistant_tokenizer=` for the drafter)"
                )
            return None
        bridge = VocabBridge.from_tokenizers(
            drafter_tokenizer,
            target_tokenizer,
            drafter_vocab_size=self.drafter.vocab_size,
            target_vocab_size=self.target.vocab_size,
        )
        if bridge.num_direct <= len(bridge.target_eos):
            raise ValueError(
                "no drafter token stands for the same bytes as a target token (empty intersection): check that "
                "`tokenizer`/`drafter_tokenizer` are the tokenizers of these models"
            )
        return bridge.to(self.device)

    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        num_draft_tokens: int | None = None,
        generation_config: Any = None,
        streamer: Any = None,
        return_dict_in_generate: bool | None = None,
        cascade: CascadeConfig | None = None,
        **kwargs: Any,
    ) -> torch.Tensor | GenerateOutput:
        """Generate like ``target.generate()``; unset arguments resolve as there (see ``request.py``).

        ``cascade`` (default: the engine config's) verifies against a speculative-cascade deferral rule
        instead of the target exactly (``CascadeConfig``).

        Returns ``[batch, prompt + new]`` token ids, padded with ``pad_token_id`` after a row's EOS, or a
        :class:`GenerateOutput` when ``return_dict_in_generate=True``.
        """
        explicit = {
            "max_new_tokens": max_new_tokens, "do_sample": do_sample, "temperature": temperature,
            "top_k": top_k, "top_p": top_p, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id,
            "num_assistant_tokens": num_draft_tokens, "return_dict_in_generate": return_dict_in_generate,
        }  # fmt: skip
        for name, value in kwargs.items():
            ours = _ALIASES.get(name)
            if ours == "input_ids":
                if input_ids is not None and value is not None:
                    raise TypeError("pass the prompt once: as `input_ids` or as `inputs`, not both")
                input_ids = value if value is not None else input_ids
            elif ours == "num_draft_tokens":
                if num_draft_tokens is not None and value is not None and value != num_draft_tokens:
                    raise ValueError(f"`num_draft_tokens`={num_draft_tokens} and `{name}`={value} disagree")
                explicit["num_assistant_tokens"] = num_draft_tokens if value is None else value
            elif name == "token_type_ids":
                if value is not None and bool((torch.as_tensor(value) != 0).any()):
                    raise ValueError("non-zero `token_type_ids` are not supported by causal LM generation")
            elif name in _generation_config_fields():
                explicit[name] = value
            else:
                raise TypeError(f"generate() got an unexpected keyword argument `{name}`")

        request = resolve_request(
            model_generation_config=getattr(self.target.model, "generation_config", None),
            vocab_size=self.target.vocab_size,
            position_limit=self.target.position_limit,
            device=self.device,
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=generation_config,
            explicit=explicit,
            default_draft_tokens=self.config.num_draft_tokens,
            streamer=streamer,
            cascade=cascade if cascade is not None else self.config.cascade,
        )
        if request.cascade is not None and self.bridge is not None and self.config.translation == "exact":
            raise ValueError(
                "`cascade` needs verification against the drafter's probabilities, and translation='exact' "
                "verifies by exact match; use EngineConfig(translation='omnidraft' or 'tli') with cascades"
            )
        sequences, stats = self._run(request)
        self.last_stats = stats
        self.stats.add(stats)
        if request.return_dict_in_generate:
            return GenerateOutput(sequences=sequences, stats=stats)
        return sequences

    # ---------------------------------------------------------------------------------------------
    def _run(self, request: Request) -> tuple[torch.Tensor, GenerationStats]:
        device = self.device
        time_stages = self.config.time_stages
        timer = StageTimer(device.type != "cuda" if time_stages is None else time_stages, device)
        seed = int(torch.randint(2**62, (1,)))  # from torch's global RNG: torch.manual_seed reproduces runs
        generator = torch.Generator(device).manual_seed(seed)
        began = time.perf_counter()
        state = self._begin(request, generator)
        batch, prompt = request.input_ids.shape
        if request.streamer is not None:
            request.streamer.put(request.input_ids.cpu())
        serving = self.learner.serving() if self.learner is not None else nullcontext()
        try:
            with serving, torch.no_grad():
                rounds = self._decode(state, request, generator, timer)
        finally:
            state.graphs.close()
            self.target.end()
            self.drafter.end()
            if request.streamer is not None:
                request.streamer.end()

        if state.recorder is not None:
            with timer("update"):  # the online learners, between requests
                self.learner.observe(
                    state.recorder.examples(
                        state.d_tokens,
                        state.d_start,
                        state.d_lengths,
                        state.generated,
                        request.sampling.temperature,
                    )
                )

        generated = state.generated.cpu()
        longest = int(generated.max())
        sequences = state.tokens[:, 1 : 1 + prompt + longest].clone()
        if request.pad_token_id is not None:
            columns = torch.arange(longest, device=device)
            tail = sequences[:, prompt:]
            tail.masked_fill_(columns >= state.generated[:, None], request.pad_token_id)
        counters = dict(zip(_COUNTERS, state.counters.tolist(), strict=True))
        del counters["invalid"]
        stats = GenerationStats(
            requests=1,
            rounds=rounds,
            **counters,
            ngram_table_size=int(self.ngram.size()) if self.ngram is not None else 0,
            new_tokens=int(generated.sum()),
            target_calls=batch + counters["row_rounds"],
            seconds=time.perf_counter() - began,
            stage_seconds=timer.seconds,
        )
        return sequences, stats

    def _decode(self, state: _Batch, request: Request, generator: torch.Generator, timer: StageTimer) -> int:
        """Prefill both models, then run rounds until every row is done; returns the number of rounds."""
        device = self.device
        batch, prompt = request.input_ids.shape
        with timer("prefill"):
            # Each model's cache gets every committed slot below the ones its first round rewrites.
            for model, tokens, end in (
                (self.target, state.tokens, prompt),
                (self.drafter, state.d_tokens, max(1, int(state.d_lengths[0]) - state.window)),
            ):
                slots = torch.arange(end, device=device).expand(batch, end)
                model.forward(tokens[:, :end], slots, last_only=True)
        rounds = 0
        while True:
            before = state.lengths.clone() if request.streamer is not None else None
            self._round(state, request, generator, timer)
            rounds += 1
            with timer("host"):
                table_size = self.ngram.size() if self.ngram is not None else state.counters.new_zeros(())
                flags = torch.stack([state.done.all().long(), state.counters[-1], table_size])
                all_done, invalid, table_size = flags.tolist()  # the one read per round
            if self.ngram is not None and table_size > self.ngram.capacity // 2:
                self.ngram.evict()
            if invalid:
                raise ValueError(
                    "the model or the drafter produced NaN or +inf logits (or a row of all -inf): check "
                    "their weights and dtype (fp16 overflow is a common cause); nothing was returned"
                )
            if request.streamer is not None:
                self._stream(request.streamer, state, before)
            if all_done:
                break
        return rounds

    @property
    def _spelling_width(self) -> int:
        """Most drafter tokens one committed target token adds to the drafter's context in a round."""
        return 1 if self.bridge is None else min(self.bridge.max_spelling, self.config.max_spelling)

    def _spell(self, target_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Drafter spelling of target ids [n]: ids [n, width] (-1 padded) and lengths [n] (0 if longer)."""
        if self.bridge is None:
            return target_ids[:, None], torch.ones_like(target_ids)
        width = self._spelling_width
        lengths = self.bridge.t2ds_len[target_ids].long()
        return self.bridge.t2ds[target_ids, :width].long(), torch.where(lengths <= width, lengths, 0)

    def _begin(self, request: Request, generator: torch.Generator) -> _Batch:
        """Allocate the request's buffers and caches; lay out both prompts by slot (see docs/architecture.md)."""
        device, k, new = self.device, request.num_draft_tokens, request.max_new_tokens
        adaptive = self.config.adaptive
        batch, prompt = request.input_ids.shape
        slots = 1 + prompt + new + k  # dummy slot, prompt, new tokens, draft overrun
        tokens = torch.zeros(batch, slots + 1, dtype=torch.int64, device=device)
        tokens[:, 1 : 1 + prompt] = request.input_ids
        start = 1 + prompt - request.prompt_lengths.to(device)

        # The drafter's context: the prompt spelled in drafter tokens (context-free, through the bridge),
        # below it `window - 1` dummy slots so that its first step can always re-feed `window` tokens.
        spelling_width = self._spelling_width
        window = spelling_width + 1
        rows = []
        for row in range(batch):
            ids = request.input_ids[row, prompt - int(request.prompt_lengths[row]) :]
            rows.append(ids if self.bridge is None else self.bridge.spell_for_drafter(ids))
        d_prompt = max(1, max(len(r) for r in rows))
        # Each round appends at most `spelling_width` drafter tokens per committed target token, and the last
        # round may commit up to k + 1 of them; then drafting writes k - 1 slots past the end.
        d_slots = (window - 1) + d_prompt + spelling_width * (new + k) + k
        d_tokens = torch.zeros(batch, d_slots + k + spelling_width, dtype=torch.int64, device=device)
        d_start = torch.empty(batch, dtype=torch.int64, device=device)
        for row, ids in enumerate(rows):
            d_start[row] = window - 1 + d_prompt - len(ids)
            d_tokens[row, window - 1 + d_prompt - len(ids) : window - 1 + d_prompt] = ids

        for model, width, first in ((self.target, slots, start), (self.drafter, d_slots, d_start)):
            model.check_window(width)
            model.begin(first, width)
        return _Batch(
            tokens=tokens,
            lengths=torch.full((batch,), 1 + prompt, dtype=torch.int64, device=device),
            start=start,
            generated=torch.zeros(batch, dtype=torch.int64, device=device),
            done=torch.zeros(batch, dtype=torch.bool, device=device),
            eos_ids=torch.tensor(request.eos_token_ids, dtype=torch.int64, device=device),
            d_tokens=d_tokens,
            d_start=d_start,
            d_lengths=torch.full((batch,), window - 1 + d_prompt, dtype=torch.int64, device=device),
            window=window,
            draft_ids=torch.zeros(batch, k, dtype=torch.int64, device=device),
            draft_probs=torch.zeros(batch, k, self.drafter.vocab_size, dtype=torch.float32, device=device),
            draft_probs_t1=torch.zeros(batch, k, self.drafter.vocab_size, dtype=torch.float32, device=device)
            if request.cascade is not None and request.sampling != SamplingParams(temperature=1.0)
            else None,
            rule=None
            if request.cascade is None
            else torch.full((batch,), RULES.index(request.cascade.rule), dtype=torch.int64, device=device),
            alpha=None
            if request.cascade is None
            else torch.tensor(request.alphas, dtype=torch.float32, device=device),
            counters=torch.zeros(len(_COUNTERS), dtype=torch.int64, device=device),
            recorder=None
            if self.learner is None or not self.learner.enabled
            else self.learner.recorder(
                batch, d_tokens.shape[1], spelling_width, new + k + 1, self.target.dtype
            ),
            invalid=torch.zeros(batch, dtype=torch.bool, device=device),
            draft_length=None
            if self.learner is None or self.learner.head is None
            else DraftLength(self.learner.head, batch, adaptive.gamma, min(adaptive.k_min, k), device),
            graphs=StageGraphs(device, generator, self.config.cuda_graphs),
        )

    def _round(self, state: _Batch, request: Request, generator: torch.Generator, timer: StageTimer) -> None:
        """One round over fixed-shape device tensors: k draft steps, then ``_finish`` (translate, target
        forward, verify, commit, learn). ``state.graphs`` runs them as captured stages (``graphs.py``): the
        whole round as one, or with an adaptive draft length each draft step and the rest."""
        k = request.num_draft_tokens
        length = state.draft_length
        if length is None:

            def whole(timer: StageTimer) -> None:
                for i in range(k):
                    self._draft_step(state, request, generator, i, timer)
                self._finish(state, request, generator, k, timer)

            state.graphs.run("round", whole, timer, "round")
            return
        steps = k
        for i in range(k):
            step = partial(self._draft_step, state, request, generator, i)
            state.graphs.run(("draft", i), step, timer, "draft")
            # Adaptive drafting's own read, once per draft step (SPEC §5): stop when every row has.
            if i + 1 < k and bool(length.stopped.all()):
                steps = i + 1
                break
        finish = partial(self._finish, state, request, generator, steps)
        state.graphs.run(("finish", steps), finish, timer, "finish")

    def _draft_step(
        self, state: _Batch, request: Request, generator: torch.Generator, i: int, timer: StageTimer
    ) -> None:
        """Draft token ``i`` of the round for every row: ``state.draft_ids[:, i]`` and its distribution."""
        sampling = request.sampling
        device = state.tokens.device
        length = state.draft_length
        # Token-level intersection: the drafter proposes only tokens the target has.
        shared_only = self.bridge.mappable if self._mode == "tli" else None
        with timer("draft"):
            if i == 0:
                # The first step re-feeds the last `window` drafter tokens: whatever the previous round left
                # unfed (the spelling of its last token, the last drafted token) is among them.
                state.invalid.zero_()
                if length is not None:
                    length.reset(state.done)
                slots = state.d_lengths[:, None] + torch.arange(
                    -state.window, 0, device=device
                )  # [batch, window]
                inputs = state.d_tokens.gather(1, slots)
            else:
                slots = (state.d_lengths + (i - 1))[:, None]
                inputs = state.draft_ids[:, i - 1 : i]
            if length is None:
                logits = self.drafter.forward(inputs, slots, last_only=True)[:, -1]  # [batch, V_d]
            else:
                logits, hidden = self.drafter.forward(inputs, slots, last_only=True, hidden=True)
                logits = logits[:, -1]
            state.invalid |= ops.nonfinite_rows(logits)
            noise = None if sampling.greedy else _exponential(logits.shape, generator, device)
            ids, probs = ops.sample(
                logits,
                noise,
                temperature=sampling.temperature,
                top_k=sampling.top_k,
                top_p=sampling.top_p,
                mask=shared_only,
            )
            state.draft_ids[:, i] = ids
            state.draft_probs[:, i] = probs
            if state.draft_probs_t1 is not None:  # the rules' T=1 statistics (CascadeConfig)
                q1 = (
                    logits.float()
                    if shared_only is None
                    else logits.float().masked_fill(~shared_only, -torch.inf)
                )
                state.draft_probs_t1[:, i] = q1.softmax(-1)
            if length is not None:  # adaptive draft length (SPEC §5): rows stop on the head's estimate
                length.step(hidden[:, -1], i + 1)

    @property
    def _mode(self) -> str:
        return self.config.translation if self.bridge is not None else "shared"

    def _finish(
        self, state: _Batch, request: Request, generator: torch.Generator, steps: int, timer: StageTimer
    ) -> None:
        """The rest of a round whose rows drafted ``steps`` tokens (at most): translate, target forward,
        verify, commit, learn."""
        sampling = request.sampling
        batch = state.tokens.shape[0]
        device = state.tokens.device
        active = ~state.done
        mode = self._mode
        length = state.draft_length
        draft_ids = state.draft_ids[:, :steps]
        draft_probs = state.draft_probs[:, :steps]
        draft_probs_t1 = None if state.draft_probs_t1 is None else state.draft_probs_t1[:, :steps]

        with timer("translate"):
            cross = None
            if self.bridge is None:
                proposal = draft_ids
                span_end = torch.arange(1, steps + 1, device=device).expand(batch, steps)
            else:
                proposal, _, source, span_end = ops.translate(
                    draft_ids, self.bridge.d2t, table=None if self.ngram is None else self.ngram.tensors
                )
                cross = CrossProposal(draft_ids, source, span_end, self.bridge.d2t, self.bridge.t2d)
                for probs in (draft_probs, draft_probs_t1):
                    if probs is not None:
                        fold_twins_(probs, self.bridge.twins)
            if length is not None:  # a row proposes only the target tokens wholly inside its own draft
                proposal = torch.where(span_end <= length.drafted[:, None], proposal, -1)

        with timer("target"):
            slots = state.lengths[:, None] - 1 + torch.arange(steps + 1, device=device)  # [batch, steps+1]
            inputs = torch.cat([state.tokens.gather(1, slots[:, :1]), proposal.clamp_min(0)], 1)
            target_logits = self.target.forward(inputs, slots)  # [batch, steps+1, V_t]

        with timer("verify"):
            exact_match = mode == "exact"
            uniforms = torch.rand(batch, steps, generator=generator, device=device)
            vocab = target_logits.shape[-1]
            noise_shape = (batch, steps + 1, vocab) if exact_match else (batch, vocab)
            noise = None if sampling.greedy else _exponential(noise_shape, generator, device)
            num_accepted, output_tokens, accept_probs, deferred, target_invalid = ops.verify(
                target_logits,
                proposal,
                None if exact_match else draft_probs,
                uniforms,
                noise,
                temperature=sampling.temperature,
                top_k=sampling.top_k,
                top_p=sampling.top_p,
                rule=state.rule,
                alpha=state.alpha,
                draft_probs_t1=draft_probs_t1,
                cross=cross,
                exact_match=exact_match,
            )

        with timer("commit"):
            invalid = (state.invalid | target_invalid) & active
            generated, d_lengths = state.generated.clone(), state.d_lengths.clone()  # before this round
            kept = ops.commit(
                state.tokens,
                state.lengths,
                state.generated,
                state.done,
                output_tokens,
                num_accepted,
                state.eos_ids,
                max_new_tokens=request.max_new_tokens,
            )
            final = output_tokens.gather(1, num_accepted[:, None])[:, 0]  # recovered or bonus token
            spelling, spelling_len = self._spell(final)
            ops.commit_drafter(
                state.d_tokens,
                state.d_lengths,
                draft_ids,
                span_end,
                num_accepted,
                spelling,
                spelling_len,
                active,
            )
            drafter_proposed = length.drafted * active if length is not None else active.long() * steps
            self._count(state, active, invalid, proposal, span_end, num_accepted, deferred, drafter_proposed)

        if self.ngram is not None:
            with timer("learn"):  # every emitted target token spelled by 2+ drafter tokens (SPEC §2.2)
                emitted = torch.where(
                    torch.arange(steps + 1, device=device) < kept[:, None], output_tokens, -1
                )
                emitted = emitted.flatten()
                spelled, spelled_len = self._spell(emitted.clamp_min(0))
                keys = self.ngram.keys_of(spelled, torch.where(emitted >= 0, spelled_len, 0))
                self.ngram.insert(keys, emitted)
        if state.recorder is not None:
            with timer("learn"):
                state.recorder.record(
                    target_logits=target_logits,
                    proposal=proposal,
                    output_tokens=output_tokens,
                    num_accepted=num_accepted,
                    accept_probs=accept_probs,
                    span_end=span_end,
                    spelling_len=torch.where(active, spelling_len, 0),
                    kept=kept,
                    generated=generated,
                    d_lengths=d_lengths,
                )

    @staticmethod
    def _count(state, active, invalid, proposal, span_end, num_accepted, deferred, drafter_proposed) -> None:
        proposed_mask = (proposal >= 0) & active[:, None]  # [batch, k]
        accepted_mask = proposed_mask & (
            torch.arange(proposal.shape[1], device=proposal.device) < num_accepted[:, None]
        )
        merged = (span_end - torch.cat([span_end.new_zeros(span_end.shape[0], 1), span_end[:, :-1]], 1)) >= 2
        drafter_accepted = torch.where(
            num_accepted > 0, span_end.gather(1, (num_accepted - 1).clamp_min(0)[:, None])[:, 0], 0
        )
        state.counters += torch.stack(
            [
                active.sum(),
                proposed_mask.sum(),
                accepted_mask.sum(),
                drafter_proposed.sum(),
                (drafter_accepted * active).sum(),
                (merged & proposed_mask).sum(),
                (merged & accepted_mask).sum(),
                (deferred & proposed_mask).sum(),
                invalid.sum(),
            ]
        )

    @staticmethod
    def _stream(streamer: Any, state: _Batch, before: torch.Tensor) -> None:
        begin, end = int(before[0]), int(state.lengths[0])
        if end > begin:
            streamer.put(state.tokens[0, begin:end].cpu())


def _adapter_name(target: torch.nn.Module, drafter: torch.nn.Module) -> str:
    """A LoRA adapter name for this target, unused on the drafter (one adapter per target)."""
    vocab = target.get_output_embeddings().weight.shape[0]
    base = f"omnidraft_{type(target).__name__}_{vocab}"
    taken = getattr(drafter, "peft_config", None) or {}
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    return name


def _exponential(shape, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float32, device=device).exponential_(generator=generator)


_FIELDS: frozenset[str] | None = None


def _generation_config_fields() -> frozenset[str]:
    """Names of transformers' GenerationConfig fields (computed once, on first use)."""
    global _FIELDS
    if _FIELDS is None:
        from transformers import GenerationConfig

        _FIELDS = frozenset(GenerationConfig().to_dict())
    return _FIELDS
