"""The logits processing a request applies inside the round, as transformers does.

transformers' ``generate()`` processes the target's logits at each new token before it samples or takes
the argmax; speculative decoding stays exact when verification uses the target's *processed* logits at
every drafted position, each with the context that position has (the committed tokens, then the block's
drafted tokens before it). A drafter sharing the target's vocabulary has its logits processed too, at each
draft step with that step's context, as transformers' assisted generation processes its assistant's: its
drafts then follow the processed law (a token the processors forbid is not drafted, a penalised one less
often), and a cascade's rules and mixture read the processed ``q`` and ``p``, so where a rule keeps a draft
the processors still hold. A drafter with another vocabulary has its logits processed through its twins,
the drafter ids that are one target token (``Rounds._processed_across``): an approximation of the
processed law, which verification corrects for as for any drafter; a cascade, whose kept drafts the
processors must hold, reads the translated proposal only where the processed target logits are finite
(``kernels/verify.py``'s ``support_only``).
Supported, in transformers' order (``_get_logits_processor``),
where "the sequence" is transformers' ``input_ids`` (the padded prompt, the new tokens, then the drafted
tokens before the position) and "new tokens" counts those before the position:

- ``sequence_bias``: a biased sequence's last token gets the bias when the sequence ends with the rest of
  it (one-token sequences: always);
- ``encoder_repetition_penalty`` P: every token of the prompt as given (its left padding included: transformers'
  ``encoder_input_ids``, each copy's own under ``num_return_sequences`` as 5.2x repeats them; 5.17 reaches the
  first rows only) has its logit ``l`` replaced by ``l * (1/P)`` if ``l < 0`` else ``l / (1/P)``;
- ``repetition_penalty``: every token present in the context (the sequence, without the prompt's left
  padding where the installed transformers skips it, as 5.24 does and 5.17 does not) has its logit ``l`` replaced by ``l * penalty`` if ``l < 0``
  else ``l / penalty``;
- ``no_repeat_ngram_size`` n: a token that would complete an n-gram already present in the sequence gets
  ``-inf``;
- ``encoder_no_repeat_ngram_size`` n: a token that would continue the sequence's last n - 1 tokens as an
  n-gram of the prompt as given continues them gets ``-inf`` (n = 1: every token of the prompt);
- ``bad_words_ids``: ``sequence_bias`` with ``-inf`` (a one-token bad word equal to an EOS id is dropped);
- ``min_length`` / ``min_new_tokens``: EOS ids get ``-inf`` while the sequence / the new tokens are
  shorter (with ``min_new_tokens`` set, ``min_length`` is not used, as transformers replaces it);
- ``prefix_allowed_tokens_fn(batch_id, sequence)``: every token it does not list gets ``-inf``
  (``batch_id``: the caller's row, copies of a prompt sharing it). An empty list is refused as transformers
  refuses it at a committed context (the block's first position); after a drafted token (a grammar's dead
  state once a draft broke it) the position gets ``-inf`` everywhere instead: verification never emits from
  it unless the drafts before it were accepted, which makes it a context transformers reaches too;
- ``forced_bos_token_id`` (at a sequence of one token) and ``forced_eos_token_id`` (at the last new token
  ``max_new_tokens`` allows): every other token gets ``-inf``, the forced ones 0;
- ``remove_invalid_values``: NaN becomes 0 and +-inf the dtype's extremes;
- ``exponential_decay_length_penalty`` (start, factor): from ``start`` new tokens on, finite EOS logits
  ``l`` grow by ``|l| (factor^(new - start) - 1)``;
- ``suppress_tokens`` (always) and ``begin_suppress_tokens`` (at the first new token; the second after a
  forced BOS on a one-token prompt): ``-inf``;
- the caller's ``logits_processor`` list, after all of the above, called with ``input_ids`` of one row
  (``[1, length]``) and that row's scores at one position; one of a class an option above makes too
  (``RepetitionPenaltyLogitsProcessor`` beside ``repetition_penalty``, say) runs in that one's place
  instead, and an object listed twice runs once, as transformers' ``generate()`` merges the two lists;
- sampling only, the warpers besides temperature, top-k and top-p: ``top_h`` (after temperature, before
  top-k), ``min_p``, ``typical_p``, ``epsilon_cutoff``, ``eta_cutoff`` (after top-p), each on the law the
  previous ones left, as transformers applies them. A request with any of them warps the target's logits
  here with the whole chain (``warpers.py``: transformers' own warpers, top-h and eta written out without
  transformers' host reads) and verification then samples that law as it is
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

import functools
import inspect
from dataclasses import dataclass

import torch

from .config import SamplingParams
from .processing import Processing
from .warpers import sampling_warpers

__all__ = ["Processors"]


@functools.cache
def _penalty_skips_padding() -> bool:
    """Whether this transformers' ``generate()`` leaves the prompt's left padding out of the repetition
    penalty (its ``prompt_ignore_length``, passed since 5.2x); 5.17 penalises the padding ids too."""
    from transformers.generation.utils import GenerationMixin

    return "prompt_ignore_length" in inspect.getsource(GenerationMixin._get_logits_processor)


@functools.cache
def _prefix_batch_is_the_prompt() -> bool:
    """Whether this transformers gives ``prefix_allowed_tokens_fn`` the prompt's index for each of its
    ``num_return_sequences`` copies (5.2x: ``max(num_beams, num_return_sequences)`` rows per batch id); 5.17
    gives each copy's row index."""
    from transformers.generation.utils import GenerationMixin

    source = inspect.getsource(GenerationMixin._get_logits_processor)
    at = source.find("PrefixConstrainedLogitsProcessor(")
    return "num_return_sequences" in source[at : source.find(")\n", at)]


