"""VocabBridge: byte-exact direct map, drafter spellings of every target token, special tokens by role."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import shared_path
from tokenizers import decoders, normalizers, pre_tokenizers, trainers

from omnidraft_fast import bridge as bridge_module
from omnidraft_fast.bridge import VocabBridge, token_bytes
from omnidraft_fast.vocabulary import Vocabulary

TEXTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "The quick brown fox jumps over the lazy dog. It's 3.14159 — isn't it?",
    "naïve café, 東京タワー, ñandú, Ελληνικά, emoji 🙂🚀👩‍💻 done",
    "\t\tindented\twith tabs\n\n\n    and   runs   of    spaces      \r\n",
    'x=[i**2 for i in range(10) if i%3==0]  # comprehension\n"""docstring"""',
]


def _bytes_of(table, ids) -> bytes:
    return b"".join(table.pieces[i] for i in ids)


def _check_bridge(drafter_tokenizer, target_tokenizer, bridge: VocabBridge) -> None:
    """Every entry of the bridge's maps checked against the tokens' bytes. The maps are read once as lists:
    indexing a tensor per entry took most of the check's time at 128k-151k ids (5.6 s of 14 s of thread time
    for llama3 -> qwen3, bridge building included)."""
    drafter, target = token_bytes(drafter_tokenizer), token_bytes(target_tokenizer)
    d2t, t2d, units = bridge.d2t.tolist(), bridge.t2d.tolist(), bridge.units.tolist()
    t2ds = [row[:length] for row, length in zip(bridge.t2ds.tolist(), bridge.t2ds_len.tolist(), strict=True)]
    d2ts = [row[:length] for row, length in zip(bridge.d2ts.tolist(), bridge.d2ts_len.tolist(), strict=True)]
    # Every direct-mapped pair stands for the same bytes (EOS pairs map by role).
    for d, t in enumerate(d2t):
        if t < 0:
            continue
        if d in drafter.special:
            assert d in drafter.eos_ids and t in target.eos_ids
        else:
            assert drafter.pieces[d] == target.pieces[t], (d, t)
    for t, d in enumerate(t2d):
        if d >= 0:
            assert d2t[d] == t or t in target.eos_ids
    # Texts encoded by the target and spelled through t2ds give back the same bytes.
    for text in TEXTS:
        ids = [i for i in target_tokenizer.encode(text, add_special_tokens=False) if i not in target.special]
        spelled = bridge.spell_for_drafter(torch.tensor(ids)).tolist()
        assert _bytes_of(drafter, spelled) == _bytes_of(target, ids)
        assert _bytes_of(target, ids) in (text.encode(), b" " + text.encode())  # SentencePiece's dummy prefix
        for i in ids:  # and token by token
            assert _bytes_of(drafter, t2ds[i]) == target.pieces[i]
    # The other way round: every drafter token with bytes is spelled by target tokens with the same bytes
    # (its twin alone where it has one), so a drafted token with no twin can be proposed split.
    for d, piece in enumerate(drafter.pieces[: bridge.drafter_vocab_size]):
        spelling = d2ts[d]
        if d2t[d] >= 0:
            assert spelling == [d2t[d]] and units[d] == d2t[d]
        elif piece:
            assert spelling and _bytes_of(target, spelling) == piece, d
            assert units[d] == bridge.target_vocab_size + d
        else:
            assert not spelling and units[d] == -1
    # Special tokens by role: target EOS is spelled as the drafter's EOS; BOS never maps.
    t_eos = target_tokenizer.eos_token_id
    assert t2ds[t_eos] == [drafter_tokenizer.eos_token_id]
    if drafter_tokenizer.bos_token_id not in (None, drafter_tokenizer.eos_token_id):
        assert d2t[drafter_tokenizer.bos_token_id] == -1
    if target_tokenizer.bos_token_id is not None and target_tokenizer.bos_token_id != t_eos:
        assert len(t2ds[target_tokenizer.bos_token_id]) == 0


def test_trained_tokenizer_pair(trained_tokenizers):
    drafter, target = trained_tokenizers
    assert token_bytes(drafter).style == "sentencepiece" and token_bytes(target).style == "bytelevel"
    bridge = VocabBridge.from_tokenizers(drafter, target, drafter_vocab_size=420, target_vocab_size=384)
    assert bridge.d2t.shape == (420,) and bridge.t2d.shape == (384,) and bridge.t2ds.shape[0] == 384
    assert (bridge.d2t[len(drafter) :] == -1).all() and (
        bridge.t2ds_len[len(target) :] == 0
    ).all()  # padded ids
    assert 0 < bridge.num_direct < len(target)
    _check_bridge(drafter, target, bridge)
    # And the other way round: a byte-level drafter for a SentencePiece target.
    _check_bridge(target, drafter, VocabBridge.from_tokenizers(target, drafter))


def test_canonical_ids_prefer_real_tokens_over_byte_fallback(trained_tokenizers):
    drafter, target = trained_tokenizers
    bridge = VocabBridge.from_tokenizers(drafter, target)
    space = target.convert_tokens_to_ids("Ġ")
    assert bridge.t2d[space] == drafter.convert_tokens_to_ids("▁")  # not <0x20>
    assert bridge.d2t[drafter.convert_tokens_to_ids("<0x20>")] == space  # but the byte token maps too


def test_cached(trained_tokenizers):
    drafter, target = trained_tokenizers
    bridge = VocabBridge.from_tokenizers(drafter, target)
    assert VocabBridge.from_tokenizers(drafter, target) is bridge


def test_the_cache_keeps_the_last_bridges_only(trained_tokenizers):
    """A process serving many pairs (here: one pair at many padded vocabulary sizes) keeps the last few
    bridges, not all of them; the most recently used stays."""
    from omnidraft_fast import bridge as module

    drafter, target = trained_tokenizers
    size = max(target.get_vocab().values()) + 1
    first = VocabBridge.from_tokenizers(drafter, target, target_vocab_size=size + 1)
    for extra in range(2, 2 + module._CACHED_BRIDGES):
        VocabBridge.from_tokenizers(drafter, target, target_vocab_size=size + extra)
        assert VocabBridge.from_tokenizers(drafter, target, target_vocab_size=size + 2) is not None
    assert len(module._CACHE) == module._CACHED_BRIDGES
    assert VocabBridge.from_tokenizers(drafter, target, target_vocab_size=size + 1) is not first  # dropped
    kept = VocabBridge.from_tokenizers(drafter, target, target_vocab_size=size + 2)
    assert VocabBridge.from_tokenizers(drafter, target, target_vocab_size=size + 2) is kept


def test_the_cache_tells_apart_tokenizers_with_other_special_tokens(trained_tokenizers):
    """Two tokenizers with one backend (the same tokenizer.json) but another EOS, as a base model's and
    its chat model's: each gets its own bridge, whose EOS maps by its own role."""
    drafter, target = trained_tokenizers
    bridge = VocabBridge.from_tokenizers(drafter, target)
    chat = copy.deepcopy(drafter)
    chat.eos_token = "<unk>"
    assert chat.backend_tokenizer.to_str() == drafter.backend_tokenizer.to_str()
    other = VocabBridge.from_tokenizers(chat, target)
    assert other is not bridge
    unk, eos = chat.convert_tokens_to_ids("<unk>"), target.eos_token_id
    assert int(bridge.d2t[unk]) == -1 and int(other.d2t[unk]) == eos


