"""The logits processors and min-p a request applies to the target inside the round, as transformers does.

transformers' ``generate()`` processes the target's logits at each new token before it samples or takes
the argmax; speculative decoding stays exact when verification uses the target's *processed* logits at
every drafted position, each with the context that position has (the committed tokens, then the block's
drafted tokens before it). The drafter's logits are not processed: its proposal is whatever law it sampled
from, and verification corrects for it. Supported, in transformers' order (``_get_logits_processor``):

- ``repetition_penalty``: every token present in the context (the prompt without its left padding, as
  transformers 5.24 skips it, the generated tokens, the drafted tokens before the position) has its logit
  ``l`` replaced by ``l * penalty`` if ``l < 0`` else ``l / penalty``;
- ``min_length``: EOS ids get ``-inf`` while the sequence (padded prompt and new tokens) is shorter;
- ``no_repeat_ngram_size`` n: a token that would complete an n-gram already present in the sequence
  (padded prompt included, as transformers reads ``input_ids``) gets ``-inf``;
- ``min_new_tokens``: EOS ids get ``-inf`` while fewer new tokens precede the position;
- ``min_p`` (sampling; transformers applies it after temperature, top-k and top-p): tokens whose
  probability at the request's temperature is below ``min_p`` times the largest get ``-inf``. Masked
  here, before verification applies temperature and top-k, it keeps the same tokens (the threshold is
  relative to the largest probability, which top-k keeps); before top-p it would not, so a request may not
  set both (``request.py``).

Fixed shapes, no host read: the round stays capturable. The tokens each row has seen are kept as a
``[batch, V + 1]`` mask (the last column absorbs padding ids), updated in place at each commit.
"""

from __future__ import annotations

import torch

__all__ = ["TargetProcessors"]


