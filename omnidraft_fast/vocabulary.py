"""Vocabulary: one read of a tokenizer's vocabulary, and the fingerprint of what a bridge is built from.

``tokenizer.get_vocab()`` builds a fresh dict each call (0.1-0.2 s for Llama-3's 128k ids on a CPU), so an engine
reads each tokenizer's vocabulary once and passes the read where it is needed: the checks that the
tokenizers fit their models, the "same vocabulary?" comparison, the bridge's token bytes (``bridge.py``)
and the key of its cache.

The fingerprint (that key) covers everything of a tokenizer the bridge reads:

- the vocabulary (token string -> id, added tokens included): a digest of this read;
- the added tokens (id, content, special), the special tokens and the EOS id: specials map by role;
- the decoder's settings, which decide how token strings become bytes (byte-level, SentencePiece or
  decoded one by one), and for tokens decoded one by one what transformers' ``decode`` adds (the
  tokenizer's class, ``clean_up_tokenization_spaces``);
- the tokenizer model (type, options, and its state: BPE merges, Unigram scores), whose ``tokenize``
  spells tokens across vocabularies.

The normaliser, pre-tokeniser and post-processor are not read by the bridge and are left out (tokenizers
that differ there alone get one bridge, the same they would each build).

The model's state is serialised whole (Llama-3's 280k merges: as long as the vocabulary read), so its
digest is kept per backend tokenizer object and taken again whenever the vocabulary, the model's type or
options differ from when it was taken (a model trained in place, or replaced). Left unseen: a backend
whose model was replaced by one with the same vocabulary and options but other merges; merges only pick
one of the spellings with the right bytes, so the bridge it gets is still byte-exact, as its own would be.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
import weakref
from typing import Any

__all__ = ["Vocabulary", "backend"]


class Vocabulary:
    """A tokenizer and one read of its vocabulary (``Vocabulary.read(tokenizer)``).

    Attributes:
        tokenizer: the Hugging Face tokenizer read.
        ids: ``tokenizer.get_vocab()``: token string -> id, added tokens included.
        highest: the largest id (-1 for an empty vocabulary).
    """

    def __init__(self, tokenizer: Any, ids: dict[str, int]):
        self.tokenizer = tokenizer
        self.ids = ids
        self.highest = max(ids.values(), default=-1)

    @classmethod
    def read(cls, tokenizer: Any) -> Vocabulary:
        """Read ``tokenizer``'s vocabulary (a tokenizer object: ``bridge.check_tokenizer`` refuses others)."""
        return cls(tokenizer, tokenizer.get_vocab())

    @functools.cached_property
    def fingerprint(self) -> str:
        """A digest of everything the bridge reads from the tokenizer (module docstring), taken once."""
        return _fingerprint(self)


def backend(tokenizer: Any) -> Any:
    """The tokenizer's Rust backend (``tokenizers.Tokenizer``), which the bridge reads; refused without one."""
    found = getattr(tokenizer, "backend_tokenizer", None)
    if found is None:
        raise TypeError(
            f"the bridge needs a fast (Rust-backed) Hugging Face tokenizer, got {type(tokenizer).__name__}; "
            "load it with AutoTokenizer.from_pretrained(..., use_fast=True)"
        )
    return found


def added_tokens(tokenizer: Any) -> tuple:
    """What ``add_tokens``/``add_special_tokens`` change in a tokenizer beyond its base vocabulary: its added
    tokens (id, text, special) in id order, its special tokens sorted, its EOS id (read in about 0.2 ms at
    Llama-3's; the fingerprint and the engine's stop strings read it)."""
    added = sorted(
        (index, token.content, token.special) for index, token in tokenizer.added_tokens_decoder.items()
    )
    return tuple(added), tuple(sorted(tokenizer.all_special_tokens)), tokenizer.eos_token_id


def _vocabulary_digest(ids: dict[str, int], highest: int) -> str:
    """A digest of ``ids`` whatever the dict's order: the tokens in id order, joined by NUL (a quarter of the
    read's time); JSON of the sorted items (a few times slower) where that would be ambiguous: holes, ids with
    two strings, a NUL in a token."""
    tokens: list[str | None] = [None] * (highest + 1)
    for token, index in ids.items():
        tokens[index] = token
    if len(ids) == len(tokens):  # as many strings as ids: one string per id, or a hole (None) somewhere
        try:
            joined = "\0".join(tokens)
        except TypeError:  # a hole
            joined = None
        if joined is not None and joined.count("\0") == len(tokens) - 1:
            return hashlib.sha1(joined.encode("utf-8", "surrogatepass")).hexdigest()
    return hashlib.sha1(json.dumps(sorted(ids.items())).encode()).hexdigest()


def _fingerprint(vocabulary: Vocabulary) -> str:
    tokenizer = vocabulary.tokenizer
    rust = backend(tokenizer)
    decoder = rust.decoder
    vocab = _vocabulary_digest(vocabulary.ids, vocabulary.highest)
    parts = (
        vocab,
        _model_digest(rust, vocab),
        None if decoder is None else decoder.__getstate__().decode(),
        *added_tokens(tokenizer),
        f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}",
        getattr(tokenizer, "clean_up_tokenization_spaces", None),
        getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", None),
    )
    return hashlib.sha1(repr(parts).encode("utf-8", "surrogatepass")).hexdigest()


def _model_digest(rust: Any, vocab: str) -> str:
    """A digest of the backend's tokenizer model (type, options, state), kept per backend while the
    vocabulary digest ``vocab`` and the model's type and options stay those it was taken with."""
    model = rust.model
    options = tuple(
        (name, getattr(model, name))
        for name in dir(model)
        if not name.startswith("_") and not callable(getattr(model, name))
    )
    stamp = (vocab, type(model).__name__, options)
    with _MODEL_DIGESTS_LOCK:
        kept = _MODEL_DIGESTS.get(rust)
    if kept is not None and kept[0] == stamp:
        return kept[1]
    digest = hashlib.sha1(model.__getstate__()).hexdigest()
    with _MODEL_DIGESTS_LOCK:
        _MODEL_DIGESTS[rust] = (stamp, digest)
    return digest


# backend tokenizer -> (the stamp its model's digest was taken under, the digest); an entry goes with its
# backend
_MODEL_DIGESTS: weakref.WeakKeyDictionary[Any, tuple[tuple, str]] = weakref.WeakKeyDictionary()
_MODEL_DIGESTS_LOCK = threading.Lock()
