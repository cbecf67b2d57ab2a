"""Host-side stop conditions: a row ends at the first new token that one of them stops at.

``Stops`` holds a request's conditions and where each row ended. Two kinds:

``StopStrings`` (transformers' ``stop_strings``): a row ends at the first new token that completes one.

transformers' ``StopStringCriteria`` stops a row after the token whose string completes a stop string that
overlaps it: the stop string occurs in the text of the sequence (prompt included), and removing the last
token would break that occurrence. Checked after every token there; here after every round (or unit of
``rounds_per_sync`` rounds) on the tokens the round committed, in order, which finds the same token: the
row keeps its tokens through that one and is done (without an EOS id it goes on, as there, until every
row has stopped: ``SpeculativeEngine._stop``). Text is the bytes each token stands for
(``bridge.token_bytes``, the table the vocabulary bridge uses, with special tokens read as their text, as
transformers reads them), and stop strings are matched as UTF-8 bytes.

``Criteria`` (the caller's ``stopping_criteria``): called after each new token, as transformers calls
them after each step, with that row's ``input_ids`` through the token (``[1, length]``, its prompt padding
included) and, as transformers passes them, its ``output_scores`` so far (a tuple of ``[1, V]``, one per
new token) when the request keeps scores, else None.

The checks run on the host, so such a request reads each round's new tokens back (one small copy per
round, beside the round's one flag read).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["Criteria", "StopStrings", "Stops"]


class Stops:
    """A request's stop conditions (each with ``first_stop(row, ids, scores)``) and ``cuts``: row -> its
    new tokens through the one that ended it."""

    def __init__(self, checks: list):
        self.checks = checks
        self.cuts: dict[int, int] = {}
        self.reads_scores = any(isinstance(check, Criteria) for check in checks)  # stop strings do not

    def first_stop(self, row: int, ids: list[int], scores: torch.Tensor | None) -> int | None:
        """The count of ``row``'s newly committed ``ids`` to keep (through the first any check stops at), or
        None (``scores``: [len(ids), V] the tokens' scores, or None)."""
        counts = [count for check in self.checks if (count := check.first_stop(row, ids, scores)) is not None]
        return min(counts, default=None)


class StopStrings:
    """Per-row matching state of one request.

    Args:
        stop_strings: the strings, non-empty.
        pieces: the bytes of every target token id (None: an unused id).
        prompts: each row's prompt ids, without padding.
    """

    def __init__(self, stop_strings: tuple[str, ...], pieces: list[bytes | None], prompts: list[list[int]]):
        self.stops = [text.encode("utf-8") for text in stop_strings]
        self.pieces = pieces
        self.keep = max(len(stop) for stop in self.stops) - 1  # bytes of context a match can reach back into
        self.tails = [self._tail(b"", ids) for ids in prompts]

    def _bytes(self, token: int) -> bytes | None:
        """The token's bytes; None for an id the tokenizer does not have (a model's padded vocabulary)."""
        return self.pieces[token] if 0 <= token < len(self.pieces) else None

    def _next_tail(self, text: bytes, piece: bytes | None) -> bytes:
        """The context a later match can reach back into. No match spans an id without bytes, as in
        transformers' StopStringCriteria (such an id breaks every match)."""
        return text[-self.keep :] if self.keep and piece is not None else b""

    def _tail(self, tail: bytes, ids: list[int]) -> bytes:
        for token in ids:
            piece = self._bytes(token)
            tail = self._next_tail(tail + (piece or b""), piece)
        return tail

    def first_stop(self, row: int, ids: list[int], scores: torch.Tensor | None = None) -> int | None:
        """Feed ``row``'s newly committed ``ids`` in order: the count of them to keep (through the first that
        completes a stop string), or None when none does (the row's state moves past them)."""
        tail = self.tails[row]
        for count, token in enumerate(ids, start=1):
            piece = self._bytes(token)
            text = tail + (piece or b"")
            # An occurrence must end inside this token's bytes: it starts after len(tail) - len(stop).
            for stop in self.stops:
                if piece and text.find(stop, max(0, len(tail) - len(stop) + 1)) >= 0:
                    return count
            tail = self._next_tail(text, piece)
        self.tails[row] = tail
        return None


class Criteria:
    """The caller's stopping criteria over one request's rows.

    Args:
        criteria: callables ``(input_ids, scores) -> bool tensor`` (a StoppingCriteriaList's entries).
        rows: each row's padded prompt ids (transformers' ``input_ids`` at the start).
        device: where the ``input_ids`` handed to them live.
    """

    def __init__(self, criteria: tuple[Callable, ...], rows: list[list[int]], device: torch.device):
        self.criteria, self.rows, self.device = criteria, rows, device
        self.scores: list[list[torch.Tensor]] = [[] for _ in rows]  # each row's [1, V] scores so far

    def first_stop(self, row: int, ids: list[int], scores: torch.Tensor | None = None) -> int | None:
        """Feed ``row``'s newly committed ``ids`` one at a time (``scores``: their [len(ids), V] scores, or
        None): the count through the first at which a criterion says stop, or None."""
        for count, token in enumerate(ids, start=1):
            self.rows[row].append(token)
            input_ids = torch.tensor([self.rows[row]], device=self.device)
            if scores is not None:
                self.scores[row].append(scores[count - 1 : count])
            so_far = None if scores is None else tuple(self.scores[row])
            if any(self._says_stop(stop, input_ids, so_far) for stop in self.criteria):
                return count
        return None

    @staticmethod
    def _says_stop(stop: Callable, input_ids: torch.Tensor, scores) -> bool:
        """One criterion's answer for one row: a bool or a one-element bool tensor."""
        answer = torch.as_tensor(stop(input_ids, scores))
        if answer.numel() != 1:
            raise ValueError(
                f"a stopping criterion must return one bool per row of `input_ids` ({input_ids.shape[0]} row here: "
                f"the engine calls it one row at a time), got {answer.numel()} values"
            )
        return bool(answer.reshape(()))