class TargetProcessors:
    """A request's target-side processing (``Request.repetition_penalty``, ``no_repeat_ngram_size``,
    ``min_length``, ``min_new_tokens``, ``min_p``; the module docstring).

    Args:
        tokens: [batch, slots + 1] the request's committed tokens by slot (``RequestState.tokens``).
        start: [batch] each row's first prompt slot; prompt: the padded prompt width; vocab: V_t.
    """

    def __init__(
        self,
        *,
        repetition_penalty: float,
        min_length: int,
        min_new_tokens: int,
        no_repeat_ngram_size: int,
        min_p: float,
        temperature: float,
        eos_ids: torch.Tensor,
        tokens: torch.Tensor,
        start: torch.Tensor,
        prompt: int,
        vocab: int,
    ):
        self.penalty, self.min_length, self.min_new_tokens = repetition_penalty, min_length, min_new_tokens
        self.prompt, self.vocab = prompt, vocab
        self.min_p, self.temperature = min_p, temperature
        self.ngram, self.tokens = no_repeat_ngram_size, tokens
        batch, device = tokens.shape[0], tokens.device
        self.eos = None  # [V] bool the EOS ids, when a minimum length can mask them
        if min_length > prompt or min_new_tokens > 0:
            self.eos = torch.zeros(vocab, dtype=torch.bool, device=device)
            self.eos[eos_ids[eos_ids < vocab]] = True
        self.seen = None
        if repetition_penalty != 1.0:
            slots = torch.arange(1, 1 + prompt, device=device)
            ids = torch.where(slots >= start[:, None], tokens[:, 1 : 1 + prompt], vocab).clamp(0, vocab)
            self.seen = torch.zeros(batch, vocab + 1, dtype=torch.bool, device=device)
            self.seen.scatter_(1, ids, True)

    @staticmethod
    def needed(
        repetition_penalty: float,
        min_length: int,
        min_new_tokens: int,
        no_repeat: int,
        min_p: float,
        prompt: int,
    ) -> bool:
        """Whether a request with these settings and a ``prompt``-wide padded prompt processes anything."""
        return (
            repetition_penalty != 1.0
            or min_length > prompt
            or min_new_tokens > 0
            or no_repeat > 0
            or min_p > 0
        )

    def __call__(
        self,
        logits: torch.Tensor,  # [batch, n, V] the target's logits at the block's positions
        proposal: torch.Tensor,  # [batch, n - 1] the drafted target ids at positions 1..n-1, -1 where none
        generated: torch.Tensor,  # [batch] new tokens before the block's first position
    ) -> torch.Tensor:  # [batch, n, V] processed (a new tensor)
        batch, n, vocab = logits.shape
        device = logits.device
        j = torch.arange(n, device=device)
        if self.seen is not None:
            # Position j also sees the block's drafted tokens x_1..x_j (proposal[:, :j]).
            drafted = torch.where(proposal >= 0, proposal, self.vocab)  # [batch, n - 1]
            # [n, n - 1]: whether x_(i+1) precedes position j
            before = j[:, None] > torch.arange(n - 1, device=device)
            index = torch.where(before, drafted[:, None, :], self.vocab)  # [batch, n, n - 1]
            present = self.seen[:, None, :].expand(batch, n, self.vocab + 1).clone()
            present.scatter_(2, index, True)
            penalised = torch.where(logits < 0, logits * self.penalty, logits / self.penalty)
            logits = torch.where(present[..., :vocab], penalised, logits)
        if self.ngram:
            logits = logits.masked_fill(self._repeats(proposal, generated, n)[..., :vocab], -torch.inf)
        if self.eos is not None:
            length = generated[:, None] + j  # [batch, n] new tokens before each position
            short = (self.prompt + length < self.min_length) | (length < self.min_new_tokens)
            logits = logits.masked_fill(short[..., None] & self.eos, -torch.inf)
        if self.min_p > 0:  # as transformers' MinPLogitsWarper computes it, at the request's temperature
            probs = (logits.float() / self.temperature).softmax(-1)
            logits = logits.masked_fill(probs < self.min_p * probs.amax(-1, keepdim=True), -torch.inf)
        return logits

    def _repeats(self, proposal: torch.Tensor, generated: torch.Tensor, n: int) -> torch.Tensor:
        """[batch, n, V + 1] bool: the tokens that would repeat an n-gram at each of the block's n positions."""
        size, batch = self.ngram, proposal.shape[0]
        device = proposal.device
        # The sequence as transformers' input_ids (padded prompt, new tokens), the block's drafts after it.
        sequence = self.tokens[:, 1:].clone()
        end = self.prompt + generated  # [batch] tokens before the block's first position
        slots = (end[:, None] + torch.arange(n - 1, device=device)).clamp_max(sequence.shape[1] - 1)
        sequence.scatter_(1, slots, proposal.clamp_min(0))
        length = end[:, None] + torch.arange(n, device=device)  # [batch, n] tokens before each position
        at = (length[..., None] - (size - 1) + torch.arange(size - 1, device=device)).clamp_min(0)
        prefix = sequence.gather(1, at.flatten(1)).view(batch, n, size - 1)  # the last size - 1 tokens
        windows = sequence.unfold(1, size, 1)  # [batch, W, size]
        starts = torch.arange(windows.shape[1], device=device)
        matches = (windows[:, None, :, :-1] == prefix[:, :, None, :]).all(-1)  # [batch, n, W]
        matches &= (starts + size <= length[..., None]) & (length[..., None] >= size)
        banned = torch.where(matches, windows[:, None, :, -1], self.vocab)  # the token each window bans
        repeats = torch.zeros(batch, n, self.vocab + 1, dtype=torch.bool, device=device)
        return repeats.scatter_(2, banned.clamp(0, self.vocab), True)

    def observe(self, output_tokens: torch.Tensor, kept: torch.Tensor) -> None:
        """A round committed ``output_tokens[:, :kept]`` ([batch, n], [batch]): they are seen from now on."""
        if self.seen is None:
            return
        j = torch.arange(output_tokens.shape[1], device=output_tokens.device)
        ids = torch.where(j < kept[:, None], output_tokens.clamp_min(0), self.vocab)
        self.seen.scatter_(1, ids, True)
