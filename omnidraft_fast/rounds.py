"""The round: one request's device state and the stages that advance every row of it at once.

One round (``k`` = draft length)::

    1 draft      the drafter proposes y_1..y_k          k forwards of 1 token (the first re-feeds a window);
                                                        with an acceptance head or a confidence
                                                        threshold, rows stop early (SPEC §5); without a
                                                        drafter, copied from the context (kernels/lookup.py)
    2 translate  drafter ids -> target ids              bridge + n-gram table (cross-vocabulary only)
    3 target     one forward over [pending, x_1..x_k]  logits p_1..p_{k+1}
    4 verify     speculative sampling, a cascade or     accepted count + recovered/bonus token per row
                 exact match (prompt lookup, ...)
    5 commit     append kept tokens per row            EOS / max_new_tokens; rollback is implicit
    6 learn      n-gram inserts; labels for the online learners

Per-row state is a handful of fixed-shape device tensors (:class:`RequestState`). A row's committed
tokens sit in ``tokens[b, :lengths[b]]`` by cache slot (see ``models.py``): the target's cache holds all
of them but the last (the *pending* token), the drafter's cache at least all of its own but the last
``window``, which the first draft step re-feeds. So a
rejection needs no cache work at all: the next round simply writes at the row's new length, over the
rejected slots. Every stage reads and writes only tensors allocated by :meth:`Rounds.begin`, in place, with
no host read inside, so that ``graphs.py`` can capture and replay it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from . import ops
from .adaptive import DraftLength, confidence_logit
from .bridge import VocabBridge
from .config import EngineConfig, SamplingParams
from .feedback import feedback, kept_drafts
from .graphs import StageGraphs
from .kept_logits import KeptLogits
from .kernels.cascade import RULES
from .kernels.proposal import CrossProposal, drafted_path, fold_twins_
from .learner import OnlineLearner
from .models import CausalLM
from .ngram import NGramTable
from .processors import Processors
from .request import Request
from .request_state import COUNTERS, KeptStates, RequestState, refill
from .stats import StageTimer

__all__ = ["Rounds"]

_INVALID = COUNTERS.index("invalid")


class Rounds:
    """The stages of a round over one engine's models, vocabulary bridge, n-gram table and learners."""

    def __init__(
        self,
        target: CausalLM,
        drafter: CausalLM | None,  # None: prompt lookup (kernels/lookup.py)
        bridge: VocabBridge | None,
        ngram: NGramTable | None,
        learner: OnlineLearner | None,
        config: EngineConfig,
    ):
        self.target, self.drafter, self.bridge, self.ngram = target, drafter, bridge, ngram
        self.learner, self.config = learner, config
        self._kept = KeptStates(config.kept_graphs)  # recent requests' states, caches and graphs
        self._weights: tuple | None = None  # the models' weights (CausalLM.weights) the kept states read
        # What `spell` gives each target id, made once per engine (the bridge's tensors never change): the last
        # `spelling_width` ids of its spelling [V_t, width] int32, as the bridge holds them (its own `t2ds`
        # where the width takes every spelling whole: no copy), and the spelling's length [V_t] int64, so that
        # a round's spellings are two lookups (a few ops each otherwise, at every commit and learning step)
        self._spellings: tuple[torch.Tensor, torch.Tensor] | None = None
        if bridge is not None:
            width = self.spelling_width
            lengths = bridge.t2ds_len.long()
            ends = bridge.t2ds
            if width < bridge.max_spelling:
                columns = (lengths - width).clamp_min(0)[:, None] + torch.arange(width, device=lengths.device)
                ends = ends.gather(1, columns)
            self._spellings = ends, lengths
        # How a drafter with another vocabulary has its logits processed (`_processed_across`): each target
        # id's drafter twin and whether it has one [V_t]; each drafter id's first target token (its twin, or
        # the first piece of its split) and whether it has one, and whether it is that token's canonical
        # twin (not a duplicate such as `<0x20>` beside `▁`, nor a split) [V_d]; the split drafter tokens
        # whose first piece has no drafter twin (the zoo's `):\n`, say), and that piece.
        self._twins: tuple[torch.Tensor, ...] | None = None
        if bridge is not None:
            t2d, d2t = bridge.t2d.long(), bridge.d2t.long()
            first = torch.where(
                bridge.mappable, d2t, torch.where(bridge.d2ts_len > 0, bridge.d2ts[:, 0].long(), -1)
            )
            ids = torch.arange(d2t.shape[0], device=d2t.device)
            canonical = bridge.mappable & (t2d[d2t.clamp_min(0)] == ids)
            lone = ~bridge.mappable & (first >= 0) & (t2d[first.clamp_min(0)] < 0)
            self._twins = (t2d.clamp_min(0), t2d >= 0, first.clamp_min(0), first >= 0, canonical,
                           ids[lone], first[lone])  # fmt: skip

    @property
    def mode(self) -> str:
        """How drafts become target tokens: ``"shared"`` (one vocabulary), the configured translation, or
        ``"lookup"`` (no drafter: prompt lookup, verified by exact match)."""
        if self.drafter is None:
            return "lookup"
        return self.config.translation if self.bridge is not None else "shared"

    @property
    def spelling_width(self) -> int:
        """Most drafter tokens one committed target token adds to the drafter's context in a round."""
        return 1 if self.bridge is None else min(self.bridge.max_spelling, self.config.max_spelling)

    def slots_per_round(self, k: int) -> int:
        """Most drafter slots one round commits to a row: up to ``k`` drafted tokens, then the spelling of
        the target tokens it did not draft (``feedback.py``)."""
        return k + self.spelling_width

    def spell(self, target_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Drafter spelling of target ids [n]: the last ``spelling_width`` ids of each ([n, width], -1
        padded: the whole spelling where it fits) and the whole spelling's length [n], which is larger
        than the width where the ids are its end only."""
        if self._spellings is None:
            return target_ids[:, None], torch.ones_like(target_ids)
        ends, lengths = self._spellings
        return ends[target_ids].long(), lengths[target_ids]  # int64, as ops.commit_drafter takes them

    def begin(self, request: Request, seed: int) -> RequestState:
        """The request's device state, caches and random generator (seeded with ``seed``), both prompts laid
        out by slot (see docs/architecture.md). With ``cuda_graphs``, the state, caches and captured stages
        kept from an earlier request with the same shapes and settings (``EngineConfig.cuda_graphs``),
        refilled in place so that its graphs replay from the first round; else fresh ones, kept in turn
        (the least recently used of more than ``EngineConfig.kept_graphs`` released)."""
        device, prompt, learner = request.input_ids.device, request.input_ids.shape[1], self.learner
        # With cuda_graphs a learner's adapter serves merged weights rewritten in place from the first
        # request on (the engine builds it with merge_always): kept graphs see every update.
        reusable = self.config.cuda_graphs
        # Prompts are padded to the bucket in both modes, so that eager and captured rounds compute alike (the
        # attention's width changes float rounding). Not for a model right only within a width (width_limit:
        # chunked or local attention, position-sized buffers, mixed sliding-window and full layers in a model
        # that takes no mask mapping; padding could take it past that width) nor under logits processors
        # (they count the prompt's columns: min_length, forced BOS): those reuse graphs for prompts of equal
        # width only.
        unlimited = all(model.width_limit is None for model in self._models)
        pads = unlimited and not request.processing.needed(prompt)
        bucket = self.config.prompt_bucket if pads else 1
        state = self._layout(request, bucket)
        widths = (  # the cache widths `_layout` sized the token buffers for
            state.tokens.shape[1] - 1,
            state.d_tokens.shape[1] - self.slots_per_round(request.num_draft_tokens),
        )
        key = None
        if reusable:  # everything the captured stages take from the request as Python values or shapes
            key = (tuple(state.tokens.shape), tuple(state.d_tokens.shape), request.max_new_tokens,
                   request.num_draft_tokens, request.sampling, request.eos_token_ids, request.confidence_threshold,
                   request.cascade, request.alphas, request.kept_logits, request.processing, request.lookup_ngram,
                   learner is not None and learner.enabled)  # fmt: skip
        if reusable:
            weights = tuple(model.weights for model in self._models)
            if weights != self._weights:  # cast, reloaded or rebound: kept stages would read old tensors
                self._kept.release()
                self._weights = weights
        kept = self._kept.take(key) if key is not None else None
        kept_caches = (None,) * len(self._models)
        if kept is not None:
            refill(kept[0], state)
            state, kept_caches = kept
            state.graphs.generator.manual_seed(seed)
        else:
            generator = torch.Generator(device).manual_seed(seed)
            state.graphs = StageGraphs(device, generator, self.config.cuda_graphs)
        for model, first, width, cache in zip(
            self._models, (state.start, state.d_start), widths, kept_caches, strict=False
        ):
            model.begin(first, width, cache)
        if key is not None:
            self._kept.keep(key, state, tuple(model.cache for model in self._models))
        return state

    def check_widths(self, request: Request) -> None:
        """Refuse ``request`` where it needs more cache slots than a model right only within a width serves
        (``CausalLM.check_width``): before anything is drawn, built or cached for it. Such a model's prompts
        are not padded (``begin``): these are the widths ``_layout`` sizes the token buffers for."""
        if all(model.width_limit is None for model in self._models):
            return
        widths = [self._target_slots(request, bucket=1)]
        if self.drafter is not None:
            counts = self._spelled_prompt(request)[1]
            widths.append(self._drafter_slots(request, self._drafter_prompt(counts, bucket=1)))
        for model, width in zip(self._models, widths, strict=True):
            model.check_width(width)

    @staticmethod
    def _target_slots(request: Request, bucket: int) -> int:
        """The target's cache width for ``request``: a dummy slot, the prompt padded to a multiple of
        ``bucket``, the new tokens and a draft's overrun."""
        width = request.input_ids.shape[1]
        return 1 + width + -width % bucket + request.max_new_tokens + request.num_draft_tokens

    def end(self, state: RequestState, failed: bool) -> None:
        """After a request: release its graphs unless they are kept for later requests (``begin``); a
        request that failed keeps nothing. The models let go of their caches (kept ones live on in
        ``KeptStates``)."""
        if failed:
            self._kept.drop(state)
        if not self._kept.holds(state):
            state.graphs.close()
        for model in self._models:
            model.end()

    @property
    def _models(self) -> tuple[CausalLM, ...]:
        """The target, then the drafter if there is one."""
        return (self.target,) if self.drafter is None else (self.target, self.drafter)

    def release(self) -> None:
        """Free the states, caches and graphs kept for later requests (``begin``)."""
        self._kept.release()

    def rounds_per_sync(self, request: Request) -> int:
        """Rounds between two host reads for ``request``: ``EngineConfig.rounds_per_sync``, at most
        ``max_new_tokens`` (a round emits a token or more per running row, so every row is done by then)."""
        return min(self.config.rounds_per_sync, request.max_new_tokens)

    def _layout(self, request: Request, bucket: int) -> RequestState:
        """Fresh device state for ``request`` (its ``graphs`` still to be set): the prompt left-padded to a
        multiple of ``bucket`` tokens, the drafter's spelled prompt too (``EngineConfig.prompt_bucket``)."""
        device, k, new = request.input_ids.device, request.num_draft_tokens, request.max_new_tokens
        batch, width = request.input_ids.shape
        pad = -width % bucket
        prompt = width + pad
        slots = self._target_slots(request, bucket)
        tokens = torch.zeros(batch, slots + 1, dtype=torch.int64, device=device)
        tokens[:, 1 + pad : 1 + prompt] = request.input_ids
        start = 1 + prompt - request.prompt_lengths.to(device)

        if self.drafter is None:  # prompt lookup drafts from `tokens`: no drafter context
            d_tokens = torch.zeros(batch, 0, dtype=torch.int64, device=device)
            d_start, d_lengths = torch.zeros(2, batch, dtype=torch.int64, device=device)
            window = 0
        else:
            d_tokens, d_start, d_lengths, window = self._drafter_layout(request, bucket)
        # q as each draft was sampled, for speculative sampling (verification by exact match reads none)
        vocab_q = 0 if self._exact_match(request) else self.drafter.vocab_size
        spelling_width = self.spelling_width
        length = self._draft_length(request, batch)
        drafted = None  # rows drafting fewer than k: draft-length control's count, or prompt lookup's
        if length is not None:
            drafted = length.drafted
        elif self.drafter is None:
            drafted = torch.zeros(batch, dtype=torch.int64, device=device)
        return RequestState(
            tokens=tokens,
            pad=pad,
            lengths=torch.full((batch,), 1 + prompt, dtype=torch.int64, device=device),
            start=start,
            generated=torch.zeros(batch, dtype=torch.int64, device=device),
            done=torch.zeros(batch, dtype=torch.bool, device=device),
            eos_ids=torch.tensor(request.eos_token_ids, dtype=torch.int64, device=device),
            d_tokens=d_tokens,
            d_start=d_start,
            d_lengths=d_lengths,
            window=window,
            units=self._units(request),
            draft_ids=torch.zeros(batch, k, dtype=torch.int64, device=device),
            draft_probs=torch.zeros(batch, k, vocab_q, dtype=torch.float32, device=device),
            draft_probs_t1=torch.zeros(batch, k, vocab_q, dtype=torch.float32, device=device)
            if request.cascade is not None
            and request.processing.draw(request.sampling) != SamplingParams(temperature=1.0)
            else None,
            rule=None
            if request.cascade is None
            else torch.full((batch,), RULES.index(request.cascade.rule), dtype=torch.int64, device=device),
            alpha=None
            if request.cascade is None
            else torch.tensor(request.alphas, dtype=torch.float32, device=device),
            counters=torch.zeros(len(COUNTERS), dtype=torch.int64, device=device),
            recorder=None
            if self.learner is None or not self.learner.enabled
            else self.learner.recorder(
                batch,
                d_tokens.shape[1],
                spelling_width,
                new + k + 1,
                self.target.dtype,
                d_lengths.clone(),
                request.sampling,
            ),
            processors=self._processors(request, tokens, start),
            # the rounds between two host reads commit at most rounds_per_sync * (k + 1) tokens a row
            kept_logits=KeptLogits(
                request.kept_logits,
                batch,
                self.rounds_per_sync(request) * (k + 1),
                self.target.vocab_size,
                new,
                device,
            ),
            invalid=torch.zeros(batch, dtype=torch.bool, device=device),
            ran=torch.zeros((), dtype=torch.bool, device=device),
            flags=torch.zeros(3, dtype=torch.int64, device=device),
            draft_length=length,
            drafted=drafted,
            graphs=None,  # set by begin
        )

    def _drafter_layout(
        self, request: Request, bucket: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """The drafter's context for ``request``: ``d_tokens``, ``d_start``, ``d_lengths`` and ``window``
        (``RequestState``)."""
        device, k = request.input_ids.device, request.num_draft_tokens
        batch = request.input_ids.shape[0]
        # The drafter's context: the prompt spelled in drafter tokens (context-free, through the bridge),
        # below it `window - 1` dummy slots so that its first step can always re-feed `window` tokens.
        window = self.spelling_width + 1
        pieces, counts = self._spelled_prompt(request)
        d_prompt = self._drafter_prompt(counts, bucket)
        d_tokens = torch.zeros(
            batch,
            self._drafter_slots(request, d_prompt) + self.slots_per_round(k),
            dtype=torch.int64,
            device=device,
        )
        # ... right-aligned at the end of the drafter's prompt: a row's n-th piece at d_start + n - 1, written by
        # one scatter (no boolean indexing, whose nonzero is a host read each); a column without a piece
        # writes 0 at slot 0, a dummy slot (d_start >= window - 1 >= 1) that holds 0.
        end = window - 1 + d_prompt
        d_start = end - counts
        spelled = pieces >= 0
        slots = torch.where(spelled, d_start[:, None] - 1 + spelled.cumsum(1), 0)
        d_tokens.scatter_(1, slots, pieces.clamp_min(0).long())
        d_lengths = torch.full((batch,), end, dtype=torch.int64, device=device)
        return d_tokens, d_start, d_lengths, window

    def _spelled_prompt(self, request: Request) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's prompt spelled in drafter tokens at once: the pieces of its prompt tokens
        ([batch, width * pieces], -1 where none) and how many there are [batch]."""
        width = request.input_ids.shape[1]
        in_prompt = (
            torch.arange(width, device=request.input_ids.device)
            >= width - request.prompt_lengths.to(request.input_ids.device)[:, None]
        )
        pieces = request.input_ids[..., None] if self.bridge is None else self.bridge.t2ds[request.input_ids]
        pieces = torch.where(in_prompt[..., None], pieces, -1).flatten(1)
        return pieces, (pieces >= 0).sum(1)

    @staticmethod
    def _drafter_prompt(counts: torch.Tensor, bucket: int) -> int:
        """Slots of the drafter's prompt: the longest spelled prompt (``counts``), at least 1, padded to a
        multiple of ``bucket``; a host read."""
        d_prompt = max(1, int(counts.max()) if counts.numel() else 1)
        return d_prompt + -d_prompt % bucket

    def _drafter_slots(self, request: Request, d_prompt: int) -> int:
        """The drafter's cache width for ``request`` behind a ``d_prompt``-slot prompt: the dummy slots below
        it (``_drafter_layout``), and each committed target token appends at most `per_token` drafter tokens
        (its spelling, or the drafted run an n-gram merge took for it: up to the table's key length, past
        `max_spelling` when that is shorter), the last round up to k + 1 of them; then drafting writes k - 1
        slots past the end."""
        k, new, spelling_width = request.num_draft_tokens, request.max_new_tokens, self.spelling_width
        per_token = spelling_width if self.ngram is None else max(spelling_width, min(self.ngram.max_len, k))
        return spelling_width + d_prompt + per_token * (new + k) + k

    def _processors(self, request: Request, tokens: torch.Tensor, start: torch.Tensor) -> Processors | None:
        """The request's logits processing (``Request.processing``); None if it has none."""
        prompt = request.input_ids.shape[1]
        if not request.processing.needed(prompt):
            return None
        return Processors(
            request.processing,
            sampling=request.sampling,
            eos_ids=torch.tensor(request.eos_token_ids, dtype=torch.int64, device=tokens.device),
            tokens=tokens,
            start=start,
            prompt=prompt,
            vocab=self.target.vocab_size,
            max_new_tokens=request.max_new_tokens,
        )

    def _draft_length(self, request: Request, batch: int) -> DraftLength | None:
        """The request's adaptive stopping state: the acceptance head's rule (``EngineConfig.adaptive``) and/or
        the drafter-confidence rule (``Request.confidence_threshold``); None when neither is on."""
        head = None if self.learner is None else self.learner.head
        if head is None and request.confidence_threshold is None:
            return None
        adaptive = self.config.adaptive
        gamma, k_min = (adaptive.gamma, min(adaptive.k_min, request.num_draft_tokens)) if head else (1.0, 1)
        device = request.input_ids.device
        return DraftLength(head, batch, gamma, k_min, device, confidence=request.confidence_threshold)

    def prefill(self, state: RequestState, request: Request, timer: StageTimer) -> None:
        """Both models over the prompt: each cache gets every committed slot below the ones its first round
        rewrites."""
        batch, prompt = request.input_ids.shape[0], request.input_ids.shape[1] + state.pad
        with timer("prefill"):
            contexts = [(self.target, state.tokens, prompt)]
            if self.drafter is not None:
                contexts.append(
                    (self.drafter, state.d_tokens, max(1, int(state.d_lengths[0]) - state.window))
                )
            for model, tokens, end in contexts:
                slots = torch.arange(end, device=tokens.device).expand(batch, end)
                model.forward(tokens[:, :end], slots, last_only=True)

    def run(self, state: RequestState, request: Request, timer: StageTimer) -> None:
        """One round over fixed-shape device tensors: k draft steps, then ``_finish`` (translate, target
        forward, verify, commit, learn). ``state.graphs`` runs them as captured stages (``graphs.py``): the
        whole round as one, or with an adaptive draft length each draft step and the rest; without a
        drafter, the lookup and the rest, as wide as the round's longest draft."""
        k = request.num_draft_tokens
        length = state.draft_length
        if self.drafter is None:  # prompt lookup: the round as wide as its longest draft
            state.graphs.run("lookup", partial(self._lookup, state, request), timer, "draft")
            # Prompt lookup's own read: a round where no row found a match is one target step, not k + 1
            # (as transformers' prompt lookup decodes one token then); at least one drafted position.
            steps = max(1, int(state.drafted.max()))
            state.graphs.run(("finish", steps), partial(self._finish, state, request, steps), timer, "finish")
            return
        if length is None:
            self.run_unit(state, request, timer, 1)
            return
        steps = k
        for i in range(k):
            step = partial(self._draft_step, state, request, i)
            state.graphs.run(("draft", i), step, timer, "draft")
            # Adaptive drafting's own read, once per draft step (SPEC §5): stop when every row has.
            if i + 1 < k and bool(length.stopped.all()):
                steps = i + 1
                break
        finish = partial(self._finish, state, request, steps)
        state.graphs.run(("finish", steps), finish, timer, "finish")

    def run_unit(
        self,
        state: RequestState,
        request: Request,
        timer: StageTimer,
        count: int,
        learn: Callable[[StageTimer], None] | None = None,
        learn_after: tuple[int, ...] = (),
    ) -> None:
        """``count`` whole rounds back to back as one stage, with ``learn`` (the in-flight learning step)
        after each round listed in ``learn_after``: no host read in between (``EngineConfig.rounds_per_sync``).
        An acceptance head's rows stop proposing as usual, but every round runs all k draft steps."""
        k = request.num_draft_tokens

        def unit(timer: StageTimer) -> None:
            for r in range(count):
                if self.drafter is None:
                    self._lookup(state, request, timer)
                else:
                    for i in range(k):
                        self._draft_step(state, request, i, timer)
                self._finish(state, request, k, timer)
                if r in learn_after:
                    learn(timer)

        key = "round" if count == 1 and not learn_after else ("rounds", count, learn_after)
        state.graphs.run(key, unit, timer, "round" if count == 1 else "rounds")

    def _lookup(self, state: RequestState, request: Request, timer: StageTimer) -> None:
        """Without a drafter: every row's draft copied from its own context (``kernels/lookup.py``); rows that are
        done propose nothing."""
        with timer("draft"):
            state.invalid.zero_()
            ids, drafted = ops.lookup(
                state.tokens, state.start, state.lengths, request.num_draft_tokens, request.lookup_ngram
            )
            state.draft_ids.copy_(ids)
            state.drafted.copy_(torch.where(state.done, 0, drafted))

    def _draft_step(self, state: RequestState, request: Request, i: int, timer: StageTimer) -> None:
        """Draft token ``i`` of the round for every row: ``state.draft_ids[:, i]`` and its distribution."""
        sampling = request.sampling
        device = state.tokens.device
        length = state.draft_length
        # Token-level intersection: the drafter proposes only tokens the target has.
        shared_only = self.bridge.mappable if self.mode == "tli" else None
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
            head = length is not None and length.head is not None
            if head:
                logits, hidden = self.drafter.forward(inputs, slots, last_only=True, hidden=True)
                logits = logits[:, -1]
            else:
                logits = self.drafter.forward(inputs, slots, last_only=True)[:, -1]  # [batch, V_d]
            state.invalid |= ops.nonfinite_rows(logits)
            raw = logits  # what the acceptance head reads (it learns from the drafter's own logits)
            draw = sampling
            if state.processors is not None and self.bridge is None:
                # One vocabulary: the drafter drafts from its logits processed as the target's are at this
                # position (the same context), as transformers' assisted generation processes its assistant's.
                logits = self._processed(state, logits, state.draft_ids[:, :i], i)
                draw = request.processing.draw(sampling)
            elif state.processors is not None and not request.processing.warps:
                logits = self._processed_across(state, logits, i, shared_only)
            noise = None if sampling.greedy else _exponential(logits.shape, state.graphs.generator, device)
            # Verification by exact match reads no q; a confidence threshold reads the drafted token's q when
            # sampling (at T=1 from the logits when greedy). Without either, the draw is ids only.
            exact_match = self._exact_match(request)
            confident = length is not None and length.confidence is not None
            ids, probs = ops.sample(
                logits,
                noise,
                temperature=draw.temperature,
                top_k=draw.top_k,
                top_p=draw.top_p,
                mask=shared_only,
                probs=not exact_match or (confident and not sampling.greedy),
            )
            state.draft_ids[:, i] = ids
            # A row that stopped drafting (draft-length control) proposes nothing here: q = 0, so that
            # verification draws a token at this position from the target's own law (kernels/verify.py).
            if not exact_match:
                state.draft_probs[:, i] = (
                    probs if length is None else torch.where(length.stopped[:, None], 0.0, probs)
                )

            def law_t1() -> torch.Tensor:
                """[batch, V_d] the drafter's T=1 distribution over what it may draft."""
                z = logits.float()
                return (z if shared_only is None else z.masked_fill(~shared_only, -torch.inf)).softmax(-1)

            if state.draft_probs_t1 is not None:  # the rules' T=1 statistics (CascadeConfig)
                state.draft_probs_t1[:, i] = law_t1()
            if length is not None:  # adaptive draft length: rows stop on the head's estimate or on confidence
                confidence = None
                if confident:  # the drafted token's probability (T=1 when greedy)
                    confidence = (law_t1() if sampling.greedy else probs).gather(1, ids[:, None])[:, 0]
                head_input = (  # the head's confidence input (AdaptiveConfig.confidence_input)
                    confidence_logit(raw, ids) if head and length.head.confidence_input else None
                )
                length.step(i + 1, hidden[:, -1] if head else None, confidence, head_input)

    def _processed(
        self, state: RequestState, logits: torch.Tensor, drafted: torch.Tensor, i: int
    ) -> torch.Tensor:
        """[batch, V_t] ``logits`` over the target's vocabulary at draft step ``i`` after the request's
        processing at that position (its context: the committed tokens, then ``drafted`` [batch, i], the
        target ids drafted before it, -1 where unknown). A row the processing leaves no token (a grammar's
        dead state after a drafted token, ``processors.py``) keeps its own logits: the target's law is dead
        there too, so no token is emitted from that position."""
        processed = state.processors(logits[:, None], drafted, state.generated, ~state.done, i)[:, 0]
        return torch.where(processed.amax(-1, keepdim=True).isneginf(), logits.float(), processed)

    def _processed_across(
        self, state: RequestState, logits: torch.Tensor, i: int, allowed: torch.Tensor | None
    ) -> torch.Tensor:
        """[batch, V_d] a drafter with another vocabulary: its ``logits`` at draft step ``i`` processed through
        the twins (drafter ids that spell one target token), so that what the processing forbids or favours
        is drafted less or more. The twins' logits are laid on their target ids (a split token's first piece
        that has no twin takes the largest of its split tokens' logits, so that the processing judges it too;
        the others at -inf) and processed there at the position the step would have if each drafted token
        were one target token; a
        canonical twin takes its target id's processed logit, and a token whose first target token (a
        duplicate twin's, a split token's first piece) the processing forbids is masked. Other drafter ids
        keep their logits, as does a row with a token before this one that has no twin (its context is
        unknown) or that the processing would leave nothing to draft (``allowed``: the TLI mask). An
        approximation of the processed law: exact verification reads the law the drafter drew from, so its
        outputs follow the target's law as without it; a cascade keeps drafts from it (only where the
        processed target logits are finite: ``kernels/verify.py``'s ``support_only``)."""
        to_drafter, has_twin, to_target, has_target, canonical, lone, lone_first = self._twins
        batch = logits.shape[0]
        logits = logits.float()
        drafted = state.draft_ids[:, :i]
        drafted = torch.where(self.bridge.mappable[drafted], to_target[drafted], -1)  # [batch, i] target ids
        on_target = logits.gather(1, to_drafter.expand(batch, -1)).masked_fill(~has_twin, -torch.inf)
        if lone.numel():  # a first piece with no twin gets its split tokens' largest logit, to be judged
            on_target = on_target.scatter_reduce(1, lone_first.expand(batch, -1), logits[:, lone], "amax")
        back = self._processed(state, on_target, drafted, i).gather(1, to_target.expand(batch, -1))
        forbidden = has_target & back.isneginf()
        processed = torch.where(canonical, back, logits.masked_fill(forbidden, -torch.inf))
        left = processed if allowed is None else processed.masked_fill(~allowed, -torch.inf)
        keep = (drafted >= 0).all(1, keepdim=True) & ~left.amax(-1, keepdim=True).isneginf()
        return torch.where(keep, processed, logits)

    def _finish(self, state: RequestState, request: Request, steps: int, timer: StageTimer) -> None:
        """The rest of a round whose rows drafted ``steps`` tokens (at most): translate, target forward,
        verify, commit, learn."""
        sampling = request.sampling
        batch = state.tokens.shape[0]
        device = state.tokens.device
        active = ~state.done
        state.ran.copy_(active.any())
        drafted = state.drafted  # [batch] tokens each row drafted (None: k)
        draft_ids = state.draft_ids[:, :steps]
        draft_probs = state.draft_probs[:, :steps]
        draft_probs_t1 = None if state.draft_probs_t1 is None else state.draft_probs_t1[:, :steps]

        with timer("translate"):
            cross = None
            if self.bridge is None:
                source = torch.arange(steps, device=device).expand(batch, steps)
                span_end = source + 1
                # A row proposes only its own draft.
                proposal = (
                    draft_ids if drafted is None else torch.where(source < drafted[:, None], draft_ids, -1)
                )
            else:
                bridge, splits = self.bridge, state.units is not None
                proposal, _, source, span_end = ops.translate(
                    draft_ids,
                    state.units if splits else bridge.d2t,
                    table=None if self.ngram is None else self.ngram.tensors,
                    splits=(bridge.d2ts, bridge.d2ts_len, bridge.target_vocab_size) if splits else None,
                    drafted=drafted,  # nothing past a row's own draft
                )
                # (verification by exact match reads no q)
                laws = (None if self._exact_match(request) else draft_probs, draft_probs_t1)
                # Each drafted token's own probability, read before folding: an n-gram merge's proposal
                # probability is the product of these along its span (kernels/proposal.py).
                paths = [None if probs is None else drafted_path(probs, draft_ids) for probs in laws]
                # a merge takes its mass from where its first drafted token's sits (a split token's: its first piece)
                first_of = bridge.proposal_d2t if splits else bridge.d2t
                cross = CrossProposal(draft_ids, source, span_end, first_of, bridge.t2d, *paths)
                for probs in laws:
                    if probs is not None:
                        fold_twins_(probs, bridge.twins)
                        if splits:  # a split token's mass goes to its first piece (kernels/proposal.py)
                            fold_twins_(probs, bridge.split_twins)

        with timer("target"):
            slots = state.lengths[:, None] - 1 + torch.arange(steps + 1, device=device)  # [batch, steps+1]
            inputs = torch.cat([state.tokens.gather(1, slots[:, :1]), proposal.clamp_min(0)], 1)
            target_logits = self.target.forward(inputs, slots)  # [batch, steps+1, V_t]

        with timer("verify"):
            exact_match = self._exact_match(request)
            generator = state.graphs.generator  # the request's (registered with its captured stages)
            uniforms = torch.rand(batch, steps, generator=generator, device=device)
            vocab = target_logits.shape[-1]
            noise_shape = (batch, steps + 1, vocab) if exact_match else (batch, vocab)
            noise = None if sampling.greedy else _exponential(noise_shape, generator, device)
            processed = (  # what transformers' logits processors make of them (processors.py)
                target_logits
                if state.processors is None
                else state.processors(target_logits, proposal, state.generated, active)
            )
            target_sampling = request.processing.draw(sampling)
            # Across vocabularies the drafter's law reaches the processors only through its twins: a cascade
            # keeps its proposal only where the processed target logits are finite (kernels/verify.py).
            support_only = cross is not None and request.cascade is not None and state.processors is not None
            num_accepted, output_tokens, accept_probs, deferred, target_invalid = ops.verify(
                processed,
                proposal,
                None if exact_match else draft_probs,
                uniforms,
                noise,
                temperature=target_sampling.temperature,
                top_k=target_sampling.top_k,
                top_p=target_sampling.top_p,
                rule=state.rule,
                alpha=state.alpha,
                # a request's one rule (part of the kept graphs' key): the reference computes only it
                rules=None if request.cascade is None else (RULES.index(request.cascade.rule),),
                draft_probs_t1=draft_probs_t1,
                cross=cross,
                exact_match=exact_match,
                support_only=support_only,
            )

        with timer("commit"):
            # before this round: what the recorder and the kept logits (if any) index by
            generated = (
                state.generated.clone() if state.recorder is not None or state.kept_logits.names else None
            )
            d_lengths = state.d_lengths.clone() if state.recorder is not None else None
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
            # Unusable target logits count where a kept token came from: positions past the row's budget, an
            # EOS or the first rejection are never emitted (there, a drafted context can leave no token allowed).
            kept_positions = torch.arange(steps + 1, device=device) < kept[:, None]  # [batch, steps + 1]
            invalid = (state.invalid | (target_invalid & kept_positions).any(1)) & active
            if state.processors is not None:
                state.processors.observe(output_tokens, kept)
            # output_logits / output_scores: the target's logits at the kept tokens
            for name, values in (("logits", target_logits), ("scores", processed)):
                state.kept_logits.record(name, values, generated, kept)
            # The drafted tokens each row keeps (with one vocabulary, one per accepted position)
            drafter_accepted = num_accepted if self.bridge is None else kept_drafts(span_end, num_accepted)
            # With split tokens, every output token's spelling: the feedback's, and the n-gram keys' (learn)
            spelled = self.spell(output_tokens.clamp_min(0).flatten()) if state.units is not None else None
            if self.drafter is not None:  # the drafter's context follows the target's
                fed = feedback(
                    output_tokens, num_accepted, source, active, self.spell, self.spelling_width,
                    drafted=drafter_accepted, spelled=spelled,
                )  # fmt: skip
                ops.commit_drafter(
                    state.d_tokens,
                    state.d_lengths,
                    draft_ids,
                    drafter_accepted,
                    fed.spelling,
                    fed.lengths.sum(1),
                    active,
                )
            drafter_proposed = drafted * active if drafted is not None else active.long() * steps
            split = (
                self._split(draft_ids, proposal, source, span_end)
                if state.units is not None
                else torch.zeros_like(draft_ids, dtype=torch.bool)
            )
            self._count(state, active, invalid, proposal, source, span_end, split, num_accepted, deferred,
                        drafter_proposed, drafter_accepted)  # fmt: skip

        if self.ngram is not None:
            with timer("learn"):  # every emitted target token spelled by 2+ drafter tokens (SPEC §2.2)
                emitted = output_tokens.flatten()  # [batch * (steps + 1)], the positions kept_positions marks
                # (the spelling of a position not emitted, -1 clamped to 0, is never read: no key there)
                spelling, spelled_len = self.spell(emitted.clamp_min(0)) if spelled is None else spelled
                # a spelling its width holds whole (spell: -1 past its ids) of at most max_len ids; of one id, a
                # row inserts skip; a spelling cut to its end, no key
                whole = spelled_len <= min(self.spelling_width, self.ngram.max_len)
                keys = self.ngram.keys_of(spelling, kept_positions.flatten() & whole)
                self.ngram.insert(keys, emitted)
        if state.recorder is not None:
            with timer("learn"):
                state.recorder.record(
                    target_logits=target_logits,
                    draft_ids=draft_ids,
                    proposal=proposal,
                    output_tokens=output_tokens,
                    num_accepted=num_accepted,
                    accept_probs=accept_probs,
                    source=source,
                    span_end=span_end,
                    slots=fed.slots(num_accepted, span_end, active),
                    split=split & ~fed.mask[:, :steps],
                    kept=kept,
                    generated=generated,
                    d_lengths=d_lengths,
                )

    def _exact_match(self, request: Request) -> bool:
        """Whether the request verifies by exact match (``ops.verify(exact_match=True)``, which reads no
        proposal probabilities): ``translation="exact"``, prompt lookup, or a greedy request without a deferral
        rule. Greedy speculative sampling equals exact match (p and q one-hot), in fewer ops and no q to keep;
        greedy requests also split tokens whose first piece has no proposal probability (bridge.units)."""
        return self.mode in ("exact", "lookup") or (request.sampling.greedy and request.cascade is None)

    def _units(self, request: Request) -> torch.Tensor | None:
        """The map drafted tokens go through before merges when this request splits tokens with no target
        twin (``EngineConfig.split_tokens``; None: the paper's stop at such a token). Greedy requests and
        exact-match verification split every token with a target spelling; sampled speculative sampling
        only those whose proposal probability the redistribution can give (their first piece has a drafter
        twin); deferral rules do not split (they would read a split token's later pieces as certain)."""
        bridge = self.bridge
        if (
            bridge is None
            or not self.config.split_tokens
            or self.mode == "tli"
            or request.cascade is not None
        ):
            return None
        return bridge.units if self.mode == "exact" or request.sampling.greedy else bridge.sampled_units

    def _split(
        self, draft_ids: torch.Tensor, proposal: torch.Tensor, source: torch.Tensor, span_end: torch.Tensor
    ) -> torch.Tensor:
        """[batch, k] bool: target positions that are pieces of a split drafted token."""
        return (proposal >= 0) & (self.bridge.d2t[draft_ids.gather(1, source)] < 0) & (span_end - source <= 1)

    @staticmethod
    def _count(
        state, active, invalid, proposal, source, span_end, split, num_accepted, deferred, drafter_proposed,
        drafter_accepted,
    ) -> None:  # fmt: skip
        proposed = (proposal >= 0) & active[:, None]  # [batch, k]
        accepted = proposed & (
            torch.arange(proposal.shape[1], device=proposal.device) < num_accepted[:, None]
        )
        # Two reductions where a sum per counter took a dozen (each op of a round's bookkeeping costs its
        # dispatch): the per-row counts, then each kind of position (proposed, merged, split, deferred) among
        # the proposed and among the accepted ones ([4, 2], the deferred accepted ones not counted), in
        # COUNTERS' order.
        rows = torch.stack([active, drafter_proposed, drafter_accepted * active, invalid]).sum(1)  # [4] int64
        kinds = torch.stack([proposed, span_end - source >= 2, split, deferred])[:, None]  # [4, 1, batch, k]
        positions = (kinds & torch.stack([proposed, accepted])).sum((2, 3)).flatten()  # [8]
        # state.ran: whether the round had an active row (set as it began)
        state.counters += torch.cat([state.ran[None], rows, positions[:7]])
        # what the host read after the round takes (RequestState.flags), the round's last writes to them done
        torch.cat(
            [
                state.done.all(0, keepdim=True),
                state.counters[_INVALID : _INVALID + 1],
                state.generated.amax(0, keepdim=True),
            ],
            out=state.flags,
        )


def _exponential(shape, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Exp(1) noise (float32) for the exponential race of ``kernels/sampling.py``. On the CPU as ``-log(U)``
    with ``U`` uniform in float64: 2.7x less time than torch's ``exponential_`` there (a [1, 16384] draw
    102 against 272 us, one thread), and as fine near 0, where the race's rare tokens are decided (a float32
    ``U`` would stop at 6e-8 and starve tokens less likely than that)."""
    if device.type == "cpu":
        return torch.rand(shape, dtype=torch.float64, generator=generator).log_().neg_().float()
    return torch.empty(shape, dtype=torch.float32, device=device).exponential_(generator=generator)