# Past both trained tokenizers' ids (400 and 350), so that a token added in place leaves the cache key's sizes
SIZES = {"drafter_vocab_size": 420, "target_vocab_size": 384}


def _built_anew(drafter, target) -> VocabBridge:
    """The pair's bridge as built now, past the cache."""
    vocabularies = Vocabulary.read(drafter), Vocabulary.read(target)
    return bridge_module._build(*vocabularies, SIZES["drafter_vocab_size"], SIZES["target_vocab_size"])


def _equal(first: VocabBridge, second: VocabBridge) -> bool:
    return all(torch.equal(getattr(first, name), getattr(second, name)) for name in VocabBridge._TENSORS)


def _retrain(tokenizer) -> None:
    """Train the byte-level tokenizer's model again, in place, on other text (another vocabulary)."""
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.backend_tokenizer.train_from_iterator(TEXTS * 4, trainer)


def _set_option(model) -> None:
    """Give the BPE model an end-of-word suffix, in place. Its cache of words tokenized before would go on
    answering with the old spellings (a tokenizers cache, not the bridge's), so it is emptied: the tokenizer
    then spells as it is now."""
    model.end_of_word_suffix = "</w>"
    model._clear_cache()


CHANGES = {
    "drafter token added": lambda drafter, target: drafter.add_tokens(["qqzz"]),
    "target token added": lambda drafter, target: target.add_tokens(["qqzz"]),
    "drafter EOS-like special token added": lambda drafter, target: drafter.add_special_tokens(
        {"additional_special_tokens": ["<|im_end|>"]}
    ),
    "drafter decoder now byte-level": lambda drafter, target: setattr(
        drafter.backend_tokenizer, "decoder", decoders.ByteLevel()
    ),
    "target decoder now SentencePiece's": lambda drafter, target: setattr(
        target.backend_tokenizer, "decoder", decoders.Metaspace()
    ),
    "drafter model's option": lambda drafter, target: _set_option(drafter.backend_tokenizer.model),
    "target model retrained": lambda drafter, target: _retrain(target),
}


