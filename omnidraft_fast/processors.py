"""The logits processing a request applies to the target inside the round, as transformers does.

transformers' ``generate()`` processes the target's logits at each new token before it samples or takes
the argmax; speculative decoding stays exact when verification uses the target's *processed* logits at
every drafted position, each with the context that position has (the committed tokens, then the block's
drafted tokens before it). The drafter's logits are not processed: its proposal is whatever law it sampled
from, and verification corrects for it. Supported, in transformers' order (``_get_logits_processor``),
where "the sequence" is transformers' ``input_ids`` (the padded prompt, the new tokens, then the drafted
tokens before the position) and "new tokens" counts those before the position:

- ``sequence_bias``: a biased sequence's last token gets the bias when the sequence ends with the rest of
  it (one-token sequences: always);
- ``repetition_penalty``: every token present in the context (the sequence without the prompt's left
  padding, as transformers 5.24 skips it) has its logit ``l`` replaced by ``l * penalty`` if ``l < 0``
  else ``l / penalty``;
- ``no_repeat_ngram_size`` n: a token that would complete an n-gram already present in the sequence gets
  ``-inf``;
- ``bad_words_ids``: ``sequence_bias`` with ``-inf`` (a one-token bad word equal to an EOS id is dropped);
- ``min_length`` / ``min_new_tokens``: EOS ids get ``-inf`` while the sequence / the new tokens are
  shorter;
- ``prefix_allowed_tokens_fn(batch_id, sequence)``: every token it does not list gets ``-inf``
  (``batch_id``: the caller's row, copies of a prompt sharing it);
- ``forced_bos_token_id`` (at a sequence of one token) and ``forced_eos_token_id`` (at the last new token
  ``max_new_tokens`` allows): every other token gets ``-inf``, the forced ones 0;
- ``remove_invalid_values``: NaN becomes 0 and +-inf the dtype's extremes;
- ``exponential_decay_length_penalty`` (start, factor): from ``start`` new tokens on, EOS logits ``l``
  grow by ``|l| (factor^(new - start) - 1)``;
- ``suppress_tokens`` (always) and ``begin_suppress_tokens`` (at the first new token; the second after a
  forced BOS on a one-token prompt): ``-inf``;
- the caller's ``logits_processor`` list, after all of the above, called with ``input_ids`` of one row
  (``[1, length]``) and that row's scores at one position;
- sampling only, the warpers besides temperature, top-k and top-p: ``top_h`` (after temperature, before
  top-k), ``min_p``, ``typical_p``, ``epsilon_cutoff``, ``eta_cutoff`` (after top-p), each on the law the
  previous ones left, as transformers applies them. A request with any of them warps the target's logits
  here with the whole chain (transformers' own warpers; top-h and eta as :class:`TopHWarper` and
  :class:`EtaWarper`, without transformers' host reads) and verification then samples that law as it is
  (temperature 1, no filters);
- ``watermarking_config`` (green-list watermarking, ``WatermarkingConfig``): after everything, the
  sampling warpers included (a sampled request with it warps here), transformers' processor called per
  row and position like the caller's.

``renormalize_logits`` changes only the scores a request returns (a final log-softmax), never a token.
Fixed shapes, no host read: the round stays capturable, except with Python per row (the caller's
``prefix_allowed_tokens_fn`` and ``logits_processor``, the watermark), called for each live row at each
position whose context is real (the drafted tokens before it exist), as transformers' assisted generation
calls them at each candidate position; such a request runs eagerly. The tokens each row has seen are kept as a
``[batch, V + 1]`` mask (the last column absorbs padding ids), updated in place at each commit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from typing import Any

import torch
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from .config import SamplingParams, is_number, is_positive

__all__ = ["EtaWarper", "Processing", "TargetProcessors", "TopHWarper", "sampling_warpers"]


def _token_ids(value, name: str, vocab: int) -> tuple[int, ...]:
    """A non-empty list of token ids of the target's vocabulary (one int allowed too)."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    values = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(values, (list, tuple))
        or not values
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    ):
        raise ValueError(f"`{name}` must be a token id or a non-empty list of them, got {value!r}")
    outside = sorted({v for v in values if not 0 <= v < vocab})
    if outside:
        raise ValueError(f"`{name}` holds ids outside the target's vocabulary [0, {vocab}): {outside}")
    return tuple(values)


