"""VocabBridge: byte-exact maps between a drafter's and a target's vocabularies (OmniDraft, SPEC §2.1).

Tokens are compared by the raw bytes they stand for, never by printed strings:

- byte-level BPE (GPT-2, Llama-3, Qwen): each character of a token string is one byte through GPT-2's
  ``bytes_to_unicode`` map (``Ġ`` = space, ``Ċ`` = newline);
- SentencePiece-style (Llama-2, Mistral, Gemma): ``▁`` is a space, ``<0xNN>`` is the byte ``NN``, every
  other character is its UTF-8 encoding;
- anything else (word-level, char-level): the token decoded alone, in UTF-8;
- special tokens (BOS/EOS/PAD/UNK, chat markers) have no bytes; they are mapped by *role*.

What the bridge holds (device tensors; ``V_d``/``V_t`` = the models' ``config.vocab_size``, which may
exceed the tokenizers' sizes: padded ids never map):

- ``d2t``  int32 ``[V_d]``: the target id with exactly the drafter token's bytes, else -1;
- ``t2d``  int32 ``[V_t]``: the inverse on direct-mapped target ids (one canonical drafter id), else -1;
- ``t2ds`` int32 ``[V_t, S]`` and ``t2ds_len`` int32 ``[V_t]``: the drafter spelling of every target
  token (``-1`` padded), computed context-free from the bytes, so no SentencePiece dummy prefix sneaks in;
- ``d2ts`` int32 ``[V_d, S']`` and ``d2ts_len`` int32 ``[V_d]``: the other way round, the target spelling
  of every drafter token (the direct twin where there is one, 0 tokens for specials); translation proposes
  a drafted token with no twin as these target tokens (a *split*, ``kernels/translate.py``);
- ``units`` int32 ``[V_d]``: what one drafted token becomes before merges: ``d2t`` where it maps, else
  ``V_t + id`` (a split marker) where it has a target spelling, else -1; ``sampled_units`` the same with
  markers only where the first piece has a drafter twin, which the proposal probability needs
  (``split_twins``: those tokens beside that twin, folded like ``twins``; ``kernels/proposal.py``;
  ``proposal_d2t``: ``d2t`` with those tokens mapped to their first piece, where their mass then sits);
- ``num_direct``: the number of target ids reachable by the direct map.

Canonical ids: when several tokens share bytes (``▁`` and ``<0x20>``), the canonical one is the
lowest id among the non-byte-fallback tokens, else the lowest byte token. The drafter's EOS family
(``</s>``, ``<|end_of_text|>``, ``<|eot_id|>``, ``<|im_end|>``, ``<|endoftext|>``...) maps to the
target's EOS and back; BOS and other specials never map, so a BOS is never inserted mid-stream.
"""

from __future__ import annotations

import functools
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .vocabulary import Vocabulary, backend

__all__ = ["VocabBridge", "check_tokenizer", "token_bytes"]


def check_tokenizer(tokenizer, name: str) -> None:
    """Refuse by ``name`` what is not a tokenizer object (a path or hub name, most often); None passes."""
    if tokenizer is not None and not callable(getattr(tokenizer, "get_vocab", None)):
        raise TypeError(
            f"`{name}` must be a tokenizer object (e.g. AutoTokenizer.from_pretrained(path)), got "
            f"{type(tokenizer).__name__} {tokenizer!r:.60}"
        )


EOS_NAMES = frozenset(
    {"</s>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>", "<|endoftext|>", "<eos>", "<|eos|>", "<|end|>"}
)
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-character -> byte map (the inverse of ``bytes_to_unicode``)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def _style(tokenizer) -> str:
    """'bytelevel', 'sentencepiece' or 'plain', read from the fast tokenizer's decoder."""
    decoder = backend(tokenizer).decoder
    settings = "null" if decoder is None else decoder.__getstate__().decode()
    if '"ByteLevel"' in settings:
        return "bytelevel"
    if '"ByteFallback"' in settings or '"Metaspace"' in settings or "\\u2581" in settings or "▁" in settings:
        return "sentencepiece"
    return "plain"


@dataclass(frozen=True)
class TokenTable:
    """The bytes of every id of one vocabulary (``None``: special, unused or padded id)."""

    pieces: list[bytes | None]
    byte_tokens: frozenset[int]  # ids of byte-fallback tokens <0xNN>
    special: dict[int, str]  # id -> content, for special tokens
    eos_ids: tuple[int, ...]
    style: str