@pytest.mark.parametrize("change", CHANGES)
def test_a_tokenizer_changed_in_place_gets_the_bridge_of_what_it_is_now(
    trained_tokenizers, change, monkeypatch
):
    """The cache's key follows a tokenizer changed after its bridge was built (tokens added, an EOS-like
    special token, its decoder, its model's options or vocabulary), whose parts the key keeps digests of
    (vocabulary.py): a cached bridge of what it was would map the wrong bytes, silently."""
    drafter, target = (copy.deepcopy(tokenizer) for tokenizer in trained_tokenizers)
    monkeypatch.setattr(
        bridge_module, "_CACHE", type(bridge_module._CACHE)()
    )  # `before` built here, whatever
    before = VocabBridge.from_tokenizers(drafter, target, **SIZES)  # ran before in this worker
    CHANGES[change](drafter, target)
    anew = _built_anew(drafter, target)
    assert not _equal(anew, before)  # the change matters to the bridge
    assert _equal(VocabBridge.from_tokenizers(drafter, target, **SIZES), anew)


def test_the_cache_key_is_what_the_bridge_reads(trained_tokenizers):
    """Tokenizers equal in what the bridge reads share its cached bridge, whatever the object (a tokenizer
    loaded again per request builds none) and whatever their normaliser and pre-tokeniser, which the bridge
    does not read."""
    drafter, target = trained_tokenizers
    bridge = VocabBridge.from_tokenizers(drafter, target, **SIZES)
    other = copy.deepcopy(target)
    other.backend_tokenizer.normalizer = normalizers.Lowercase()
    other.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    assert VocabBridge.from_tokenizers(copy.deepcopy(drafter), other, **SIZES) is bridge
    assert _equal(bridge, _built_anew(drafter, other))


def test_vocabulary_digests_tell_apart_what_joined_tokens_would_not():
    """The vocabulary's digest in the cache key is its tokens in id order joined by NUL, whatever the dict's
    order; vocabularies that join alike (a NUL inside a token, a hole, two strings for one id) differ."""
    from omnidraft_fast.vocabulary import _vocabulary_digest

    def digest(ids: dict[str, int]) -> str:
        return _vocabulary_digest(ids, max(ids.values()))

    assert digest({"a": 0, "b": 1}) == digest({"b": 1, "a": 0})
    vocabularies = [
        {"a": 0, "b": 1, "c": 2},
        {"b": 0, "a": 1, "c": 2},
        {"a\0b": 0, "c": 1},
        {"a": 0, "b\0c": 1},
        {"a": 0, "b": 1, "c": 3},
        {"a": 0, "b": 1, "": 2, "c": 3},
        {"a": 0, "b": 1, "B": 1, "c": 2},
        {"a": 0, "x": 1, "B": 1, "c": 2},  # joins as the one above where the later string of id 1 overwrites
        {"a": 0, "A": 0, "c": 2},  # as many strings as ids, with a hole at 1
        {"a": 0, "A": 0, "c": 2, "C": 2},
    ]
    assert len({digest(ids) for ids in vocabularies}) == len(vocabularies)
    assert digest({"a": 0, "A": 0, "c": 2}) == digest({"c": 2, "A": 0, "a": 0})


