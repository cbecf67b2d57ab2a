"""The target's logits kept for ``output_logits`` / ``output_scores``, in memory that grows with the output.

A round knows where its kept tokens go (each row's count of new tokens before it, plus their index in the
round) but must not allocate: captured stages write to fixed addresses. So the rounds write into a staging
block of ``tokens_per_sync`` positions per row (what the rounds between two host reads can commit at most),
at each kept token's index since the last read; after each host read (``engine.py``, where the one read per
sync learns the longest row) :meth:`KeptLogits.flush` appends every row's staged positions to its output,
which grows by doubling, never past ``max_new_tokens``. A request that ends early holds memory for the
tokens it made, as ``model.generate()`` does, not ``[batch, max_new_tokens, V]`` from the start.
"""

from __future__ import annotations

import torch

__all__ = ["KeptLogits"]


class KeptLogits:
    """Per name ("logits": raw, "scores": processed), the target's fp32 logits at each row's new tokens."""

    def __init__(
        self,
        names: tuple[str, ...],
        batch: int,
        tokens_per_sync: int,
        vocab: int,
        max_new_tokens: int,
        device: torch.device,
    ):
        self.names, self.max_new_tokens = names, max_new_tokens
        # [batch, tokens_per_sync + 1, V] per name: the positions since the last flush, then a spare column
        # that takes the writes of positions not kept
        self.staging = {
            name: torch.full((batch, tokens_per_sync + 1, vocab), torch.nan, device=device) for name in names
        }
        # [batch] each row's new tokens at the last flush
        self.base = torch.zeros(batch, dtype=torch.int64, device=device)
        # [batch, capacity + 1, V] per name: the output so far (NaN where a row has none), a spare column last
        self.out = {name: torch.full((batch, 1, vocab), torch.nan, device=device) for name in names}

    @property
    def capacity(self) -> int:
        """New tokens the output holds now."""
        return next(iter(self.out.values())).shape[1] - 1 if self.names else 0

    def record(
        self,
        name: str,
        values: torch.Tensor,  # [batch, n, V] the target's logits at a round's n positions
        generated: torch.Tensor,  # [batch] int64 each row's new tokens before the round
        kept: torch.Tensor,  # [batch] int64 how many of the n positions the row kept
    ) -> None:
        """Stage a round's kept positions (inside a round: fixed shapes, no allocation beyond temporaries)."""
        if name not in self.staging:
            return
        staging = self.staging[name]
        j = torch.arange(values.shape[1], device=values.device)
        index = torch.where(
            j < kept[:, None], generated[:, None] - self.base[:, None] + j, staging.shape[1] - 1
        )
        staging.scatter_(1, index[..., None].expand_as(values), values.float())

    def flush(self, generated: torch.Tensor, most: int) -> None:
        """Append the staged positions to the output (eager, after a host read): ``generated`` [batch] each
        row's new tokens now, ``most`` their largest value, read by the caller."""
        if not self.names:
            return
        if most > self.capacity:
            self._grow(min(max(most, 2 * self.capacity), self.max_new_tokens))
        width = next(iter(self.staging.values())).shape[1] - 1
        t = torch.arange(width, device=generated.device)
        count = generated - self.base  # [batch] staged positions per row
        index = torch.where(t < count[:, None], self.base[:, None] + t, self.capacity)  # [batch, width]
        for name, out in self.out.items():
            staged = self.staging[name][:, :width]
            out.scatter_(1, index[..., None].expand_as(staged), staged)
        self.base.copy_(generated)

    def _grow(self, capacity: int) -> None:
        for name, out in self.out.items():
            grown = torch.full((out.shape[0], capacity + 1, out.shape[2]), torch.nan, device=out.device)
            grown[:, : out.shape[1] - 1] = out[:, :-1]
            self.out[name] = grown

    def result(self, longest: int, generated: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per name, [batch, longest, V]: each row's logits at its new tokens, NaN past its end. The output
        leaves this object: a state kept for later requests holds only its staging."""
        if not self.out:
            return {}
        past_end = (torch.arange(longest, device=generated.device) >= generated[:, None])[..., None]
        result = {name: out[:, :longest].masked_fill(past_end, torch.nan) for name, out in self.out.items()}
        self.out = {name: torch.full_like(out[:, :1], torch.nan) for name, out in self.out.items()}
        return result

    def refill(self, fresh: KeptLogits) -> None:
        """Start a new request on this object, whose staging captured stages write to (``Rounds.begin``)."""
        self.base.zero_()
        self.out = fresh.out