def token_bytes(tokenizer, vocab_size: int | None = None) -> TokenTable:
    """The bytes each token id stands for, by tokenizer style (see the module docstring). ``tokenizer``: a
    tokenizer, or a ``Vocabulary`` read of one (its vocabulary is not read again)."""
    vocabulary = tokenizer if isinstance(tokenizer, Vocabulary) else Vocabulary.read(tokenizer)
    tokenizer, vocab = vocabulary.tokenizer, vocabulary.ids  # str -> id, added tokens included
    style = _style(tokenizer)
    size = max(vocab_size or 0, vocabulary.highest + 1)
    pieces: list[bytes | None] = [None] * size
    byte_tokens: set[int] = set()
    added = {token.content: token for token in tokenizer.added_tokens_decoder.values()}
    special = {
        index: token.content for index, token in tokenizer.added_tokens_decoder.items() if token.special
    }
    for name in tokenizer.all_special_tokens:
        index = vocab.get(name)
        if index is not None:
            special[index] = name
    byte_decoder = _byte_decoder()
    for piece, index in vocab.items():
        if index in special or index >= size:
            continue
        if piece in added:  # a non-special added token: its content is its text
            pieces[index] = piece.encode()
        elif style == "bytelevel":
            try:
                pieces[index] = bytes(byte_decoder[char] for char in piece)
            except KeyError:
                pieces[index] = piece.encode()
        elif style == "sentencepiece":
            match = _BYTE_TOKEN.match(piece)
            if match:
                pieces[index] = bytes([int(match.group(1), 16)])
                byte_tokens.add(index)
            else:
                pieces[index] = piece.replace("▁", " ").encode()
        else:
            pieces[index] = tokenizer.decode([index]).encode()
    eos = {index for index, name in special.items() if name in EOS_NAMES}
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    return TokenTable(pieces, frozenset(byte_tokens), special, tuple(sorted(eos)), style)


def _canonical(table: TokenTable) -> dict[bytes, int]:
    """bytes -> canonical id: the lowest non-byte-fallback id, else the lowest byte token."""
    best: dict[bytes, int] = {}
    for index, piece in enumerate(table.pieces):
        if not piece:
            continue
        current = best.get(piece)
        if current is None or (current in table.byte_tokens and index not in table.byte_tokens):
            best[piece] = index
    return best


class _Speller:
    """Spells arbitrary bytes as tokens of one vocabulary (the drafter's for ``t2ds``, the target's for
    ``d2ts``): its own BPE where that reproduces the bytes exactly, else the longest match over its
    token bytes (byte tokens fill the gaps)."""

    def __init__(self, tokenizer, table: TokenTable, canonical: dict[bytes, int]):
        self.table = table
        self.canonical = canonical
        self.model = tokenizer.backend_tokenizer.model
        self.longest = max((len(piece) for piece in canonical), default=1)
        encoder = {byte: char for char, byte in _byte_decoder().items()}
        self.to_bytelevel = [encoder[b] for b in range(256)]

    def _bpe(self, data: bytes) -> list[int] | None:
        style = self.table.style
        if style == "bytelevel":
            text = "".join(self.to_bytelevel[b] for b in data)
        elif style == "sentencepiece":
            try:
                text = data.decode().replace(" ", "▁")
            except UnicodeDecodeError:
                return None
        else:
            return None
        try:
            ids = [token.id for token in self.model.tokenize(text)]
        except Exception:  # the tokenizers model refuses some inputs (e.g. unknown chars without fallback)
            return None
        return ids if b"".join(self.table.pieces[i] or b"\x00\x00" for i in ids) == data else None

    def spell(self, data: bytes) -> list[int] | None:
        """Ids of this speller's vocabulary (the drafter's, or the target's for ``d2ts``) whose bytes
        concatenate to ``data``, or None if some byte cannot be spelled."""
        ids = self._bpe(data)
        if ids is not None:
            return ids
        ids, position = [], 0
        while position < len(data):
            for width in range(min(self.longest, len(data) - position), 0, -1):
                index = self.canonical.get(data[position : position + width])
                if index is not None:
                    ids.append(index)
                    position += width
                    break
            else:
                return None
        return ids


