"""Ragged runs laid end to end in fixed-width rows, with no host read.

Row ``b`` holds runs ``0..n-1`` of ``lengths[b, i]`` items each. Written back to back, item ``o`` falls in
run ``i`` when ``ends[b, i - 1] <= o < ends[b, i]`` (``ends`` the inclusive cumulative sum of the lengths),
at offset ``o - ends[b, i - 1]`` inside it, and past the last run it is padding. Output position ``p`` holds
item ``o = p`` (the layout from the first item), or ``o = skip[b] + p`` (the first ``skip[b]`` items left
out). Translation writes split tokens out this way (``translate.split_reference``), and the commit stage
the drafter spellings of the target tokens it feeds back, the end of them where they do not fit
(``omnidraft_fast/feedback.py``).
"""

from __future__ import annotations

import torch

__all__ = ["ragged_layout"]


def ragged_layout(
    lengths: torch.Tensor,  # [batch, n] int64 >= 0 items per run
    width: int,  # output positions per row
    skip: torch.Tensor | None = None,  # [batch, 1] int64 >= 0 items left out before the first position
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns, per output position ``[batch, width]``: its item's run (clamped to ``n - 1`` past the end),
    its offset inside the run, and whether it holds an item."""
    items = torch.arange(width, device=lengths.device)  # [width], or [batch, width] past `skip`
    if skip is not None:
        items = items + skip
    ends = lengths.cumsum(1)  # [batch, n]
    run = (ends[:, None, :] <= items[..., None]).sum(-1)  # [batch, width]
    valid = items < ends[:, -1:]
    run = run.clamp_max(lengths.shape[1] - 1)
    offset = items - (ends - lengths).gather(1, run)
    return run, offset, valid