def test_a_vocabularys_highest_id():
    """``Vocabulary.highest`` is the largest id, whatever the dict's order, and -1 for an empty vocabulary
    (so that ``highest + 1`` ids, the size a bridge needs, is 0)."""
    assert Vocabulary(None, {"a": 3, "b": 7, "c": 0}).highest == 7
    assert Vocabulary(None, {}).highest == -1


def test_vocab_size_smaller_than_tokenizer(trained_tokenizers):
    drafter, target = trained_tokenizers
    with pytest.raises(ValueError, match="target_vocab_size"):
        VocabBridge.from_tokenizers(drafter, target, target_vocab_size=100)


@pytest.mark.parametrize(
    ("drafter", "target", "direct"),
    # Exact-bytes intersections of the real vocabularies (shared/tokenizers/README.md), EOS included.
    [
        ("mistral", "llama3", 29_109),
        ("mistral", "qwen3", 29_233),
        ("llama3", "qwen3", 109_566),
        ("gpt2", "llama3", None),
    ],
)
def test_real_tokenizer_pairs(drafter, target, direct):
    from transformers import AutoTokenizer

    drafter_tokenizer = AutoTokenizer.from_pretrained(shared_path("tokenizers", drafter))
    target_tokenizer = AutoTokenizer.from_pretrained(shared_path("tokenizers", target))
    bridge = VocabBridge.from_tokenizers(drafter_tokenizer, target_tokenizer)
    if direct is not None:
        assert abs(bridge.num_direct - direct) <= 2, bridge.num_direct  # + the EOS pair mapped by role
    _check_bridge(drafter_tokenizer, target_tokenizer, bridge)


