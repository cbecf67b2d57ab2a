"""Commit a verified block into each row's token buffer: EOS and length limits.

Row ``b`` emitted ``e_b = num_accepted_b + 1`` output tokens. It keeps

    n_b = min(e_b, max_new_tokens - generated_b, 1 + index of its first EOS among them)

of them (zero for a row already done), writes them at slots
``length_b .. length_b + n_b - 1`` of its token buffer, and is done once it
kept an EOS or reached ``max_new_tokens``. Everything is an in-place update of
fixed-shape buffers, so a round that ends with it can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

__all__ = ["commit_drafter_reference", "commit_reference"]


def commit_reference(
    tokens: torch.Tensor,  # [batch, slots] int64, updated in place; slots >= max(lengths) + k + 1
    lengths: torch.Tensor,  # [batch] int64 committed slots per row, updated in place
    generated: torch.Tensor,  # [batch] int64 new tokens per row so far, updated in place
    done: torch.Tensor,  # [batch] bool, updated in place
    output_tokens: torch.Tensor,  # [batch, k+1] int64, -1 padded
    num_accepted: torch.Tensor,  # [batch] int64
    eos_ids: torch.Tensor,  # [num_eos] int64 (may be empty)
    max_new_tokens: int,
) -> torch.Tensor:  # [batch] int64 tokens kept this round
    width = output_tokens.shape[1]
    positions = torch.arange(width, device=tokens.device)  # [k+1]
    # An EOS id matched past the e_b emitted tokens (in the -1 padding, were -1 an EOS id) comes after every
    # kept token: it changes neither n_b nor whether the row kept an EOS, so no mask keeps it out.
    is_eos = (output_tokens[..., None] == eos_ids).any(-1)
    first_eos = torch.where(is_eos, positions, width).amin(-1)  # [batch]; width if none
    kept = torch.minimum(num_accepted + 1, max_new_tokens - generated)
    kept = torch.minimum(kept, first_eos + 1).masked_fill_(done, 0)

    write = positions < kept[:, None]  # [batch, k+1]
    slots = lengths[:, None] + positions
    tokens.scatter_(1, slots, torch.where(write, output_tokens, tokens.gather(1, slots)))
    lengths += kept
    generated += kept
    done |= (first_eos < kept) | (generated >= max_new_tokens)
    return kept


def commit_drafter_reference(
    tokens: torch.Tensor,  # [batch, slots] int64 drafter context by slot, updated in place
    lengths: torch.Tensor,  # [batch] int64, updated in place; slots >= max(lengths) + k + spelling width
    draft_ids: torch.Tensor,  # [batch, k] int64 drafter ids of this round
    drafted: torch.Tensor,  # [batch] int64 how many of them the row keeps (those its accepted positions consumed)
    spelling: torch.Tensor,  # [batch, width] int64 drafter spelling of the emitted, undrafted tokens, -1 padded
    spelling_len: torch.Tensor,  # [batch] int64
    active: torch.Tensor,  # [batch] bool: rows that were generating this round
) -> None:
    """Keep the drafter's context in step with the target's (SPEC §2.4).

    A row appends the drafter tokens behind its accepted target tokens (``draft_ids[:drafted]``), then
    the drafter spelling of the target tokens it emitted but did not draft (the recovered or bonus token,
    after any accepted pieces of a split token a rejection cut). Rows that were already done append nothing.
    """
    _batch, k = draft_ids.shape
    width = spelling.shape[1]
    total = (drafted + spelling_len).mul_(active)  # 0 for rows done
    positions = torch.arange(k + width, device=tokens.device)  # [k + width]
    from_spelling = spelling.gather(1, (positions - drafted[:, None]).clamp(0, width - 1))
    values = torch.where(positions < drafted[:, None], torch.cat([draft_ids, spelling], 1), from_spelling)
    slots = lengths[:, None] + positions
    tokens.scatter_(1, slots, torch.where(positions < total[:, None], values, tokens.gather(1, slots)))
    lengths += total