class VocabBridge:
    """Byte-exact maps between a drafter vocabulary and a target vocabulary (see the module docstring)."""

    def __init__(
        self,
        d2t: torch.Tensor,  # [V_d] int32
        t2d: torch.Tensor,  # [V_t] int32
        t2ds: torch.Tensor,  # [V_t, S] int32, -1 padded
        t2ds_len: torch.Tensor,  # [V_t] int32
        d2ts: torch.Tensor,  # [V_d, S'] int32, -1 padded
        d2ts_len: torch.Tensor,  # [V_d] int32
        target_eos: torch.Tensor,  # [E_t] int64
        drafter_eos: torch.Tensor,  # [E_d] int64
    ):
        self.d2t, self.t2d, self.t2ds, self.t2ds_len = d2t, t2d, t2ds, t2ds_len
        self.d2ts, self.d2ts_len = d2ts, d2ts_len
        self.target_eos, self.drafter_eos = target_eos, drafter_eos
        # Drafter ids that map to a target id whose canonical drafter id is another one (e.g. `<0x20>`
        # beside `▁`): [2, D] int64, row 0 those ids, row 1 their canonical twins. Their probability is
        # folded onto the twin before the proposal is read through `t2d` (kernels/proposal.py).
        mapped = d2t.long().clamp_min(0)
        folded = (
            (d2t >= 0) & (t2d.long()[mapped] != torch.arange(d2t.shape[0], device=d2t.device))
        ).nonzero()[:, 0]
        self.twins = torch.stack([folded, t2d.long()[mapped[folded]]])
        self.mappable = d2t >= 0  # [V_d] bool: drafter ids with a target twin (the TLI sampling mask)
        # Split tokens (see the module docstring).
        ids = torch.arange(d2t.shape[0], device=d2t.device, dtype=torch.int32)
        splits = ~self.mappable & (d2ts_len > 0)
        self.units = torch.where(self.mappable, d2t, torch.where(splits, t2d.shape[0] + ids, -1))
        first_twin = t2d.long()[d2ts[:, 0].long().clamp_min(0)]  # [V_d] drafter twin of the first piece
        proposable = (splits & (first_twin >= 0)).nonzero()[:, 0]
        self.split_twins = torch.stack([proposable, first_twin[proposable]])  # [2, P] int64
        self.sampled_units = torch.where(splits & (first_twin < 0), -1, self.units)
        # d2t, but a token folded by split_twins maps to its first piece: the target token its mass sits on in
        # q', which an n-gram merge starting with it takes the merge's mass from (kernels/proposal.py)
        self.proposal_d2t = d2t.index_copy(0, proposable, d2t[first_twin[proposable]])

    @property
    def drafter_vocab_size(self) -> int:
        return self.d2t.shape[0]

    @property
    def target_vocab_size(self) -> int:
        return self.t2d.shape[0]

    @property
    def num_direct(self) -> int:
        """Target ids reachable by the direct map (the intersection of the vocabularies)."""
        return int(torch.unique(self.d2t[self.d2t >= 0]).numel())

    @property
    def max_spelling(self) -> int:
        return self.t2ds.shape[1]

    def to(self, device: torch.device | str) -> VocabBridge:
        moved = {name: getattr(self, name).to(device) for name in self._TENSORS}
        return VocabBridge(**moved)

    _TENSORS = ("d2t", "t2d", "t2ds", "t2ds_len", "d2ts", "d2ts_len", "target_eos", "drafter_eos")

    # -- building ------------------------------------------------------------------------------------
    @classmethod
    def from_tokenizers(
        cls,
        drafter_tokenizer,
        target_tokenizer,
        *,
        drafter_vocab_size: int | None = None,
        target_vocab_size: int | None = None,
    ) -> VocabBridge:
        """Build (or fetch from the in-memory cache) the bridge of a tokenizer pair.

        ``*_vocab_size`` are the models' ``config.vocab_size`` (rows of their logits); they default to the
        tokenizers' sizes and must not be smaller than them.
        """
        return cls.from_vocabularies(
            Vocabulary.read(drafter_tokenizer),
            Vocabulary.read(target_tokenizer),
            drafter_vocab_size=drafter_vocab_size,
            target_vocab_size=target_vocab_size,
        )

    @classmethod
    def from_vocabularies(
        cls,
        drafter: Vocabulary,
        target: Vocabulary,
        *,
        drafter_vocab_size: int | None = None,
        target_vocab_size: int | None = None,
    ) -> VocabBridge:
        """``from_tokenizers`` on vocabularies read already (``vocabulary.py``): the engine reads each once."""
        sizes = []
        for name, vocabulary, size in (
            ("drafter_vocab_size", drafter, drafter_vocab_size),
            ("target_vocab_size", target, target_vocab_size),
        ):
            needed = vocabulary.highest + 1
            if size is not None and size < needed:
                raise ValueError(
                    f"`{name}`={size} is smaller than its tokenizer, whose ids reach {needed - 1}; is this the "
                    "tokenizer of that model?"
                )
            sizes.append(needed if size is None else size)
        key = (drafter.fingerprint, target.fingerprint, *sizes)
        with _CACHE_LOCK:
            bridge = _CACHE.get(key)
            if bridge is not None:
                _CACHE.move_to_end(key)
                return bridge
        bridge = _build(drafter, target, *sizes)
        with _CACHE_LOCK:
            _CACHE[key] = bridge
            while len(_CACHE) > _CACHED_BRIDGES:
                _CACHE.popitem(last=False)
        return bridge

    # -- use -----------------------------------------------------------------------------------------
    def spell_for_drafter(self, target_ids: torch.Tensor) -> torch.Tensor:
        """Concatenated drafter spelling of a 1-D run of target ids (host-side, outside the hot path)."""
        spellings = self.t2ds[target_ids.long()]
        return spellings[spellings >= 0].long()