def _word_level(vocab: dict[str, int], decoder=None, **special_tokens):
    """A word-level fast tokenizer over ``vocab`` (``<unk>`` in it), with ``decoder`` as its decoder."""
    from tokenizers import Tokenizer
    from tokenizers import models as tokenizer_models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(tokenizer_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if decoder is not None:
        backend.decoder = decoder
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", **special_tokens)


SENTENCEPIECE_VOCAB = {"<unk>": 0, "a": 1, "<0x0A>": 2, "▁a": 3}


@pytest.mark.parametrize(
    "decoder",
    [decoders.ByteFallback(), decoders.Metaspace(), decoders.Replace("▁", " ")],
    ids=["byte-fallback-alone", "metaspace", "replace-alone"],
)
def test_each_sentencepiece_decoder_alone_marks_the_sentencepiece_style(decoder):
    """Any one of the SentencePiece marks in the decoder (a ByteFallback step, a Metaspace step, a ``▁``
    replaced) is enough for the SentencePiece reading (module docstring): ``<0xNN>`` is the byte NN, a byte
    token, and ``▁`` a space. Without a decoder the same vocabulary is read as plain text, token by token."""
    table = token_bytes(_word_level(SENTENCEPIECE_VOCAB, decoder))
    assert table.style == "sentencepiece"
    assert table.pieces == [None, b"a", b"\n", b" a"] and table.byte_tokens == {2}
    plain = token_bytes(_word_level(SENTENCEPIECE_VOCAB))
    assert plain.style == "plain"
    assert plain.pieces == [None, b"a", b"<0x0A>", "▁a".encode()] and not plain.byte_tokens


def test_a_byte_level_token_outside_the_byte_map_keeps_its_text():
    """A byte-level token string is read through GPT-2's 256-character byte map (``Ġ`` a space); a
    character outside the map (``ń``, U+0144, the code point right after the map's last one, U+0143) leaves
    the token read as its UTF-8 text."""
    table = token_bytes(_word_level({"<unk>": 0, "Ġa": 1, "ń": 2, "Ńa": 3}, decoders.ByteLevel()))
    assert table.style == "bytelevel"
    assert table.pieces[1] == b" a"
    assert table.pieces[2] == "ń".encode() == b"\xc5\x84"
    assert table.pieces[3] == bytes([0xAD]) + b"a"  # U+0143 is byte 0xAD, the map's last non-printable


def test_one_piece_per_id():
    """``token_bytes`` gives one entry per id: the tokenizer's ids (largest id + 1), or ``vocab_size`` where
    that is larger, never less (0 for an empty vocabulary)."""
    tokenizer = _word_level({"<unk>": 0, "a": 1, "b": 5})
    assert token_bytes(tokenizer).pieces == [None, b"a", None, None, None, b"b"]
    assert len(token_bytes(tokenizer, vocab_size=8).pieces) == 8
    assert len(token_bytes(tokenizer, vocab_size=3).pieces) == 6
    assert token_bytes(Vocabulary(tokenizer, {})).pieces == []


def test_canonical_id_is_the_lowest_real_token_else_the_lowest_byte_token():
    """Among ids sharing bytes the canonical one is the lowest non-byte-fallback id, else the lowest byte
    token (module docstring), whatever the order of byte and other tokens among the ids."""
    table = bridge_module.TokenTable(
        pieces=[b"x", b"a", b"a", b"b", b"b", b"c", b"c", None],
        byte_tokens=frozenset({3, 5, 6}),
        special={7: "</s>"},
        eos_ids=(7,),
        style="sentencepiece",
    )
    # a: two real tokens -> the lower; b: byte token 3 then real 4 -> 4; c: two byte tokens -> the lower.
    assert bridge_module._canonical(table) == {b"x": 0, b"a": 1, b"b": 4, b"c": 5}


def test_a_token_made_special_after_loading_has_no_bytes():
    """A token made a special one after loading (here a plain added token set as EOS, as chat setups do with
    ``<|im_end|>``) counts as special, by the tokenizer's list of special tokens: no bytes, and an EOS id."""
    tokenizer = _word_level({"<unk>": 0, "a": 1})
    tokenizer.add_tokens(["<|im_end|>"])  # not special when added
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert token_bytes(tokenizer).pieces[end] == b"<|im_end|>"
    tokenizer.eos_token = "<|im_end|>"
    table = token_bytes(tokenizer)
    assert table.pieces == [None, b"a", None] and end in table.special and table.eos_ids == (end,)


def test_a_spelling_is_the_drafters_own_bpe_where_that_gives_the_bytes():
    """A target token is spelled in drafter tokens by the drafter's own BPE where that gives back its bytes
    (``_Speller``), not by the longest match: with the merge ``b c`` ranked before ``a b``, BPE spells
    ``abc`` as ``a`` + ``bc``, where the longest match from the left would take ``ab`` + ``c``."""
    from tokenizers import Tokenizer
    from tokenizers import models as tokenizer_models
    from transformers import PreTrainedTokenizerFast

    vocab = {"a": 0, "b": 1, "c": 2, "bc": 3, "ab": 4}
    backend = Tokenizer(tokenizer_models.BPE(vocab, [("b", "c"), ("a", "b")]))
    backend.decoder = decoders.ByteLevel()
    drafter = PreTrainedTokenizerFast(tokenizer_object=backend)
    target = _word_level({"<unk>": 0, "abc": 1, "ab": 2})
    assert token_bytes(drafter).style == "bytelevel" and token_bytes(target).style == "plain"
    bridge = VocabBridge.from_tokenizers(drafter, target)
    assert bridge.t2ds_len[1] == 2 and bridge.t2ds[1, :2].tolist() == [vocab["a"], vocab["bc"]]
    assert bridge.t2d.tolist() == [-1, -1, vocab["ab"]]  # "ab" has a twin, "abc" none


def test_twins_fold_onto_target_id_zero_too():
    """``twins`` lists every drafter id that maps to a target id whose canonical drafter id is another one,
    beside that canonical id; target id 0 is an id like any other (GPT-2's id 0 is ``!``). Here the drafter
    spells ``!`` twice (``!`` and the byte token ``<0x21>``): both map to the target's ``!``, id 0, whose
    canonical drafter id is the real token, so the byte token is folded onto it."""
    drafter = _word_level({"<unk>": 0, "!": 1, "<0x21>": 2}, decoders.ByteFallback())
    target = _word_level({"!": 0, "<unk>": 1})
    bridge = VocabBridge.from_tokenizers(drafter, target)
    assert bridge.d2t.tolist() == [-1, 0, 0] and bridge.t2d.tolist() == [1, -1]
    assert bridge.twins.tolist() == [[2], [1]]
    assert bridge.num_direct == 1  # the one target id with a drafter twin: id 0


def test_a_split_whose_first_piece_is_target_id_zero():
    """A drafter token with no target twin is proposed split into its target spelling; where the first piece
    has a drafter twin, the token is folded beside that twin (``split_twins``), keeps its split marker in
    ``sampled_units`` and maps to that first piece in ``proposal_d2t``, also where the first piece is target
    id 0. Here ``!a`` is spelled by the target as ``!`` (id 0) + ``a``, and ``!`` is the drafter's id 1."""
    drafter = _word_level({"<unk>": 0, "!": 1, "a": 2, "!a": 3})
    target = _word_level({"!": 0, "<unk>": 1, "a": 2})
    bridge = VocabBridge.from_tokenizers(drafter, target)
    assert bridge.d2t.tolist() == [-1, 0, 2, -1]
    assert bridge.d2ts_len[3] == 2 and bridge.d2ts[3, :2].tolist() == [0, 2]
    split = bridge.target_vocab_size + 3
    assert bridge.units.tolist() == [-1, 0, 2, split] and bridge.sampled_units.tolist() == [-1, 0, 2, split]
    assert bridge.split_twins.tolist() == [[3], [1]]
    assert bridge.proposal_d2t.tolist() == [-1, 0, 2, 0]


def test_splits_by_whether_their_first_piece_has_a_drafter_twin():
    """Split tokens are folded beside the drafter twin of their first piece, drafter id 0 included; a split
    whose first piece has no drafter twin keeps its marker in ``units`` but is -1 in ``sampled_units`` (its
    proposal probability cannot be read) and is not in ``split_twins``. Here ``!a`` is spelled ``!`` + ``a``
    (``!`` is drafter id 0) and ``ca`` is spelled ``c`` + ``a``, where the drafter has no ``c``."""
    drafter = _word_level({"!": 0, "<unk>": 1, "a": 2, "!a": 3, "ca": 4})
    target = _word_level({"!": 0, "<unk>": 1, "a": 2, "c": 3})
    bridge = VocabBridge.from_tokenizers(drafter, target)
    assert bridge.d2t.tolist() == [0, -1, 2, -1, -1] and bridge.t2d.tolist() == [0, -1, 2, -1]
    assert bridge.d2ts[3, :2].tolist() == [0, 2] and bridge.d2ts[4, :2].tolist() == [3, 2]
    marker = bridge.target_vocab_size  # + the drafter id
    assert bridge.units.tolist() == [0, -1, 2, marker + 3, marker + 4]
    assert bridge.sampled_units.tolist() == [0, -1, 2, marker + 3, -1]
    assert bridge.split_twins.tolist() == [[3], [0]]
    assert bridge.proposal_d2t.tolist() == [0, -1, 2, 0, -1]


def test_eos_maps_by_role_through_the_tokenizers_eos_token():
    """The EOS families map to each other by role (module docstring): every drafter EOS id to the target's
    ``eos_token_id``, that target id back to the drafter's ``eos_token_id``, each way with the other's EOS as
    its one-token spelling; where a tokenizer has no ``eos_token_id``, its lowest EOS-named special stands
    for it, and where one side has no EOS at all, nothing maps by role. The EOS may be id 0."""
    both = _word_level(  # two EOS ids, 1 and 2; the tokenizer's EOS is 2
        {"<unk>": 0, "</s>": 1, "<|im_end|>": 2, "a": 3},
        eos_token="<|im_end|>",
        additional_special_tokens=["</s>"],
    )
    first = _word_level({"<eos>": 0, "<unk>": 1, "a": 2}, eos_token="<eos>")  # EOS at id 0
    named = _word_level({"<unk>": 0, "a": 1, "</s>": 2}, additional_special_tokens=["</s>"])  # no eos_token
    none = _word_level({"<unk>": 0, "a": 1})  # no EOS at all
    assert token_bytes(both).eos_ids == (1, 2) and token_bytes(named).eos_ids == (2,)
    assert named.eos_token_id is None and not token_bytes(none).eos_ids

    bridge = VocabBridge.from_tokenizers(both, first)
    assert bridge.d2t.tolist() == [-1, 0, 0, 2] and bridge.t2d.tolist() == [2, -1, 3]
    assert bridge.t2ds[0, : bridge.t2ds_len[0]].tolist() == [2]
    assert [bridge.d2ts[i, : bridge.d2ts_len[i]].tolist() for i in (1, 2)] == [[0], [0]]

    bridge = VocabBridge.from_tokenizers(first, both)
    assert bridge.d2t.tolist() == [2, -1, 3] and bridge.t2d.tolist() == [-1, -1, 0, 2]
    assert [bridge.t2ds[i, : bridge.t2ds_len[i]].tolist() for i in (1, 2)] == [[0], [0]]

    bridge = VocabBridge.from_tokenizers(named, first)
    assert bridge.d2t.tolist() == [-1, 2, 0] and bridge.t2d.tolist() == [2, -1, 1]
    bridge = VocabBridge.from_tokenizers(first, named)
    assert bridge.d2t.tolist() == [2, -1, 1] and bridge.t2d.tolist() == [-1, 2, 0]

    bridge = VocabBridge.from_tokenizers(both, none)
    assert bridge.d2t.tolist() == [-1, -1, -1, 1] and bridge.t2d.tolist() == [-1, 3]
    assert bridge.d2ts_len.tolist() == [0, 0, 0, 1]


def test_spell_for_drafter_keeps_drafter_id_zero():
    """``spell_for_drafter`` concatenates the drafter spellings of target ids, dropping only the padding
    (-1): drafter id 0 is a token like any other. Here ``!`` is id 0 on both sides and the target's ``ca`` is
    spelled by the drafter as ``c`` + ``a``."""
    drafter = _word_level({"!": 0, "<unk>": 1, "a": 2, "c": 3})
    target = _word_level({"!": 0, "<unk>": 1, "ca": 2, "a": 3})
    bridge = VocabBridge.from_tokenizers(drafter, target)
    assert bridge.spell_for_drafter(torch.tensor([2, 0, 3, 0])).tolist() == [3, 2, 0, 2, 0]


def test_vocabularies_with_nothing_in_common():
    """Where no token of either side can be spelled on the other, nothing maps and every spelling is empty:
    the spelling tables are one column wide (the longest spelling, at least 1) of padding, and no drafted
    token can be proposed (``units`` -1)."""
    drafter = _word_level({"<unk>": 0, "x": 1})
    target = _word_level({"<unk>": 0, "a": 1, "b": 2})
    bridge = VocabBridge.from_tokenizers(drafter, target)
    assert bridge.d2t.tolist() == [-1, -1] and bridge.t2d.tolist() == [-1, -1, -1] and bridge.num_direct == 0
    assert bridge.max_spelling == 1 and bridge.t2ds.tolist() == [[-1], [-1], [-1]]
    assert bridge.d2ts.tolist() == [[-1], [-1]] and bridge.d2ts_len.tolist() == [0, 0]
    assert bridge.units.tolist() == [-1, -1] and bridge.split_twins.shape == (2, 0)


def test_spelling_tables_are_as_wide_as_the_longest_spelling():
    """The spelling tables are as wide as the longest spelling: one column where every token has a twin."""
    drafter = _word_level({"<unk>": 0, "a": 1, "b": 2})
    target = _word_level({"b": 0, "a": 1, "<unk>": 2})
    bridge = VocabBridge.from_tokenizers(drafter, target)
    assert bridge.d2t.tolist() == [-1, 1, 0] and bridge.t2d.tolist() == [2, 1, -1]
    assert bridge.t2ds.tolist() == [[2], [1], [-1]] and bridge.d2ts.tolist() == [[-1], [1], [0]]
