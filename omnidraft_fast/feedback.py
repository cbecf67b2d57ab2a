"""What a round gives the drafter's context for the target tokens it emitted but did not draft (SPEC §2.4).

The drafter's context holds, by drafter cache slot, the drafted tokens a row kept and, for every committed
target token the drafter did not propose itself, that token's drafter spelling through the bridge: the
recovered or bonus token of each round and, with split tokens, the accepted pieces of a split token that a
rejection cut (their drafter token was not kept). :func:`feedback` lays those spellings out in fixed-shape
rows for ``ops.commit_drafter``; :meth:`Feedback.slots` gives the drafter slots each target position of the
round takes, which the online learner's labels are written by.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from .kernels.ragged import ragged_layout

__all__ = ["Feedback", "feedback", "kept_drafts"]


class Feedback(NamedTuple):
    """The target tokens of a round spelled into the drafter's context (:func:`feedback`)."""

    spelling: torch.Tensor  # [batch, spelling_width] their drafter spellings end to end, -1 padded
    lengths: torch.Tensor  # [batch, k+1] drafter tokens the context keeps of each target position's spelling
    mask: torch.Tensor  # [batch, k+1] bool the positions fed (spelled) rather than drafted

    def slots(self, num_accepted: torch.Tensor, span_end: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """[batch, k+1] drafter slots each target position of the round takes in the committed context:
        its span of drafted tokens if accepted, its spelling if fed."""
        batch, width = self.mask.shape
        accepted = torch.arange(width - 1, device=span_end.device) < num_accepted[:, None]
        previous = torch.cat([span_end.new_zeros(batch, 1), span_end[:, :-1]], 1)
        drafted = torch.where(accepted & active[:, None], span_end - previous, 0)
        return torch.where(self.mask, self.lengths, torch.cat([drafted, drafted.new_zeros(batch, 1)], 1))


def feedback(
    output_tokens: torch.Tensor,  # [batch, k+1] emitted this round, -1 padded
    num_accepted: torch.Tensor,  # [batch]
    source: torch.Tensor,  # [batch, k] the drafter position each target position came from
    active: torch.Tensor,  # [batch]
    spell: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],  # target ids [n] -> ids, lengths
    spelling_width: int,
    *,
    drafted: torch.Tensor,  # [batch] the drafted tokens the row keeps (kept_drafts)
    spelled: tuple[torch.Tensor, torch.Tensor] | None,  # spell(output_tokens.clamp_min(0).flatten()), or None
) -> Feedback:
    """The spellings the drafter's context gets this round, end to end in order: of those, the drafter's
    context keeps the last ``spelling_width`` tokens (``spell`` gives a spelling longer than that as its
    end), so a spelling that does not fit whole loses its beginning, or the spellings before it. ``spelled``
    is every output token's spelling when the request splits tokens (RequestState.units: the accepted
    pieces of a split token that a rejection cut are fed too), else None (the recovered/bonus token alone
    is fed, spelled here)."""
    batch, width = output_tokens.shape
    j = torch.arange(width, device=output_tokens.device)
    at, running = num_accepted[:, None], active[:, None]
    if spelled is None:  # the recovered/bonus token alone
        mask = (j == at) & running
        spelling, length = spell(output_tokens.gather(1, at)[:, 0])
        return Feedback(spelling, length.clamp_max(spelling_width)[:, None] * mask, mask)
    behind = torch.nn.functional.pad(source, (0, 1), value=width)  # position k has no drafter token
    # the recovered/bonus token, and the accepted positions behind the kept drafts (pieces of a split token)
    mask = (j <= at) & ((j == at) | (behind >= drafted[:, None])) & running
    spellings, lengths = spelled
    lengths = lengths.view(batch, width).clamp_max(spelling_width).mul_(mask)
    # Keep the last `spelling_width` tokens: the layout starts `cut` tokens in, and each position keeps the
    # tokens of its spelling the layout holds.
    cut = (lengths.sum(1, keepdim=True) - spelling_width).clamp_min(0)
    run, offset, valid = ragged_layout(lengths, spelling_width, skip=cut)
    kept = torch.zeros_like(lengths).scatter_add_(1, run, valid.long())
    spellings = spellings.view(batch, width, -1)
    rows = torch.arange(batch, device=output_tokens.device)[:, None]
    spelling = torch.where(valid, spellings[rows, run, offset.clamp(0, spellings.shape[2] - 1)], -1)
    return Feedback(spelling, kept, mask)


def kept_drafts(span_end: torch.Tensor, num_accepted: torch.Tensor) -> torch.Tensor:
    """[batch] the drafted tokens a row keeps: those its accepted target positions consumed whole."""
    # span_end of the last accepted position; 0 before the first (a leading 0 column: one gather, no mask)
    return torch.nn.functional.pad(span_end, (1, 0)).gather(1, num_accepted[:, None])[:, 0]