@functools.cache
def _prefix_forces_banned_tokens() -> bool:
    """Whether this transformers' ``PrefixConstrainedLogitsProcessor`` forces the allowed tokens where earlier
    processors banned them all (5.2x, "so the constraint holds"; 5.17 leaves the row -inf): asked of it."""
    from transformers.generation.logits_process import PrefixConstrainedLogitsProcessor

    processor = PrefixConstrainedLogitsProcessor(lambda batch_id, ids: [0], 1)
    scores = processor(torch.zeros(1, 1, dtype=torch.long), torch.tensor([[-torch.inf, 0.0]]))
    return bool(scores[0, 0] == 0)


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


class Processors:
    """A request's logits processing (:class:`Processing`; the module docstring): the target's at a round's
    block of positions, a same-vocabulary drafter's at one draft step (``first``: its position in the block).

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
        # the caller's processors that take a slot (Processing.overrides): the built-in state of those slots
        # that a round keeps up (the tokens seen, the prompt's tokens and n-grams) is not built
        self.overrides = dict(processing.overrides)
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
        # The prompt as transformers' encoder_input_ids (the padded input_ids, as given: the processing
        # leaves prompts unbucketed): its tokens [batch, V] for encoder_repetition_penalty, its n-grams
        # [batch, W, n] for encoder_no_repeat_ngram_size.
        prompt_ids = tokens[:, 1 : 1 + prompt]
        self.prompt_tokens = None
        if p.encoder_repetition_penalty != 1.0 and "encoder_repetition_penalty" not in self.overrides:
            self.prompt_tokens = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
            self.prompt_tokens.scatter_(1, prompt_ids, True)
        self.prompt_ngrams = None
        if p.encoder_no_repeat_ngram_size and "encoder_no_repeat_ngram_size" not in self.overrides:
            size = p.encoder_no_repeat_ngram_size
            self.prompt_ngrams = (
                prompt_ids.unfold(1, size, 1) if prompt >= size else prompt_ids.new_zeros(batch, 0, size)
            )
        self.seen = None
        if p.repetition_penalty != 1.0 and "repetition_penalty" not in self.overrides:
            ids = tokens[:, 1 : 1 + prompt]
            if _penalty_skips_padding():
                slots = torch.arange(1, 1 + prompt, device=device)
                ids = torch.where(slots >= start[:, None], ids, vocab)
            ids = ids.clamp(0, vocab)
            self.seen = torch.zeros(batch, vocab + 1, dtype=torch.bool, device=device)
            self.seen.scatter_(1, ids, True)

    def __call__(
        self,
        logits: torch.Tensor,  # [batch, n, V] logits at the block's positions first .. first + n - 1
        proposal: torch.Tensor,  # [batch, first + n - 1] the drafted target ids at positions 1.., -1 where none
        generated: torch.Tensor,  # [batch] new tokens before the block's first position
        active: torch.Tensor,  # [batch] rows still generating (the caller's Python sees only those)
        first: int = 0,  # the block position of logits[:, 0] (a draft step's: the tokens drafted before it)
    ) -> torch.Tensor:  # [batch, n, V] processed, fp32 as transformers processes them (a new tensor)
        p = self.processing
        logits = logits.float()
        batch, n, vocab = logits.shape
        positions = first + torch.arange(n, device=logits.device)  # [n] block positions
        new = generated[:, None] + positions  # [batch, n] new tokens before each
        sequence = self._sequence(proposal, generated) if self._reads_sequence else None
        calls = self._calls(proposal, new, active, first) if p.calls_python else None
        caller = self.overrides

        def takes(slot: str) -> bool:
            """Whether the caller's processor takes ``slot``; if so it runs there, as in transformers."""
            nonlocal logits
            if slot not in caller:
                return False
            processor = caller[slot]
            logits = self._call_python(
                logits, sequence, calls, lambda row, ids, scores: processor(ids, scores)
            )
            return True

        if not takes("sequence_bias") and self.sequence_bias is not None:
            logits = logits + self._bias(self.sequence_bias, sequence, new)
        if not takes("encoder_repetition_penalty") and self.prompt_tokens is not None:
            inverse = 1 / p.encoder_repetition_penalty  # transformers' 1 / penalty, applied as it applies it
            rewarded = torch.where(logits < 0, logits * inverse, logits / inverse)
            logits = torch.where(self.prompt_tokens[:, None, :], rewarded, logits)
        if not takes("repetition_penalty") and self.seen is not None:
            logits = self._penalise(logits, proposal, positions)
        if not takes("no_repeat_ngram_size") and p.no_repeat_ngram_size:
            windows = sequence.unfold(1, p.no_repeat_ngram_size, 1)  # the sequence's n-grams, then masked
            logits = logits.masked_fill(self._repeats(windows, sequence, new, True)[..., :vocab], -torch.inf)
        if not takes("encoder_no_repeat_ngram_size") and self.prompt_ngrams is not None:
            logits = logits.masked_fill(
                self._repeats(self.prompt_ngrams, sequence, new)[..., :vocab], -torch.inf
            )
        if not takes("bad_words_ids") and self.bad_words is not None:
            logits = logits + self._bias(self.bad_words, sequence, new)
        # min_new_tokens makes transformers' min_length the prompt's width plus it (Processing.resolve): its own
        # mask is then min_length's, applied again only where a caller's processor took min_length's slot
        min_length = self.prompt + p.min_new_tokens if p.min_new_tokens else p.min_length
        if not takes("min_length") and min_length > self.prompt:
            logits = logits.masked_fill((self.prompt + new < min_length)[..., None] & self.eos, -torch.inf)
        if not takes("min_new_tokens") and p.min_new_tokens and "min_length" in caller:
            logits = logits.masked_fill((new < p.min_new_tokens)[..., None] & self.eos, -torch.inf)
        if not takes("prefix_allowed_tokens_fn") and p.prefix_allowed_tokens_fn is not None:
            logits = self._call_python(logits, sequence, calls, self._allowed, with_position=True)
        if not takes("forced_bos_token_id") and self.forced_bos is not None:
            logits = torch.where((self.prompt + new == 1)[..., None], self.forced_bos, logits)
        if not takes("forced_eos_token_id") and self.forced_eos is not None:
            logits = torch.where((new == self.max_new_tokens - 1)[..., None], self.forced_eos, logits)
        if not takes("remove_invalid_values") and p.remove_invalid_values:
            finfo = torch.finfo(logits.dtype)
            logits = torch.nan_to_num(logits, nan=0.0, posinf=finfo.max, neginf=finfo.min)
        if not takes("exponential_decay_length_penalty") and p.exponential_decay_length_penalty is not None:
            logits = self._decay(logits, new)
        if not takes("suppress_tokens") and self.suppress is not None:
            logits = logits.masked_fill(self.suppress, -torch.inf)
        if not takes("begin_suppress_tokens") and self.begin_suppress is not None:
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
            bool(p.no_repeat_ngram_size or p.encoder_no_repeat_ngram_size)
            or p.calls_python
            or any(t is not None and t.width for t in tables)
        )

    def _calls(
        self, proposal: torch.Tensor, new: torch.Tensor, active: torch.Tensor, first: int
    ) -> list[tuple[int, int, int, int]]:
        """(row, index in the logits, block position, context length) at every live row's positions whose
        context is real: the row is active and the drafted tokens before the position exist (a host read)."""
        n = new.shape[1]
        real = torch.cat([torch.ones_like(active[:, None]), (proposal >= 0).cumprod(1).bool()], 1)
        real = real[:, first : first + n] & active[:, None]
        rows, at = real.nonzero(as_tuple=True)
        lengths = self.prompt + new[rows, at]
        return list(zip(rows.tolist(), at.tolist(), (at + first).tolist(), lengths.tolist(), strict=True))

    def _call_python(
        self, logits: torch.Tensor, sequence: torch.Tensor, calls, function, with_position: bool = False
    ) -> torch.Tensor:
        """``function(row, input_ids [1, length], scores [1, V]) -> scores`` at each of ``calls`` (with
        ``with_position``, ``function(row, block position, input_ids, scores)``)."""
        logits = logits.clone()
        for row, j, position, length in calls:
            scores = logits[row : row + 1, j]
            args = (row, position) if with_position else (row,)
            out = function(*args, sequence[row : row + 1, :length], scores)
            if not isinstance(out, torch.Tensor) or out.shape != scores.shape:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise TypeError(
                    f"a `logits_processor` (or `prefix_allowed_tokens_fn`) must return the scores as a tensor of the "
                    f"shape it was given, {tuple(scores.shape)} (one row here); got {got}"
                )
            logits[row, j] = out[0]
        return logits

    def _allowed(self, row: int, position: int, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """prefix_allowed_tokens_fn at one row and position, as transformers' PrefixConstrainedLogitsProcessor;
        nothing allowed after a drafted token leaves the position nothing (module docstring)."""
        copies = self.processing.copies if _prefix_batch_is_the_prompt() else 1  # rows per batch id
        batch_id = row // copies
        allowed = self.processing.prefix_allowed_tokens_fn(batch_id, ids[0])
        if len(allowed) == 0:
            if position > 0:
                return torch.full_like(scores, -torch.inf)
            raise ValueError(
                f"`prefix_allowed_tokens_fn` returned no allowed token for batch ID {batch_id}: the constraint "
                "cannot be met; check the function"
            )
        mask = torch.full_like(scores, -torch.inf)
        mask[:, _allowed_ids(allowed, batch_id, scores.shape[-1]).to(scores.device)] = 0
        processed = scores + mask
        if copies == 1 and _prefix_forces_banned_tokens():
            # Earlier processors banned every allowed token: the allowed tokens are forced, as transformers
            # forces them. It asks that of every row of a batch id at once; copies here run at their own
            # lengths, so with several the position stays banned (and the request is refused).
            processed = torch.where(processed.amax(-1, keepdim=True).isneginf(), mask, processed)
        return processed

    def _sequence(self, proposal: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        """[batch, slots] transformers' input_ids (padded prompt, new tokens), the block's drafts after them."""
        sequence = self.tokens[:, 1:].clone()
        end = self.prompt + generated  # [batch] tokens before the block's first position
        at = torch.arange(proposal.shape[1], device=proposal.device)
        slots = (end[:, None] + at).clamp_max(sequence.shape[1] - 1)
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

    def _penalise(
        self, logits: torch.Tensor, proposal: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """The repetition penalty; block position j also sees the drafted tokens x_1..x_j (proposal[:, :j])."""
        batch, n, vocab = logits.shape
        drafted = torch.where(proposal >= 0, proposal, self.vocab)  # [batch, P]
        before = positions[:, None] > torch.arange(proposal.shape[1], device=logits.device)  # [n, P]
        index = torch.where(before, drafted[:, None, :], self.vocab)  # [batch, n, P]
        present = self.seen[:, None, :].expand(batch, n, self.vocab + 1).clone()
        present.scatter_(2, index, True)
        penalty = self.processing.repetition_penalty
        penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
        return torch.where(present[..., :vocab], penalised, logits)

    def _repeats(
        self, windows: torch.Tensor, sequence: torch.Tensor, new: torch.Tensor, in_sequence: bool = False
    ) -> torch.Tensor:
        """[batch, n, V + 1] bool: at each of the block's positions, the tokens that would follow the sequence's
        last ``size - 1`` tokens as one of ``windows`` ([batch, W, size] n-grams) follows its first ones.
        ``in_sequence``: the windows are the sequence's own, and only those before the position count
        (no_repeat_ngram_size); else the prompt's (encoder_no_repeat_ngram_size)."""
        size = windows.shape[2]
        batch, n = new.shape
        length = self.prompt + new  # [batch, n] tokens before each position
        prefix = self._tail(sequence, new, size - 1)  # the last size - 1 tokens
        matches = (windows[:, None, :, :-1] == prefix[:, :, None, :]).all(-1)  # [batch, n, W]
        # Only the sequence's own n-grams need masking: a prompt with n-grams is at least size tokens long.
        if in_sequence:
            starts = torch.arange(windows.shape[1], device=new.device)
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
        # An EOS logit already at -inf (a minimum length) stays there, as transformers 5.24 keeps it.
        penalty = torch.where((steps > 0)[..., None] & eos.isfinite(), eos.abs() * growth[..., None], 0.0)
        return logits.index_add(2, self.eos_ids, penalty)

    def observe(self, output_tokens: torch.Tensor, kept: torch.Tensor) -> None:
        """A round committed ``output_tokens[:, :kept]`` ([batch, n], [batch]): they are seen from now on."""
        if self.seen is None:
            return
        j = torch.arange(output_tokens.shape[1], device=output_tokens.device)
        ids = torch.where(j < kept[:, None], output_tokens.clamp_min(0), self.vocab)
        self.seen.scatter_(1, ids, True)


def _allowed_ids(allowed, batch_id: int, vocab: int) -> torch.Tensor:
    """What ``prefix_allowed_tokens_fn`` returned, as the int64 index transformers makes of it: ids that index
    a score row of ``vocab`` ids (negative ones from its end, as there), else an error naming the function."""
    try:
        ids = torch.as_tensor(allowed)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        ids = None
    if ids is None or ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise ValueError(
            f"`prefix_allowed_tokens_fn` must return a list of token ids (ints within int64), got {allowed!r} "
            f"for batch ID {batch_id}"
        )
    ids = ids.to("cpu", torch.int64)
    outside = ids[(ids < -vocab) | (ids >= vocab)]
    if outside.numel():
        raise ValueError(
            f"`prefix_allowed_tokens_fn` returned ids beyond the target's vocabulary of {vocab} for batch ID "
            f"{batch_id}: {sorted(set(outside.tolist()))}"
        )
    return ids
