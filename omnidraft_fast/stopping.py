"""Stop strings (transformers' ``stop_strings``): a row ends at the first new token that completes one.

transformers' ``StopStringCriteria`` stops a row after the token whose string completes a stop string that
overlaps it: the stop string occurs in the text of the sequence (prompt included), and removing the last
token would break that occurrence. Checked after every token there; here after every round (or unit of
``rounds_per_sync`` rounds) on the tokens the round committed, in order, which finds the same token: the
row keeps its tokens through that one and is done. Text is the bytes each token stands for
(``bridge.token_bytes``, the same table the vocabulary bridge uses; special tokens stand for none), and
stop strings are matched as UTF-8 bytes.

The check runs on the host, so a request with stop strings reads each round's new tokens back (one small
copy per round, beside the round's one flag read).
"""

from __future__ import annotations

__all__ = ["StopStrings"]


class StopStrings:
    """Per-row matching state of one request.

    Args:
        stop_strings: the strings, non-empty.
        pieces: the bytes of every target token id (None for special tokens).
        prompts: each row's prompt ids, without padding.
    """

    def __init__(self, stop_strings: tuple[str, ...], pieces: list[bytes | None], prompts: list[list[int]]):
        self.stops = [text.encode("utf-8") for text in stop_strings]
        self.pieces = pieces
        self.keep = max(len(stop) for stop in self.stops) - 1  # bytes of context a match can reach back into
        self.tails = [self._tail(b"", ids) for ids in prompts]
        self.cuts: dict[int, int] = {}  # row -> its new tokens through the one that completed a stop string

    def _bytes(self, token: int) -> bytes:
        piece = self.pieces[token] if 0 <= token < len(self.pieces) else None
        return piece or b""

    def _tail(self, tail: bytes, ids: list[int]) -> bytes:
        for token in ids:
            tail = (tail + self._bytes(token))[-self.keep :] if self.keep else b""
        return tail

    def first_stop(self, row: int, ids: list[int]) -> int | None:
        """Feed ``row``'s newly committed ``ids`` in order: the count of them to keep (through the first that
        completes a stop string), or None when none does (the row's state moves past them)."""
        tail = self.tails[row]
        for count, token in enumerate(ids, start=1):
            piece = self._bytes(token)
            text = tail + piece
            # An occurrence must end inside this token's bytes: it starts after len(tail) - len(stop).
            for stop in self.stops:
                if piece and text.find(stop, max(0, len(tail) - len(stop) + 1)) >= 0:
                    return count
            tail = text[-self.keep :] if self.keep else b""
        self.tails[row] = tail
        return None
