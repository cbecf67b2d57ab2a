"""load_state on states that do not fit or are damaged: refused whole with the reason, the engine unchanged;
save_state's file readable as any file the caller writes."""

from __future__ import annotations

import copy
import os
import stat

import pytest
import torch
from conftest import left_padded_prompts, tiny_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from omnidraft_fast import AdaptiveConfig, DistillConfig, EngineConfig, SpeculativeEngine

VOCAB = 96


@pytest.fixture(scope="module")
def pair():
    return tiny_model("llama", VOCAB, seed=0), tiny_model("llama", VOCAB, seed=1, hidden=16, layers=1)


def _engine(pair, **config):
    torch.manual_seed(0)
    return SpeculativeEngine(*pair, config=EngineConfig(**config))


def _learned(engine):
    parts = list(engine.learner.adapter.state_dict().values()) if engine.learner.adapter else []
    parts += list(engine.learner.head.state_dict().values()) if engine.learner.head else []
    parts += [
        t
        for o in (engine.learner.optimizer, engine.learner.head_optimizer)
        if o
        for t in o.state_dict().values()
    ]
    return [t.detach().clone() for t in parts]


def _served(engine, seed):
    ids, mask = left_padded_prompts(VOCAB, [6, 4], seed=seed)
    torch.manual_seed(seed)
    engine.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, pad_token_id=0)


LEARNING = dict(distill=DistillConfig(interval=1, rank=8, lr=1e-2), adaptive=AdaptiveConfig(interval=1))


def _saved_then_learning(pair, path, **source_config):
    """An engine with ``source_config`` serves once and saves to ``path``; then a learning engine that has
    served twice, and its learned tensors: (engine, before)."""
    source = _engine(pair, **source_config)
    _served(source, 0)
    source.save_state(path)
    engine = _engine(pair, **LEARNING)
    for seed in (1, 2):
        _served(engine, seed)
    return engine, _learned(engine)


def test_a_state_missing_a_part_the_engine_has_is_refused(pair, tmp_path):
    engine, before = _saved_then_learning(pair, tmp_path / "adapter.safetensors", distill=LEARNING["distill"])
    with pytest.raises(ValueError, match=r"holds no acceptance head .* but this engine has one"):
        engine.load_state(tmp_path / "adapter.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(before, _learned(engine), strict=True))


def _tensors(part):
    return [t.detach().clone() for t in part.state_dict().values()]


def _equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_strict_false_loads_the_parts_both_have(pair, tmp_path):
    """As torch's load_state_dict(strict=False): an adapter-only state gives a learning engine its adapter
    and moments, its head and head moments stay; the other way the file's head is not read. The returned
    parts say which were left out."""
    from omnidraft_fast.state import StateParts

    source = _engine(pair, distill=LEARNING["distill"])
    _served(source, 0)
    source.save_state(tmp_path / "adapter.safetensors")
    engine, _ = _saved_then_learning(pair, tmp_path / "both.safetensors", **LEARNING)
    head, head_moments = _tensors(engine.learner.head), _tensors(engine.learner.head_optimizer)
    parts = engine.load_state(tmp_path / "adapter.safetensors", strict=False)
    assert parts == StateParts(missing=["head"], unexpected=[])
    assert _equal(_tensors(engine.learner.adapter), _tensors(source.learner.adapter))
    assert _equal(_tensors(engine.learner.optimizer), _tensors(source.learner.optimizer))
    assert _equal(head, _tensors(engine.learner.head))
    assert _equal(head_moments, _tensors(engine.learner.head_optimizer))
    _served(engine, 3)  # serves and learns on

    saved = SpeculativeEngine(*pair, config=EngineConfig(**LEARNING))
    saved.load_state(tmp_path / "both.safetensors")
    assert source.load_state(tmp_path / "both.safetensors", strict=False) == StateParts([], ["head"])
    assert _equal(_tensors(source.learner.adapter), _tensors(saved.learner.adapter))
    # strict (the default) refuses both, naming strict=False
    for path, engine_ in (("adapter", engine), ("both", source)):
        with pytest.raises(ValueError, match="strict=False"):
            engine_.load_state(tmp_path / f"{path}.safetensors")
    assert engine.load_state(tmp_path / "both.safetensors") == StateParts([], [])
    with pytest.raises(TypeError, match="`strict` must be True or False"):
        engine.load_state(tmp_path / "both.safetensors", strict="no")


def test_strict_false_gives_a_learning_engine_a_saved_ngram_table(tmp_path):
    """A cross-vocabulary state saved without learning (its n-gram table) loads into an engine that
    distils, with strict=False: the table is the saved one, the adapter stays fresh."""
    from omnidraft_fast.zoo import load

    zoo = load("code-pair")
    tokenizers = dict(target_tokenizer=zoo.target_tokenizer, drafter_tokenizer=zoo.drafter_tokenizer)
    plain = SpeculativeEngine(
        zoo.target, zoo.drafter_cross, config=EngineConfig(ngram_preseed=False), **tokenizers
    )
    plain.generate(**zoo.target_tokenizer(["def add(a, b):"], return_tensors="pt"), max_new_tokens=16)
    plain.save_state(tmp_path / "table.safetensors")
    config = EngineConfig(ngram_preseed=False, distill=DistillConfig(rank=8))
    learning = SpeculativeEngine(zoo.target, copy.deepcopy(zoo.drafter_cross), config=config, **tokenizers)
    adapter = _tensors(learning.learner.adapter)
    assert learning.load_state(tmp_path / "table.safetensors", strict=False).missing == ["adapter"]
    assert int(learning.ngram.size()) == int(plain.ngram.size()) > 0
    assert _equal(_tensors(learning.ngram), _tensors(plain.ngram))
    assert _equal(adapter, _tensors(learning.learner.adapter))


def _saved_file(engine, path):
    """Serve once, save to ``path``; the file's tensors and metadata."""
    _served(engine, 0)
    engine.save_state(path)
    return load_file(str(path)), safe_open(str(path), "pt").metadata()


def test_a_damaged_state_is_refused(pair, tmp_path):
    engine = _engine(pair, **LEARNING)
    path = tmp_path / "state.safetensors"
    tensors, metadata = _saved_file(engine, path)
    name = next(n for n in tensors if n.startswith("adapter."))
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata=metadata)
    save_file(
        load_file(str(path)),
        str(tmp_path / "scale.safetensors"),
        metadata={**metadata, "adapter.scaling": "x"},
    )
    before = _learned(engine)
    with pytest.raises(ValueError, match="NaN or inf"):
        engine.load_state(tmp_path / "nan.safetensors")
    with pytest.raises(ValueError, match=r"adapter\.scaling"):
        engine.load_state(tmp_path / "scale.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(before, _learned(engine), strict=True))
    _served(engine, 1)  # still serves


def test_a_state_without_moments_restarts_them(pair, tmp_path):
    tensors, metadata = _saved_file(_engine(pair, **LEARNING), tmp_path / "state.safetensors")
    save_file({n: t for n, t in tensors.items() if not n.startswith("optimizer.")}, str(tmp_path / "old.safetensors"),
              metadata=metadata)  # fmt: skip
    other = _engine(pair, **LEARNING)
    for seed in (1, 2):
        _served(other, seed)
    other.load_state(tmp_path / "old.safetensors")
    assert other.learner.stats.distill_steps == 0 and other.learner.stats.head_steps == 0
    assert all(not t.any() for t in other.learner.optimizer.state_dict().values())


def test_the_saved_file_is_as_readable_as_any_other(pair, tmp_path):
    engine = _engine(pair)
    engine.save_state(tmp_path / "state.safetensors")
    (tmp_path / "plain").write_text("")
    mode = stat.S_IMODE(os.stat(tmp_path / "state.safetensors").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "plain").st_mode)


