"""Training the zoo's two tokenizer styles with the `tokenizers` library (no download).

- ``sentencepiece_style``: metaspace (``▁`` for spaces, a dummy prefix) with the 256 byte-fallback
  tokens ``<0xNN>``, like Llama-2/Mistral; BOS ``<s>``, EOS ``</s>``. Words are cut where SentencePiece
  cuts them: before a space, and a run of spaces is a piece of its own but for the space that begins the
  next word (Mistral: ``"\n        return"`` is ``<0x0A> ▁▁▁▁▁▁▁ ▁return``), so code's indentation gets
  tokens of its own.
- ``byte_level``: GPT-2-style byte-level BPE (``Ġ``/``Ċ``), like Llama-3/Qwen; EOS ``<|endoftext|>``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast

__all__ = ["byte_level", "sentencepiece_style"]


def sentencepiece_style(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A metaspace BPE with byte fallback of exactly ``vocab_size`` ids (256 of them byte tokens)."""
    if vocab_size <= 256 + 3:
        raise ValueError(f"`vocab_size` must exceed 259 (256 byte tokens + 3 specials), got {vocab_size}")
    # Pieces before BPE, so that no token spans a word boundary: a word with the space before it, a run of
    # spaces less the one that begins the next word, a run of spaces at the end.
    metaspace = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False),
            pre_tokenizers.Split(Regex("▁?[^▁]+|▁+(?=▁[^▁])|▁+"), behavior="isolated"),
        ]
    )
    draft = Tokenizer(BPE(unk_token="<unk>"))
    draft.pre_tokenizer = metaspace
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 256, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    draft.train_from_iterator(texts, trainer)
    model = json.loads(draft.to_str())["model"]
    vocab = dict(model["vocab"])
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = Tokenizer(BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = metaspace
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", padding_side="left"
    )


def byte_level(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE of ``vocab_size`` ids, with ``<|endoftext|>`` as EOS and padding."""
    tokenizer = Tokenizer(BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>", padding_side="left"
    )