# The bridges built last, by (the tokenizers' fingerprints, vocabulary.py; the vocabulary sizes): an engine
# built again for a pair (another EngineConfig, generate()'s engines, tokenizers loaded again) skips the build.
# A few only: a Llama-3 or Qwen pair's bridge holds 20-35 MB, and a process serving many pairs would otherwise
# keep all of them for good.
_CACHED_BRIDGES = 4
_CACHE: OrderedDict[tuple, VocabBridge] = OrderedDict()
_CACHE_LOCK = threading.Lock()


def _build(
    drafter_vocabulary: Vocabulary, target_vocabulary: Vocabulary, drafter_size: int, target_size: int
) -> VocabBridge:
    drafter_tokenizer, target_tokenizer = drafter_vocabulary.tokenizer, target_vocabulary.tokenizer
    drafter = token_bytes(drafter_vocabulary, drafter_size)
    target = token_bytes(target_vocabulary, target_size)
    drafter_canonical, target_canonical = _canonical(drafter), _canonical(target)

    d2t = torch.full((drafter_size,), -1, dtype=torch.int32)
    for index in range(drafter_size):
        piece = drafter.pieces[index] if index < len(drafter.pieces) else None
        if piece:
            d2t[index] = target_canonical.get(piece, -1)
    t2d = torch.full((target_size,), -1, dtype=torch.int32)
    for piece, index in target_canonical.items():
        if index < target_size:
            t2d[index] = drafter_canonical.get(piece, -1)

    spellings = _spellings(target, target_size, _Speller(drafter_tokenizer, drafter, drafter_canonical))
    target_spellings = _spellings(drafter, drafter_size, _Speller(target_tokenizer, target, target_canonical))
    # Special tokens by role: the EOS families map to each other; nothing else does.
    if drafter.eos_ids and target.eos_ids:
        d_eos = int(
            drafter_tokenizer.eos_token_id
            if drafter_tokenizer.eos_token_id is not None
            else drafter.eos_ids[0]
        )
        t_eos = int(
            target_tokenizer.eos_token_id if target_tokenizer.eos_token_id is not None else target.eos_ids[0]
        )
        for index in drafter.eos_ids:
            if index < drafter_size:
                d2t[index] = t_eos
        for index in target.eos_ids:
            if index < target_size:
                spellings[index] = [d_eos]
        t2d[t_eos] = d_eos
    for index in range(drafter_size):
        if d2t[index] >= 0:  # the twin (EOS included), also for ids that share their bytes with another
            target_spellings[index] = [int(d2t[index])]
    t2ds, t2ds_len = _padded(spellings)
    d2ts, d2ts_len = _padded(target_spellings)
    return VocabBridge(
        d2t=d2t,
        t2d=t2d,
        t2ds=t2ds,
        t2ds_len=t2ds_len,
        d2ts=d2ts,
        d2ts_len=d2ts_len,
        target_eos=torch.tensor(target.eos_ids, dtype=torch.int64),
        drafter_eos=torch.tensor(drafter.eos_ids, dtype=torch.int64),
    )


def _spellings(table: TokenTable, size: int, speller: _Speller) -> list[list[int]]:
    """Every id of ``table`` (one vocabulary) spelled in the speller's vocabulary: its canonical twin where
    there is one, else the spelling of its bytes; ``[]`` for ids without bytes or that cannot be spelled
    (the other model's context then skips them)."""
    spellings: list[list[int]] = [[] for _ in range(size)]
    for index in range(min(size, len(table.pieces))):
        piece = table.pieces[index]
        if piece:
            direct = speller.canonical.get(piece)
            spellings[index] = ([direct] if direct is not None else speller.spell(piece)) or []
    return spellings


def _padded(spellings: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged spellings as an int32 ``[n, width]`` table (-1 padded) and their lengths."""
    width = max(1, max(len(s) for s in spellings))
    table = torch.full((len(spellings), width), -1, dtype=torch.int32)
    lengths = torch.tensor([len(s) for s in spellings], dtype=torch.int32)
    flat = torch.tensor([i for s in spellings for i in s], dtype=torch.int32)
    rows = torch.repeat_interleave(torch.arange(len(spellings)), lengths.long())
    columns = torch.arange(flat.numel()) - torch.repeat_interleave(
        lengths.long().cumsum(0) - lengths.long(), lengths.long()
    )
    table[rows, columns] = flat
    return table, lengths