def test_a_failed_save_leaves_the_earlier_file_and_no_other(pair, tmp_path, monkeypatch):
    """save_state writes aside and renames: a write that fails leaves the file saved before as it was, and
    no partial file behind."""
    import omnidraft_fast.state

    engine = _engine(pair, **LEARNING)
    path = tmp_path / "state.safetensors"
    engine.save_state(path)
    before = path.read_bytes()
    _served(engine, 1)

    def failing(tensors, filename, metadata=None):
        with open(filename, "wb") as file:
            file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(omnidraft_fast.state, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        engine.save_state(path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    monkeypatch.undo()
    engine.save_state(path)  # the engine saves again once it can
    assert path.read_bytes() != before


@pytest.mark.parametrize("translation", ["tli", "damaged"])
def test_a_cross_vocabulary_state_that_does_not_fit_its_table_is_refused(translation, tmp_path):
    from omnidraft_fast.zoo import load

    zoo = load("code-pair")
    tokenizers = dict(target_tokenizer=zoo.target_tokenizer, drafter_tokenizer=zoo.drafter_tokenizer)
    config = EngineConfig(ngram_preseed=False)
    engine = SpeculativeEngine(zoo.target, zoo.drafter_cross, config=config, **tokenizers)
    batch = zoo.target_tokenizer(["def add(a, b):"], return_tensors="pt")
    engine.generate(**batch, max_new_tokens=16)
    path = tmp_path / "state.safetensors"
    if translation == "tli":  # a table-less state: nothing of it would be loaded into this engine's table
        SpeculativeEngine(zoo.target, zoo.drafter_cross, config=EngineConfig(translation="tli"), **tokenizers
                          ).save_state(path)  # fmt: skip
        match = "holds no n-gram table"
    else:  # target ids past the vocabulary (a damaged file): the rounds would index the bridge with them
        engine.save_state(path)
        tensors, metadata = load_file(str(path)), safe_open(str(path), "pt").metadata()
        used = tensors["ngram.key_ids"][:, 0] >= 0
        assert used.any()
        tensors["ngram.values"][used] = 10**6
        save_file(tensors, str(path), metadata=metadata)
        match = "outside the vocabularies"
    table = [t.clone() for t in engine.ngram.state_dict().values()]
    with pytest.raises(ValueError, match=match):
        engine.load_state(path)
    assert all(torch.equal(a, b) for a, b in zip(table, engine.ngram.state_dict().values(), strict=True))
    engine.generate(**batch, max_new_tokens=16)


def test_an_interrupted_load_leaves_the_engine_as_it_was(pair, tmp_path, monkeypatch):
    from omnidraft_fast import optim

    engine, before = _saved_then_learning(pair, tmp_path / "state.safetensors", **LEARNING)
    original = optim.AdamW.load_state_dict
    calls = []

    def interrupted(
        self, tensors
    ):  # the second optimiser (the head's): the adapter's moments already written
        calls.append(self)
        if len(calls) == 2:
            raise KeyboardInterrupt("Ctrl-C")
        return original(self, tensors)

    monkeypatch.setattr(optim.AdamW, "load_state_dict", interrupted)
    with pytest.raises(KeyboardInterrupt):
        engine.load_state(tmp_path / "state.safetensors")
    monkeypatch.undo()
    assert all(torch.equal(a, b) for a, b in zip(before, _learned(engine), strict=True))