def _watermark(value):
    """``watermarking_config`` -> a transformers ``WatermarkingConfig`` (a dict is read as one, as
    ``GenerationConfig`` reads it). SynthID's processor keeps state across calls that assumes one call per
    new token, which verifying drafted positions breaks: refused."""
    from transformers.generation import WatermarkingConfig

    if isinstance(value, dict):
        value = WatermarkingConfig.from_dict(value)
    if not isinstance(value, WatermarkingConfig):
        raise ValueError(
            f"`watermarking_config` must be a transformers WatermarkingConfig (green-list watermarking), got "
            f"{type(value).__name__}; SynthID watermarking keeps per-step state that speculative decoding cannot "
            "replay"
        )
    return value


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
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not is_number(pair[1]):
            raise ValueError(f"`{name}` entries must be (token ids, bias number) pairs, got {pair!r}")
        out.append((_token_ids(pair[0], name, vocab), float(pair[1])))
    return tuple(out)


@dataclass(frozen=True)
class Processing:
    """What a request asks of the target's logits besides temperature, top-k and top-p (module docstring).
    The defaults are off; build one from generation fields with :meth:`resolve`."""

    sequence_bias: tuple[tuple[tuple[int, ...], float], ...] = ()
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
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
    copies: int = 1  # num_return_sequences: rows per caller's row (prefix_allowed_tokens_fn's batch_id)
    sampled: bool = False  # the request samples (the watermark then follows the sampling warpers)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The generation-config fields resolved here (request.py honours them)."""
        caller = ("prefix_allowed_tokens_fn", "logits_processor", "copies", "sampled")
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
            out["logits_processor"] = tuple(logits_processor)
        penalty = fields.get("repetition_penalty", 1.0)
        if not is_positive(penalty):
            raise ValueError(f"`repetition_penalty` must be a number > 0 (1.0: off), got {penalty!r}")
        out["repetition_penalty"] = float(penalty)
        for name in ("min_length", "min_new_tokens", "no_repeat_ngram_size"):
            value = fields.get(name, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` must be an int >= 0 (0: off), got {value!r}")
            out[name] = value
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
            if fields.get(name) is not None:
                out[name] = _token_ids(fields[name], name, vocab)
        bos = fields.get("forced_bos_token_id")
        if bos is not None:
            if isinstance(bos, bool) or not isinstance(bos, int):
                raise ValueError(f"`forced_bos_token_id` must be one token id, got {bos!r}")
            out["forced_bos_token_id"] = _token_ids(bos, "forced_bos_token_id", vocab)[0]
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
            ("top_h", 0.0, lambda v: 0 <= v <= 1, "(0, 1] (0 or unset: off)"),
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
        return cls(**out)

    def needed(self, prompt: int) -> bool:
        """Whether a request with a ``prompt``-wide padded prompt processes the target's logits at all."""
        off = Processing()
        return (
            any(
                getattr(self, name) != getattr(off, name)
                for name in self.field_names()
                if name not in ("min_length", "renormalize_logits")
            )
            or self.min_length > prompt
            or self.calls_python
        )

    @property
    def calls_python(self) -> bool:
        """Whether the round calls Python per row and position (which no CUDA graph can hold): the
        caller's processors, or transformers' watermarking."""
        return (
            self.prefix_allowed_tokens_fn is not None
            or bool(self.logits_processor)
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


def sampling_warpers(
    sampling: SamplingParams, processing: Processing | None = None, device: torch.device | None = None
) -> LogitsProcessorList:
    """transformers' sampling warpers for a request, in its order: temperature, (with ``processing``) top-h,
    top-k, top-p, then (with ``processing``) min-p, typical, epsilon and eta. Greedy: none."""
    chain = []
    if not sampling.greedy:
        if sampling.temperature != 1.0:
            chain.append(TemperatureLogitsWarper(sampling.temperature))
        if processing is not None and processing.top_h > 0:
            chain.append(TopHWarper(processing.top_h))
        if sampling.top_k:
            chain.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1.0:
            chain.append(TopPLogitsWarper(sampling.top_p))
        if processing is not None:
            if processing.min_p > 0:
                chain.append(MinPLogitsWarper(processing.min_p))
            if processing.typical_p < 1:
                chain.append(TypicalLogitsWarper(processing.typical_p))
            if processing.epsilon_cutoff > 0:
                chain.append(EpsilonLogitsWarper(processing.epsilon_cutoff))
            if processing.eta_cutoff > 0:
                chain.append(EtaWarper(processing.eta_cutoff, device or torch.device("cpu")))
    return LogitsProcessorList(chain)


class TopHWarper(LogitsProcessor):
    """transformers' ``TopHLogitsWarper`` (top-H sampling: of the 100 likeliest tokens, those in order of
    probability while their cumulative entropy stays within ``top_h`` times the entropy of those 100,
    at least one) without its host reads (a ``torch.distributions.Categorical``, which checks its
    argument on the host, and a boolean-mask assignment). The same arithmetic, written out."""

    def __init__(self, top_h: float):
        self.top_h = top_h

    def __call__(self, input_ids: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
        top_logits, top_ids = scores.topk(min(100, scores.shape[-1]), dim=-1)
        normalised = top_logits - top_logits.logsumexp(-1, keepdim=True)
        probs = normalised.softmax(-1)
        entropy = -(normalised.clamp(min=torch.finfo(normalised.dtype).min) * probs).sum(-1, keepdim=True)
        selected = torch.cumsum(-probs * torch.log(probs), -1) <= entropy * self.top_h
        selected[..., 0] = True
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top_ids, selected)
        return scores.masked_fill(~keep, -torch.inf)


class EtaWarper(LogitsProcessor):
    """transformers' ``EtaLogitsWarper`` (one token kept at least) without its host read: it takes the
    entropy from a ``torch.distributions.Categorical``, which checks its argument on the host, a sync
    inside the round that no CUDA graph can hold. The same arithmetic, written out."""

    def __init__(self, epsilon: float, device: torch.device):
        self.epsilon = torch.tensor(epsilon, device=device)

    def __call__(self, input_ids: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
        probabilities = scores.softmax(-1)
        normalised = (scores - scores.logsumexp(-1, keepdim=True)).clamp(min=torch.finfo(scores.dtype).min)
        entropy = -(normalised * probabilities).sum(-1)
        eta = torch.min(self.epsilon, torch.sqrt(self.epsilon) * torch.exp(-entropy))[..., None]
        remove = (probabilities < eta) & (scores < scores.amax(-1, keepdim=True))
        return scores.masked_fill(remove, -torch.inf)


@dataclass(frozen=True)
class _Table:
    """Biased token sequences in fixed shapes: one-token biases as a [V] vector, longer ones as prefixes
    right-aligned in [S, W] (-1: any token), with their last token and bias."""

    single: torch.Tensor  # [V] float32
    prefixes: torch.Tensor  # [S, W] int64
    prefix_lengths: torch.Tensor  # [S]
    last: torch.Tensor  # [S]
    bias: torch.Tensor  # [S] float32

    @classmethod
    def build(cls, pairs, vocab: int, device: torch.device) -> _Table:
        single = torch.zeros(vocab, dtype=torch.float32)
        longer = []
        for ids, bias in pairs:
            if len(ids) == 1:
                single[ids[0]] = bias  # a later entry for the same id wins, as in transformers' dict
            else:
                longer.append((ids, bias))
        width = max((len(ids) - 1 for ids, _ in longer), default=0)
        prefixes = torch.tensor([[-1] * (width + 1 - len(ids)) + list(ids[:-1]) for ids, _ in longer],
                                dtype=torch.int64).view(len(longer), width)  # fmt: skip
        return cls(
            single.to(device),
            prefixes.to(device),
            torch.tensor([len(ids) - 1 for ids, _ in longer], dtype=torch.int64, device=device),
            torch.tensor([ids[-1] for ids, _ in longer], dtype=torch.int64, device=device),
            torch.tensor([bias for _, bias in longer], dtype=torch.float32, device=device),
        )

    @property
    def width(self) -> int:
        return self.prefixes.shape[1]


class TargetProcessors:
    """A request's target-side processing (:class:`Processing`; the module docstring).

    Args:
        tokens: [batch, slots + 1] the request's committed tokens by slot (``RequestState.tokens``).
        start: [batch] each row's first prompt slot; prompt: the padded prompt width; vocab: V_t.
    """

    def __init__(
        self,
        processing: Processing,
        *,
        sampling: SamplingParams,
        eos_ids: torch.Tensor,
        tokens: torch.Tensor,
        start: torch.Tensor,
        prompt: int,
        vocab: int,
        max_new_tokens: int,
    ):
        self.processing, self.tokens, self.prompt, self.vocab = processing, tokens, prompt, vocab
        self.max_new_tokens = max_new_tokens
        batch, device = tokens.shape[0], tokens.device

        def mask(ids) -> torch.Tensor:  # [V] bool
            out = torch.zeros(vocab, dtype=torch.bool, device=device)
            out[torch.as_tensor(ids, dtype=torch.int64, device=device)] = True
            return out

        def forcing(ids) -> torch.Tensor:  # [V] the scores that force ``ids``: 0 there, -inf elsewhere
            return torch.zeros(vocab, device=device).masked_fill(~mask(ids), -torch.inf)

        self.eos_ids = eos_ids[eos_ids < vocab].unique()
        self.eos = mask(self.eos_ids)
        p = processing
        self.sequence_bias = _Table.build(p.sequence_bias, vocab, device) if p.sequence_bias else None
        self.bad_words = (
            _Table.build([(word, -torch.inf) for word in p.bad_words_ids], vocab, device)
            if p.bad_words_ids
            else None
        )
        self.forced_bos = None if p.forced_bos_token_id is None else forcing([p.forced_bos_token_id])
        self.forced_eos = forcing(p.forced_eos_token_id) if p.forced_eos_token_id else None
        self.suppress = mask(p.suppress_tokens) if p.suppress_tokens else None
        self.begin_suppress = mask(p.begin_suppress_tokens) if p.begin_suppress_tokens else None
        # new tokens before the position where begin_suppress_tokens applies (transformers' begin_index)
        self.begin = 1 if prompt == 1 and p.forced_bos_token_id is not None else 0
        self.warpers = sampling_warpers(sampling, p, device) if p.warps else None
        self.watermark = (
            None
            if p.watermarking_config is None
            else p.watermarking_config.construct_processor(vocab, device)
        )
        self.seen = None
        if p.repetition_penalty != 1.0:
            slots = torch.arange(1, 1 + prompt, device=device)
            ids = torch.where(slots >= start[:, None], tokens[:, 1 : 1 + prompt], vocab).clamp(0, vocab)
            self.seen = torch.zeros(batch, vocab + 1, dtype=torch.bool, device=device)
            self.seen.scatter_(1, ids, True)

    def __call__(
        self,
        logits: torch.Tensor,  # [batch, n, V] the target's logits at the block's positions
        proposal: torch.Tensor,  # [batch, n - 1] the drafted target ids at positions 1..n-1, -1 where none
        generated: torch.Tensor,  # [batch] new tokens before the block's first position
        active: torch.Tensor,  # [batch] rows still generating (the caller's Python sees only those)
    ) -> torch.Tensor:  # [batch, n, V] processed, fp32 as transformers processes them (a new tensor)
        p = self.processing
        logits = logits.float()
        batch, n, vocab = logits.shape
        new = generated[:, None] + torch.arange(n, device=logits.device)  # [batch, n] new tokens before each
        sequence = self._sequence(proposal, generated, n) if self._reads_sequence else None
        calls = self._calls(proposal, new, active) if p.calls_python else None
        if self.sequence_bias is not None:
            logits = logits + self._bias(self.sequence_bias, sequence, new)
        if self.seen is not None:
            logits = self._penalise(logits, proposal)
        if p.no_repeat_ngram_size:
            logits = logits.masked_fill(self._repeats(sequence, new)[..., :vocab], -torch.inf)
        if self.bad_words is not None:
            logits = logits + self._bias(self.bad_words, sequence, new)
        if p.min_length > self.prompt or p.min_new_tokens:
            short = (self.prompt + new < p.min_length) | (new < p.min_new_tokens)
            logits = logits.masked_fill(short[..., None] & self.eos, -torch.inf)
        if p.prefix_allowed_tokens_fn is not None:
            logits = self._call_python(logits, sequence, calls, self._allowed)
        if self.forced_bos is not None:
            logits = torch.where((self.prompt + new == 1)[..., None], self.forced_bos, logits)
        if self.forced_eos is not None:
            logits = torch.where((new == self.max_new_tokens - 1)[..., None], self.forced_eos, logits)
        if p.remove_invalid_values:
            finfo = torch.finfo(logits.dtype)
            logits = torch.nan_to_num(logits, nan=0.0, posinf=finfo.max, neginf=finfo.min)
        if p.exponential_decay_length_penalty is not None:
            logits = self._decay(logits, new)
        if self.suppress is not None:
            logits = logits.masked_fill(self.suppress, -torch.inf)
        if self.begin_suppress is not None:
            logits = logits.masked_fill((new == self.begin)[..., None] & self.begin_suppress, -torch.inf)
        for processor in p.logits_processor:
            logits = self._call_python(
                logits, sequence, calls, lambda row, ids, scores, processor=processor: processor(ids, scores)
            )
        if self.warpers is not None:
            logits = self.warpers(None, logits.flatten(0, 1)).view(batch, n, vocab)
        if self.watermark is not None:  # after every warper, as transformers places it
            logits = self._call_python(
                logits, sequence, calls, lambda row, ids, scores: self.watermark(ids, scores)
            )
        return logits

    @property
    def _reads_sequence(self) -> bool:
        p, tables = self.processing, (self.sequence_bias, self.bad_words)
        return (
            bool(p.no_repeat_ngram_size) or p.calls_python or any(t is not None and t.width for t in tables)
        )

    def _calls(
        self, proposal: torch.Tensor, new: torch.Tensor, active: torch.Tensor
    ) -> list[tuple[int, int, int]]:
        """(row, position, context length) at every live row's positions whose context is real: the row is
        active and the drafted tokens before the position exist (a host read)."""
        real = torch.cat([torch.ones_like(proposal[:, :1]), (proposal >= 0).long().cumprod(1)], 1).bool()
        real &= active[:, None]
        rows, positions = real.nonzero(as_tuple=True)
        lengths = self.prompt + new[rows, positions]
        return list(zip(rows.tolist(), positions.tolist(), lengths.tolist(), strict=True))

    def _call_python(self, logits: torch.Tensor, sequence: torch.Tensor, calls, function) -> torch.Tensor:
        """``function(row, input_ids [1, length], scores [1, V]) -> scores`` at each of ``calls``."""
        logits = logits.clone()
        for row, j, length in calls:
            logits[row, j] = function(row, sequence[row : row + 1, :length], logits[row : row + 1, j])[0]
        return logits

    def _allowed(self, row: int, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """prefix_allowed_tokens_fn at one row and position, as transformers' PrefixConstrainedLogitsProcessor."""
        batch_id = row // self.processing.copies
        allowed = self.processing.prefix_allowed_tokens_fn(batch_id, ids[0])
        if len(allowed) == 0:
            raise ValueError(
                f"`prefix_allowed_tokens_fn` returned no allowed token for batch ID {batch_id}: the constraint "
                "cannot be met; check the function"
            )
        mask = torch.full_like(scores, -torch.inf)
        mask[:, torch.as_tensor(allowed, dtype=torch.int64, device=scores.device)] = 0
        return scores + mask

    def _sequence(self, proposal: torch.Tensor, generated: torch.Tensor, n: int) -> torch.Tensor:
        """[batch, slots] transformers' input_ids (padded prompt, new tokens), the block's drafts after them."""
        sequence = self.tokens[:, 1:].clone()
        end = self.prompt + generated  # [batch] tokens before the block's first position
        slots = (end[:, None] + torch.arange(n - 1, device=proposal.device)).clamp_max(sequence.shape[1] - 1)
        return sequence.scatter_(1, slots, proposal.clamp_min(0))

    def _tail(self, sequence: torch.Tensor, new: torch.Tensor, width: int) -> torch.Tensor:
        """[batch, n, width] the last ``width`` tokens of the sequence before each position (clamped at its
        start: only the last ``prompt + new`` are real)."""
        batch, n = new.shape
        at = (self.prompt + new)[..., None] - width + torch.arange(width, device=new.device)
        return sequence.gather(1, at.clamp_min(0).flatten(1)).view(batch, n, width)

    def _bias(self, table: _Table, sequence: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
        """[batch, n, V] a table's bias at each position: its one-token biases, plus each longer sequence's
        on its last token where the sequence before the position ends with the rest of it."""
        batch, n = new.shape
        if not table.width:
            return table.single
        tail = self._tail(sequence, new, table.width)
        match = ((tail[:, :, None, :] == table.prefixes) | (table.prefixes < 0)).all(-1)  # [batch, n, S]
        match &= table.prefix_lengths <= (self.prompt + new)[..., None]
        bias = table.single.expand(batch, n, self.vocab).clone()
        return bias.index_add_(2, table.last, torch.where(match, table.bias, 0.0))

    def _penalise(self, logits: torch.Tensor, proposal: torch.Tensor) -> torch.Tensor:
        """The repetition penalty; position j also sees the block's drafted tokens x_1..x_j (proposal[:, :j])."""
        batch, n, vocab = logits.shape
        j = torch.arange(n, device=logits.device)
        drafted = torch.where(proposal >= 0, proposal, self.vocab)  # [batch, n - 1]
        before = j[:, None] > torch.arange(n - 1, device=logits.device)  # [n, n - 1]: x_(i+1) precedes j
        index = torch.where(before, drafted[:, None, :], self.vocab)  # [batch, n, n - 1]
        present = self.seen[:, None, :].expand(batch, n, self.vocab + 1).clone()
        present.scatter_(2, index, True)
        penalty = self.processing.repetition_penalty
        penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
        return torch.where(present[..., :vocab], penalised, logits)

    def _repeats(self, sequence: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """[batch, n, V + 1] bool: the tokens that would repeat an n-gram at each of the block's positions."""
        size = self.processing.no_repeat_ngram_size
        batch, n = new.shape
        length = self.prompt + new  # [batch, n] tokens before each position
        prefix = self._tail(sequence, new, size - 1)  # the last size - 1 tokens
        windows = sequence.unfold(1, size, 1)  # [batch, W, size]
        starts = torch.arange(windows.shape[1], device=new.device)
        matches = (windows[:, None, :, :-1] == prefix[:, :, None, :]).all(-1)  # [batch, n, W]
        matches &= (starts + size <= length[..., None]) & (length[..., None] >= size)
        banned = torch.where(matches, windows[:, None, :, -1], self.vocab)  # the token each window bans
        repeats = torch.zeros(batch, n, self.vocab + 1, dtype=torch.bool, device=new.device)
        return repeats.scatter_(2, banned.clamp(0, self.vocab), True)

    def _decay(self, logits: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """exponential_decay_length_penalty: EOS logits grow by ``|l| (factor^(new - start) - 1)`` after start."""
        start, factor = self.processing.exponential_decay_length_penalty
        steps = new - start  # [batch, n]
        growth = (factor ** steps.double() - 1).float()  # computed as transformers' Python float, then fp32
        eos = logits[..., self.eos_ids]
        penalty = torch.where((steps > 0)[..., None], eos.abs() * growth[..., None], 0.0)
        return logits.index_add(2, self.eos_ids, penalty)

    def observe(self, output_tokens: torch.Tensor, kept: torch.Tensor) -> None:
        """A round committed ``output_tokens[:, :kept]`` ([batch, n], [batch]): they are seen from now on."""
        if self.seen is None:
            return
        j = torch.arange(output_tokens.shape[1], device=output_tokens.device)
        ids = torch.where(j < kept[:, None], output_tokens.clamp_min(0), self.vocab)
        self.seen.scatter_(1, ids, True)
