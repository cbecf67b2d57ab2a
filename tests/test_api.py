"""``omnidraft_fast.generate`` as a drop-in for ``model.generate``: names, outputs, EOS, streamers, engine reuse."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import left_padded_prompts, perturbed_copy, tiny_model, word_tokenizer
from transformers import GenerationConfig, TextIteratorStreamer, TextStreamer

import omnidraft_fast
from omnidraft_fast import EngineConfig, GenerateOutput, GenerationStats, SpeculativeEngine

VOCAB = 72
NEW = 10


@pytest.fixture(scope="module")
def target():
    return tiny_model("qwen2", VOCAB, seed=10)


@pytest.fixture(scope="module")
def drafter(target):
    return perturbed_copy(target, 0.3, seed=11)


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(VOCAB)


@pytest.fixture(scope="module")
def batch():
    return left_padded_prompts(VOCAB, [7, 4, 5], seed=12)


def reference(model, ids, mask=None, **kwargs):
    kwargs.setdefault("do_sample", False)
    return model.generate(ids, attention_mask=torch.ones_like(ids) if mask is None else mask, **kwargs)


def assert_equal(out, expected):
    assert isinstance(out, torch.Tensor), type(out)
    assert out.shape == expected.shape, f"{tuple(out.shape)} != {tuple(expected.shape)}\n{out}\n{expected}"
    assert torch.equal(out, expected), f"\n{out}\n!=\n{expected}"


class RecordingStreamer:
    """Has what ``transformers.TextStreamer`` offers generate(): put(ids) and end(); records every call."""

    def __init__(self):
        self.calls: list[tuple[str, list[int] | None]] = []

    def put(self, value):
        assert isinstance(value, torch.Tensor)
        assert value.device.type == "cpu"
        assert self.ended == 0, "put() after end()"
        self.calls.append(("put", value.reshape(-1).tolist()))

    def end(self):
        self.calls.append(("end", None))

    @property
    def ended(self) -> int:
        return sum(kind == "end" for kind, _ in self.calls)

    @property
    def tokens(self) -> list[list[int]]:
        return [value for kind, value in self.calls if kind == "put"]


# --------------------------------------------------------------------------------------------- drop-in calls
def test_batch_encoding_with_assistant_names(target, drafter, tokenizer):
    encoding = tokenizer(["w5 w9 w13 w40 w41", "w7 w8", "w70 w3 w3"], padding=True, return_tensors="pt")
    assert encoding["attention_mask"][1, 0] == 0  # left padded
    out = omnidraft_fast.generate(
        target, **encoding, assistant_model=drafter, num_assistant_tokens=3, max_new_tokens=NEW
    )
    expected = target.generate(**encoding, do_sample=False, max_new_tokens=NEW)
    assert_equal(out, expected)
    # A plain dict with what older tokenizers also return (all-zero token_type_ids) works the same.
    as_dict = {**encoding, "token_type_ids": torch.zeros_like(encoding["input_ids"])}
    out = omnidraft_fast.generate(
        target, **as_dict, assistant_model=drafter, num_assistant_tokens=3, max_new_tokens=NEW
    )
    assert_equal(out, expected)


def test_inputs_alias(target, drafter, batch):
    ids, mask = batch
    expected = reference(target, ids, mask, max_new_tokens=NEW)
    out = omnidraft_fast.generate(
        target, inputs=ids, attention_mask=mask, drafter=drafter, max_new_tokens=NEW
    )
    assert_equal(out, expected)
    assert_equal(
        target.generate(inputs=ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW), expected
    )
    with pytest.raises(TypeError, match="`inputs`"):
        omnidraft_fast.generate(
            target, ids, inputs=ids, attention_mask=mask, drafter=drafter, max_new_tokens=NEW
        )


def test_arguments_by_position_as_model_generate(target, drafter, batch):
    """model.generate()'s positional order (inputs, generation_config, logits_processor, stopping_criteria,
    prefix_allowed_tokens_fn) holds for generate() after the model, and for an engine's generate()."""
    from transformers.generation.logits_process import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    ids, mask = batch
    config = GenerationConfig(max_new_tokens=6, do_sample=False, pad_token_id=0)
    processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.5)])
    stops = [lambda input_ids, scores, **kwargs: input_ids[:, -1] == 7]

    def allowed(batch_id, sent):
        return list(range(1, 40))

    args = (config, processors, stops, allowed)
    expected = target.generate(ids, *args, attention_mask=mask)
    assert_equal(omnidraft_fast.generate(target, ids, *args, attention_mask=mask, drafter=drafter), expected)
    assert_equal(SpeculativeEngine(target, drafter).generate(ids, *args, attention_mask=mask), expected)


def test_drafter_and_assistant_model(target, drafter, batch):
    ids, mask = batch
    expected = reference(target, ids, mask, max_new_tokens=NEW)
    other = perturbed_copy(target, 0.5, seed=13)
    with pytest.raises(ValueError, match="`drafter` and `assistant_model`"):
        omnidraft_fast.generate(
            target, ids, attention_mask=mask, drafter=drafter, assistant_model=other, max_new_tokens=NEW
        )
    # the same model under both names is fine
    out = omnidraft_fast.generate(
        target, ids, attention_mask=mask, drafter=drafter, assistant_model=drafter, max_new_tokens=NEW
    )
    assert_equal(out, expected)


def test_return_dict_in_generate(target, drafter, batch):
    ids, mask = batch
    plain = omnidraft_fast.generate(target, ids, attention_mask=mask, drafter=drafter, max_new_tokens=NEW)
    out = omnidraft_fast.generate(
        target, ids, attention_mask=mask, drafter=drafter, max_new_tokens=NEW, return_dict_in_generate=True
    )
    assert isinstance(out, GenerateOutput)
    assert_equal(out.sequences, plain)
    hf = reference(target, ids, mask, max_new_tokens=NEW, return_dict_in_generate=True)
    assert_equal(out.sequences, hf.sequences)
    stats = out.stats
    assert isinstance(stats, GenerationStats)
    assert stats.requests == 1
    assert stats.rounds >= 1
    assert stats.proposed >= stats.accepted >= 0
    assert stats.new_tokens == ids.shape[0] * NEW == (plain.shape[1] - ids.shape[1]) * ids.shape[0]
    # also through the GenerationConfig
    out = omnidraft_fast.generate(
        target,
        ids,
        attention_mask=mask,
        drafter=drafter,
        generation_config=GenerationConfig(max_new_tokens=NEW, return_dict_in_generate=True),
    )
    assert isinstance(out, GenerateOutput)
    assert_equal(out.sequences, plain)


# --------------------------------------------------------------------------------------------- lengths
def test_generation_config_honoured(target, drafter, batch):
    ids, mask = batch
    config = GenerationConfig(max_new_tokens=7, do_sample=False)
    out = omnidraft_fast.generate(target, ids, attention_mask=mask, drafter=drafter, generation_config=config)
    assert out.shape == (ids.shape[0], ids.shape[1] + 7)
    assert_equal(out, target.generate(ids, attention_mask=mask, generation_config=config))


def test_a_request_builds_no_default_generation_config(target, drafter, batch, monkeypatch):
    """A request reads the model's and the drafter's generation_config (and the one passed) as
    ``to_diff_dict()`` gives them, without building a default GenerationConfig to compare with each time,
    as transformers' ``to_diff_dict`` does (half its cost); its own subclass's ``to_diff_dict`` is asked."""
    from omnidraft_fast.request import _diff_dict

    class Custom(GenerationConfig):
        def to_diff_dict(self):
            return {"max_new_tokens": 3}

    passed = GenerationConfig(
        max_new_tokens=NEW, repetition_penalty=1.2, sequence_bias={(1, 2): 1.0}, bad_words_ids=[[3]]
    )
    stamped = GenerationConfig(
        do_sample=True, eos_token_id=[1, 2]
    )  # what to_dict converts, and a saved version
    stamped.dtype, stamped.transformers_version = torch.float16, "4.0.0"
    stamped.extra = {"inner": {"dtype": torch.bfloat16}}
    configs = (target.generation_config, drafter.generation_config, passed, stamped, Custom(max_new_tokens=5))
    for config in configs:
        assert _diff_dict(config) == config.to_diff_dict()
        assert list(_diff_dict(config)) == list(config.to_diff_dict())  # the same order (the first refused)

    class Probe:  # equal to its default (None, transformers' default of every field): left out, not copied
        def __eq__(self, other):
            return other is None

        __hash__ = object.__hash__

        def __deepcopy__(self, memo):
            copied.append(self)
            return Probe()

    copied = []
    probed = GenerationConfig(max_new_tokens=NEW)
    probed.temperature = Probe()
    assert _diff_dict(probed) == probed.to_diff_dict() and len(copied) == 1  # to_diff_dict's own copy only
    ids, mask = batch
    engine = SpeculativeEngine(target, drafter)
    expected = engine.generate(ids, attention_mask=mask, generation_config=passed)
    init, built = GenerationConfig.__init__, []
    monkeypatch.setattr(
        GenerationConfig, "__init__", lambda self, **kwargs: built.append(1) or init(self, **kwargs)
    )
    assert torch.equal(engine.generate(ids, attention_mask=mask, generation_config=passed), expected)
    assert not built


def test_generation_config_overrides_model_sampling_defaults(target, drafter, batch):
    # Many checkpoints ship do_sample=True in their generation_config; an explicit do_sample=False wins.
    ids, mask = batch
    model = copy.deepcopy(target)
    model.generation_config.do_sample = True
    model.generation_config.top_k = 5
    config = GenerationConfig(max_new_tokens=7, do_sample=False)
    expected = model.generate(ids, attention_mask=mask, generation_config=config)
    assert_equal(expected, reference(target, ids, mask, max_new_tokens=7))
    out = omnidraft_fast.generate(model, ids, attention_mask=mask, drafter=drafter, generation_config=config)
    assert_equal(out, expected)


def test_explicit_none_overrides_as_in_transformers(target, drafter, batch):
    """transformers' ``generate(eos_token_id=None)`` (any field passed as None) overrides the generation
    configs with None: no EOS, the default length, no top-k filter."""
    ids, mask = batch
    model = copy.deepcopy(target)
    plain = reference(model, ids, mask, max_new_tokens=12)
    model.generation_config.eos_token_id = int(plain[0, ids.shape[1] + 2])  # ends row 0 early
    model.generation_config.max_new_tokens = 7
    for kwargs in ({"eos_token_id": None, "pad_token_id": 0, "max_new_tokens": 12}, {"max_new_tokens": None}):
        expected = reference(model, ids, mask, **kwargs)
        out = omnidraft_fast.generate(model, ids, attention_mask=mask, drafter=drafter, **kwargs)
        assert_equal(out, expected)
    sampled = {}
    for top_k in (None, 0, 50):
        torch.manual_seed(3)
        sampled[top_k] = omnidraft_fast.generate(model, ids, attention_mask=mask, drafter=drafter, do_sample=True,
                                                 top_k=top_k, temperature=2.0, max_new_tokens=12)  # fmt: skip
    assert torch.equal(sampled[None], sampled[0]) and not torch.equal(sampled[0], sampled[50])


def test_numpy_scalars_as_transformers_takes_them(target, drafter, batch):
    np = pytest.importorskip("numpy")
    ids, mask = batch
    eos = int(reference(target, ids, mask, max_new_tokens=6)[1, -3])
    expected = reference(target, ids, mask, max_new_tokens=6, eos_token_id=eos)
    out = omnidraft_fast.generate(target, ids, attention_mask=mask, drafter=drafter,
                                  max_new_tokens=np.int64(6), eos_token_id=np.int64(eos))  # fmt: skip
    assert_equal(out, expected)
    # the configs take them too, as Python numbers (kept-graph keys, results files' JSON)
    config = EngineConfig(num_draft_tokens=np.int64(3), confidence_threshold=np.float32(0.5),
                          distill=omnidraft_fast.DistillConfig(rank=np.int32(8), lr=np.float64(1e-3)),
                          adaptive=omnidraft_fast.AdaptiveConfig(k_min=np.int64(1)))  # fmt: skip
    assert type(config.num_draft_tokens) is int and type(config.confidence_threshold) is float
    assert type(config.distill.rank) is int and type(config.adaptive.k_min) is int
    assert omnidraft_fast.SamplingParams(np.float32(0.5), np.int64(3)).top_k == 3
    out = omnidraft_fast.generate(target, ids, attention_mask=mask, drafter=drafter, max_new_tokens=6,
                                  eos_token_id=eos, engine_config=EngineConfig(num_draft_tokens=np.int64(2)))  # fmt: skip
    assert_equal(out, expected)


def test_eos_ids_as_a_tensor_or_an_array(target, drafter, batch):
    """``eos_token_id`` as a tensor or a numpy array of ids, as transformers takes it."""
    np = pytest.importorskip("numpy")
    ids, mask = batch
    eos = [int(t) for t in reference(target, ids, mask, max_new_tokens=6)[:2, -3]]
    expected = reference(target, ids, mask, max_new_tokens=6, eos_token_id=eos)
    for given in (torch.tensor(eos), np.array(eos)):
        out = omnidraft_fast.generate(target, ids, attention_mask=mask, drafter=drafter, max_new_tokens=6,
                                      eos_token_id=given)  # fmt: skip
        assert_equal(out, expected)


def test_draft_settings_from_the_drafters_generation_config(target, drafter, batch):
    """As in transformers, ``num_assistant_tokens`` and ``assistant_confidence_threshold`` set on the
    assistant's generation_config apply, above the target's own and below the call and the
    generation_config argument; unset, the engine's config decides."""
    ids, mask = batch
    expected = reference(target, ids, mask, max_new_tokens=NEW)
    model, small = copy.deepcopy(target), copy.deepcopy(drafter)
    model.generation_config.num_assistant_tokens = 5
    config = EngineConfig(num_draft_tokens=3)

    def drafted(**kwargs) -> float:
        out = omnidraft_fast.generate(model, ids, attention_mask=mask, assistant_model=small, max_new_tokens=NEW,
                                      engine_config=config, return_dict_in_generate=True, **kwargs)  # fmt: skip
        assert_equal(out.sequences, expected)
        return out.stats.drafted_per_round

    assert drafted() == 5  # the target's generation_config over the engine's default
    small.generation_config.num_assistant_tokens = 2
    assert drafted() == 2  # the drafter's over the target's
    assert drafted(num_assistant_tokens=4) == 4
    assert drafted(generation_config=GenerationConfig(num_assistant_tokens=6)) == 6
    small.generation_config.assistant_confidence_threshold = 1.0
    assert drafted() == 1
    assert drafted(assistant_confidence_threshold=0.0) == 2  # 0: off for this call
    small.generation_config.num_assistant_tokens = 0
    with pytest.raises(ValueError, match=r"`num_assistant_tokens`.* must be an int >= 1, got 0"):
        drafted()


@pytest.mark.parametrize("how", ["kwarg", "generation_config", "model generation_config"])
def test_max_length_when_max_new_tokens_unset(target, drafter, batch, how):
    ids, mask = batch
    length = ids.shape[1] + 6
    model, kwargs = target, {}
    if how == "kwarg":
        kwargs = {"max_length": length}
    elif how == "generation_config":
        kwargs = {"generation_config": GenerationConfig(max_length=length)}
    else:
        model = copy.deepcopy(target)
        model.generation_config.max_length = length
    out = omnidraft_fast.generate(model, ids, attention_mask=mask, drafter=drafter, **kwargs)
    assert out.shape == (ids.shape[0], length)
    assert_equal(out, reference(model, ids, mask, **kwargs))


@pytest.mark.filterwarnings("ignore:Using the model-agnostic default `max_length`")
@pytest.mark.parametrize("prompt_length", [7, 24])
def test_default_length_is_20_new_tokens(target, drafter, prompt_length):
    # transformers 5: with neither max_new_tokens nor max_length set anywhere, generate() makes 20 *new*
    # tokens ("by default let's always generate 20 new tokens", GenerationMixin._prepare_generated_length).
    ids = torch.randint(3, VOCAB, (2, prompt_length), generator=torch.Generator().manual_seed(prompt_length))
    expected = reference(target, ids)
    assert expected.shape == (2, prompt_length + 20)
    with pytest.warns(UserWarning, match=r"no `max_new_tokens` \(nor `max_length`\) is set, so up to 20 new"):
        out = omnidraft_fast.generate(target, ids, drafter=drafter)
    assert_equal(out, expected)


def test_max_new_tokens_wins_over_max_length(target, drafter, batch):
    ids, mask = batch
    out = omnidraft_fast.generate(
        target, ids, attention_mask=mask, drafter=drafter, max_length=9, max_new_tokens=4
    )
    assert out.shape == (ids.shape[0], ids.shape[1] + 4)
    assert_equal(out, reference(target, ids, mask, max_new_tokens=4))


# Requests that model.generate() warns about (or logs), each with what this engine says (a regex).
_WARNED = [
    ({"temperature": 0.7, "top_k": 5}, r"`temperature`=0.7, `top_k`=5: options of sampling, ignored"),
    ({"do_sample": False, "min_p": 0.1}, r"`min_p`=0.1: options of sampling, ignored by this request"),
    (
        {"length_penalty": 2.0},
        r"`length_penalty`=2.0: options of beam search, which this engine does not run",
    ),
    ({"output_scores": True}, r"`output_scores`: returned only with return_dict_in_generate=True"),
    ({"max_length": 9}, r"both `max_new_tokens`=4 and `max_length`=9 are set: max_new_tokens decides"),
    ({"min_new_tokens": 2, "min_length": 9}, r"both `min_new_tokens`=2 and `min_length`=9 are set"),
    ({"min_new_tokens": 6}, r"`min_new_tokens`=6 is more than the 4 new tokens the request may generate"),
    (
        {"min_length": 12},
        r"`min_length`=12 is more than the longest a row may become \(7 prompt columns \+ 4",
    ),
]


@pytest.mark.parametrize(("options", "match"), _WARNED, ids=[", ".join(o) for o, _ in _WARNED])
def test_warns_where_model_generate_warns(target, drafter, batch, options, match):
    """What model.generate() warns about (an option the request ignores, a length it cannot meet) is said
    too, as a UserWarning at the caller's line, and the output is still transformers'."""
    ids, mask = batch
    kwargs = {"max_new_tokens": 4, **options}
    with pytest.warns(UserWarning, match=match) as caught:
        out = omnidraft_fast.generate(target, ids, attention_mask=mask, drafter=drafter, **kwargs)
    ours = [w for w in caught if "omnidraft_fast" not in w.filename and w.filename == __file__]
    assert ours, [(w.filename, str(w.message)) for w in caught]  # pointing at this call, not the package
    assert_equal(out, reference(target, ids, mask, **kwargs))


def test_warns_of_a_batch_without_mask_whose_padding_is_eos(target, drafter):
    """No attention_mask for a batch whose pad id is an EOS id (set so, or defaulted to it): transformers warns
    that padding cannot be inferred, and so does the engine; with a mask, a pad id of its own or one row, not."""
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    for kwargs in ({"pad_token_id": None}, {"pad_token_id": 3}):
        with pytest.warns(UserWarning, match=r"no `attention_mask` for a batch of 2 rows.* 3, an EOS id"):
            out = omnidraft_fast.generate(
                target, ids, drafter=drafter, max_new_tokens=4, eos_token_id=3, **kwargs
            )
        assert_equal(out, target.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=3, **kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for call in (
            dict(input_ids=ids, attention_mask=torch.ones_like(ids), pad_token_id=3),
            dict(input_ids=ids, pad_token_id=1),
            dict(input_ids=ids[:1], pad_token_id=3),
        ):
            omnidraft_fast.generate(target, drafter=drafter, max_new_tokens=4, eos_token_id=3, **call)


def test_group_beam_options_change_nothing_with_one_beam(target, drafter, batch):
    """Group beam search's options with one beam: transformers decodes greedily (or samples), and so does the
    engine, saying they are ignored; beams are refused by name. use_mtp=False is off, as there."""
    ids, mask = batch
    kwargs = {"max_new_tokens": 4, "num_beam_groups": 2, "diversity_penalty": 1.0}
    with pytest.warns(
        UserWarning, match=r"`num_beam_groups`=2, `diversity_penalty`=1.0: options of beam search"
    ):
        out = omnidraft_fast.generate(target, ids, attention_mask=mask, drafter=drafter, **kwargs)
    assert_equal(out, reference(target, ids, mask, **kwargs))
    out = omnidraft_fast.generate(
        target, ids, attention_mask=mask, drafter=drafter, max_new_tokens=4, use_mtp=False
    )
    assert_equal(out, reference(target, ids, mask, max_new_tokens=4))
    with pytest.raises(ValueError, match=r"`num_beams=2` is not supported"):
        omnidraft_fast.generate(target, ids, attention_mask=mask, drafter=drafter, num_beams=2, **kwargs)


def test_no_warning_where_nothing_is_ignored(target, drafter, batch):
    """A request whose every option acts warns nothing; nor does a greedy request asked for by the call
    (do_sample=False) about a sampling option of the model's generation_config, nor a refused request."""
    ids, mask = batch
    model = copy.deepcopy(target)
    model.generation_config.temperature = 0.6
    model.generation_config.top_p = 0.9
    model.generation_config.min_p = 0.05
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        omnidraft_fast.generate(target, ids, attention_mask=mask, drafter=drafter, max_new_tokens=4)
        omnidraft_fast.generate(target, ids, attention_mask=mask, drafter=drafter, max_new_tokens=4,
                                do_sample=True, temperature=0.7, min_new_tokens=4, return_dict_in_generate=True,
                                output_scores=True)  # fmt: skip
        omnidraft_fast.generate(
            model, ids, attention_mask=mask, drafter=drafter, max_new_tokens=4, do_sample=False
        )
        # unset by the call: no top-k (transformers does not name it either), no max_new_tokens nor min_new_tokens
        omnidraft_fast.generate(
            target, ids, attention_mask=mask, drafter=drafter, max_new_tokens=4, top_k=None
        )
        omnidraft_fast.generate(target, ids, attention_mask=mask, drafter=drafter, max_new_tokens=None,
                                max_length=ids.shape[1] + 4, min_new_tokens=None, min_length=2)  # fmt: skip
        with pytest.raises(ValueError, match="`num_return_sequences`=2 needs sampling"):
            omnidraft_fast.generate(target, ids, attention_mask=mask, drafter=drafter, max_new_tokens=4,
                                    temperature=0.5, num_return_sequences=2)  # fmt: skip
    # the model's sampling options, with the mode left to the configs: named, as transformers names them
    with pytest.warns(
        UserWarning, match=r"`temperature`=0.6, `top_p`=0.9, `min_p`=0.05: options of sampling"
    ):
        omnidraft_fast.generate(model, ids, attention_mask=mask, drafter=drafter, max_new_tokens=4)
    # lengths from the model's generation_config beside the call's: named, as transformers names them
    model.generation_config.max_length, model.generation_config.min_length = 40, 3
    with pytest.warns(UserWarning) as caught:
        omnidraft_fast.generate(model, ids, attention_mask=mask, drafter=drafter, max_new_tokens=4,
                                min_new_tokens=2, do_sample=False)  # fmt: skip
    assert [str(w.message).split(" are set")[0] for w in caught] == [
        "both `max_new_tokens`=4 and `max_length`=40",
        "both `min_new_tokens`=2 and `min_length`=3",
    ]


# --------------------------------------------------------------------------------------------- EOS
@pytest.fixture(scope="module")
def eos_case(target, batch):
    """An eos id that row 0's greedy continuation emits early (and the other rows do not emit first)."""
    ids, mask = batch
    plain = reference(target, ids, mask, max_new_tokens=12)
    continuation = plain[:, ids.shape[1] :]
    row0 = continuation[0].tolist()
    for eos in row0[1:5]:
        first = [row.index(eos) if eos in row else 99 for row in continuation.tolist()]
        if first[0] < min(first[1:]) and first[0] < 6:
            return eos
    pytest.fail(f"no early eos candidate in row 0's continuation {row0}")


@pytest.mark.parametrize(
    "how",
    ["kwarg", "kwarg, pad defaults to eos", "eos list", "generation_config", "model generation_config"],
)
def test_eos_in_a_batch(target, drafter, batch, eos_case, how):
    ids, mask = batch
    eos = eos_case
    pad = 0 if eos != 0 else 1
    model, kwargs = target, {"max_new_tokens": 12}
    if how == "kwarg":
        kwargs.update(eos_token_id=eos, pad_token_id=pad)
    elif how == "kwarg, pad defaults to eos":
        kwargs.update(eos_token_id=eos)
    elif how == "eos list":
        kwargs.update(eos_token_id=[VOCAB - 1, eos], pad_token_id=pad)
    elif how == "generation_config":
        kwargs = {
            "generation_config": GenerationConfig(max_new_tokens=12, eos_token_id=eos, pad_token_id=pad)
        }
    else:
        model = copy.deepcopy(target)
        model.generation_config.eos_token_id = eos
        model.generation_config.pad_token_id = pad
    expected = reference(model, ids, mask, **kwargs)
    out = omnidraft_fast.generate(model, ids, attention_mask=mask, drafter=drafter, **kwargs)
    assert_equal(out, expected)
    # the case is meaningful: row 0 stopped at its EOS and was padded after it
    row0 = expected[0, ids.shape[1] :].tolist()
    stop = row0.index(eos)
    assert stop < len(row0) - 1
    fill = pad if how != "kwarg, pad defaults to eos" else eos
    assert row0[stop + 1 :] == [fill] * (len(row0) - stop - 1)
    if how == "kwarg":
        stats = omnidraft_fast.generate(
            model, ids, attention_mask=mask, drafter=drafter, return_dict_in_generate=True, **kwargs
        ).stats
        per_row = [
            row.index(eos) + 1 if eos in row else len(row) for row in expected[:, ids.shape[1] :].tolist()
        ]
        assert stats.new_tokens == sum(per_row)
        assert stats.proposed >= stats.accepted >= 0


# --------------------------------------------------------------------------------------------- engine reuse
def test_engine_reused_and_stats_accumulate(batch):
    ids, mask = batch
    model = tiny_model("llama", VOCAB, seed=14)
    drafter = perturbed_copy(model, 0.3, seed=15)
    expected = reference(model, ids, mask, max_new_tokens=NEW)
    first = omnidraft_fast.generate(model, ids, attention_mask=mask, drafter=drafter, max_new_tokens=NEW)
    second = omnidraft_fast.generate(
        model, ids, attention_mask=mask, assistant_model=drafter, max_new_tokens=NEW
    )
    assert_equal(first, expected)
    assert_equal(second, expected)
    assert len(model._omnidraft_engines) == 1
    engine = model._omnidraft_engines[0]
    assert isinstance(engine, SpeculativeEngine)
    assert engine.stats.requests == 2
    assert engine.last_stats.requests == 1
    assert engine.stats.new_tokens == 2 * ids.shape[0] * NEW
    assert engine.stats.rounds == 2 * engine.last_stats.rounds  # same request twice, greedy: same rounds
    # another drafter (or another engine config) gets its own engine
    omnidraft_fast.generate(
        model, ids, attention_mask=mask, drafter=perturbed_copy(model, 0.5), max_new_tokens=3
    )
    omnidraft_fast.generate(
        model,
        ids,
        attention_mask=mask,
        drafter=drafter,
        max_new_tokens=3,
        engine_config=EngineConfig(num_draft_tokens=2),
    )
    assert len(model._omnidraft_engines) == 3
    assert engine.stats.requests == 2
    # a fresh drafter object per call does not pile engines up: the least recently used go
    for seed in range(4):
        omnidraft_fast.generate(model, ids, attention_mask=mask, drafter=perturbed_copy(model, 0.5, seed),
                                max_new_tokens=2)  # fmt: skip
    assert len(model._omnidraft_engines) == 4
    assert engine not in model._omnidraft_engines


# --------------------------------------------------------------------------------------------- streamers
@pytest.fixture(scope="module")
def prompt():
    return torch.tensor([[5, 17, 33, 8, 60, 21]])


@pytest.mark.parametrize("with_eos", [False, True])
def test_recording_streamer(target, drafter, prompt, with_eos):
    kwargs = {"max_new_tokens": 12}
    plain = reference(target, prompt, max_new_tokens=12)
    if with_eos:
        kwargs["eos_token_id"] = int(plain[0, prompt.shape[1] + 3])
    streamer = RecordingStreamer()
    out = omnidraft_fast.generate(target, prompt, drafter=drafter, streamer=streamer, **kwargs)
    expected = reference(target, prompt, **kwargs)
    assert_equal(out, expected)
    assert streamer.calls[0] == ("put", prompt[0].tolist())  # the prompt first, as transformers does
    assert streamer.calls[-1] == ("end", None)
    assert streamer.ended == 1
    streamed = [token for tokens in streamer.tokens[1:] for token in tokens]
    assert streamed == out[0, prompt.shape[1] :].tolist()  # then exactly the new tokens, in order
    if with_eos:
        assert len(streamed) < 12 and streamed[-1] == kwargs["eos_token_id"]
    # and the same token stream as transformers' own generate() gives the streamer
    hf_streamer = RecordingStreamer()
    reference(target, prompt, streamer=hf_streamer, **kwargs)
    assert hf_streamer.tokens[0] == streamer.tokens[0]
    assert [t for tokens in hf_streamer.tokens[1:] for t in tokens] == streamed
    assert hf_streamer.ended == 1


@pytest.mark.parametrize("skip_prompt", [False, True])
def test_text_iterator_streamer(target, drafter, tokenizer, prompt, skip_prompt):
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=skip_prompt, timeout=10)
    out = omnidraft_fast.generate(target, prompt, drafter=drafter, streamer=streamer, max_new_tokens=NEW)
    text = "".join(streamer)  # generate() already returned, so the queue holds everything and the stop signal
    hf_streamer = TextIteratorStreamer(tokenizer, skip_prompt=skip_prompt, timeout=10)
    expected = reference(target, prompt, streamer=hf_streamer, max_new_tokens=NEW)
    assert_equal(out, expected)
    assert text == "".join(hf_streamer)
    shown = out[0, prompt.shape[1] :] if skip_prompt else out[0]
    assert text.split() == tokenizer.decode(shown).split()
    assert text.split() == [f"w{i}" if i >= 3 else tokenizer.convert_ids_to_tokens(i) for i in shown.tolist()]


def test_text_streamer(target, drafter, tokenizer, prompt, capsys):
    out = omnidraft_fast.generate(
        target, prompt, drafter=drafter, streamer=TextStreamer(tokenizer), max_new_tokens=NEW
    )
    ours = capsys.readouterr().out
    reference(target, prompt, streamer=TextStreamer(tokenizer), max_new_tokens=NEW)
    theirs = capsys.readouterr().out
    assert ours == theirs
    assert ours.split() == tokenizer.decode(out[0]).split()


# --------------------------------------------------------------------------------------------- engine
def test_engine_with_config(target, drafter, batch):
    ids, mask = batch
    expected = reference(target, ids, mask, max_new_tokens=NEW)
    engine = SpeculativeEngine(target, drafter, config=EngineConfig(num_draft_tokens=2))
    assert_equal(engine.generate(ids, attention_mask=mask, max_new_tokens=NEW), expected)
    stats = engine.last_stats
    assert stats.row_rounds >= 1
    assert stats.proposed == 2 * stats.row_rounds  # k = 2 drafted tokens per active row per round
    # a request's own draft length overrides the engine's
    assert_equal(engine.generate(ids, attention_mask=mask, max_new_tokens=NEW, num_draft_tokens=3), expected)
    assert engine.last_stats.proposed == 3 * engine.last_stats.row_rounds
    assert engine.stats.requests == 2
    # a draft longer than the request can use is cut to max_new_tokens, as transformers cuts it
    short = reference(target, ids, mask, max_new_tokens=4)
    assert_equal(engine.generate(ids, attention_mask=mask, max_new_tokens=4, num_draft_tokens=10_000), short)
    assert engine.last_stats.proposed == 4 * engine.last_stats.row_rounds
    assert_equal(
        engine.generate(ids, attention_mask=mask, max_new_tokens=1, num_draft_tokens=5), short[:, :-3]
    )
    assert engine.last_stats.proposed == engine.last_stats.row_rounds


def test_engine_stage_timings(target, drafter, batch):
    ids, mask = batch
    expected = reference(target, ids, mask, max_new_tokens=NEW)
    engine = SpeculativeEngine(target, drafter, config=EngineConfig(time_stages=True))
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=NEW, return_dict_in_generate=True)
    assert_equal(out.sequences, expected)
    stages = out.stats.stage_seconds
    assert {"draft", "target", "verify"} <= set(stages), stages
    assert all(seconds >= 0 for seconds in stages.values())
    assert sum(stages.values()) <= out.stats.seconds + 1e-3
    assert engine.stats.stage_seconds.keys() == stages.keys()
    untimed = SpeculativeEngine(target, drafter, config=EngineConfig(time_stages=False))
    out = untimed.generate(ids, attention_mask=mask, max_new_tokens=NEW, return_dict_in_generate=True)
    assert_equal(out.sequences, expected)
    assert out.stats.stage_seconds == {}


# --------------------------------------------------------------------------------------------- scores
@pytest.mark.parametrize("config", [{}, {"cuda_graphs": True}, {"rounds_per_sync": 3}])
def test_scores_and_logits_as_transformers(target, drafter, batch, eos_case, config):
    """``output_scores``/``output_logits``: one [batch, V] tensor per new token, the target's logits there
    (processed by the sampling warpers for ``scores``), equal to transformers' own up to float error;
    NaN past a row's end (row 0 stops at its EOS); nothing extra without the dict."""
    ids, mask = batch
    kwargs = dict(max_new_tokens=12, eos_token_id=eos_case, pad_token_id=0 if eos_case else 1)
    wanted = dict(return_dict_in_generate=True, output_scores=True, output_logits=True)
    hf = reference(target, ids, mask, **kwargs, **wanted)
    engine = SpeculativeEngine(target, drafter, config=EngineConfig(num_draft_tokens=3, **config))
    for _ in range(2):  # with cuda_graphs, the second request replays
        out = engine.generate(ids, attention_mask=mask, **kwargs, **wanted)
    assert_equal(out.sequences, hf.sequences)
    new = hf.sequences.shape[1] - ids.shape[1]
    assert len(out.scores) == len(out.logits) == len(hf.scores) == new
    is_eos = hf.sequences[:, ids.shape[1] :] == eos_case
    length = torch.where(is_eos.any(1), is_eos.long().argmax(1) + 1, new)  # row 0 ends at its EOS
    assert length[0] < new and (length[1:] == new).all()
    for step in range(new):
        live = step < length
        for ours, theirs in ((out.scores, hf.scores), (out.logits, hf.logits)):
            assert ours[step].shape == theirs[step].shape and ours[step].dtype == torch.float32
            torch.testing.assert_close(ours[step][live], theirs[step][live], atol=1e-4, rtol=1e-4)
            assert torch.isnan(ours[step][~live]).all()
    assert engine.generate(ids, attention_mask=mask, **kwargs, output_scores=True).shape == hf.sequences.shape
    plain = engine.generate(ids, attention_mask=mask, **kwargs, return_dict_in_generate=True)
    # a transformers ModelOutput, as model.generate() returns: unset fields are None and not among its keys
    assert plain.scores is None and plain.logits is None and "scores" not in plain
    assert plain[0] is plain.sequences and plain.attentions is None and plain.hidden_states is None


def test_kept_logits_grow_with_the_output(target, drafter, batch, eos_case, monkeypatch):
    """The logits kept for ``output_scores`` take memory for the tokens made, not ``max_new_tokens``: a
    request that ends early (EOS) never holds more than twice its output, and its scores are still
    transformers' own."""
    from omnidraft_fast.kept_logits import KeptLogits

    capacities = []
    grow = KeptLogits._grow
    monkeypatch.setattr(
        KeptLogits, "_grow", lambda self, capacity: (capacities.append(capacity), grow(self, capacity))
    )
    ids, mask = batch
    row = slice(0, 1)  # row 0 ends at its EOS within 5 tokens
    kwargs = dict(max_new_tokens=200, eos_token_id=eos_case, pad_token_id=0)
    hf = reference(target, ids[row], mask[row], **kwargs, return_dict_in_generate=True, output_scores=True)
    out = omnidraft_fast.generate(target, ids[row], attention_mask=mask[row], drafter=drafter, **kwargs,
                                  num_assistant_tokens=3, return_dict_in_generate=True, output_scores=True)  # fmt: skip
    assert_equal(out.sequences, hf.sequences)
    new = len(hf.scores)
    assert new <= 5 and capacities and max(capacities) <= 2 * new, (new, capacities)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(hf.scores), atol=1e-4, rtol=1e-4)


def test_sampled_scores_are_the_warped_logits(target, drafter, batch):
    """Sampling: ``logits`` are the target's logits at each token of the sampled output (its teacher-forced
    forward), ``scores`` those logits through transformers' temperature, top-k and top-p warpers."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    ids, mask = batch
    torch.manual_seed(0)
    out = omnidraft_fast.generate(
        target, ids, attention_mask=mask, drafter=drafter, max_new_tokens=8, do_sample=True, temperature=0.7,
        top_k=9, top_p=0.8, return_dict_in_generate=True, output_scores=True, output_logits=True,
    )  # fmt: skip
    full_mask = torch.cat([mask, torch.ones_like(out.sequences[:, ids.shape[1] :])], 1)
    with torch.no_grad():
        forward = target(out.sequences, attention_mask=full_mask).logits[:, ids.shape[1] - 1 : -1].float()
    for step, (score, logit) in enumerate(zip(out.scores, out.logits, strict=True)):
        torch.testing.assert_close(logit, forward[:, step], atol=1e-4, rtol=1e-4)
        expected = TopPLogitsWarper(0.8)(
            None, TopKLogitsWarper(9)(None, TemperatureLogitsWarper(0.7)(None, logit))
        )
        assert torch.equal(score, expected)
        assert (score > -torch.inf).sum(-1).le(9).all()


def test_num_return_sequences(target, drafter, batch):
    """Each prompt is sampled ``num_return_sequences`` times, its copies adjacent as in transformers (a copy
    is a request row of its own: the same output as that prompt repeated by hand under the same seed);
    per-row cascade alphas follow their prompt's copies."""
    ids, mask = batch
    kwargs = dict(max_new_tokens=8, do_sample=True, temperature=0.9, pad_token_id=0)
    engine = SpeculativeEngine(target, drafter)
    torch.manual_seed(5)
    out = engine.generate(ids, attention_mask=mask, num_return_sequences=3, **kwargs)
    assert out.shape[0] == 9
    torch.manual_seed(5)
    by_hand = engine.generate(
        ids.repeat_interleave(3, 0), attention_mask=mask.repeat_interleave(3, 0), **kwargs
    )
    assert torch.equal(out, by_hand)
    assert torch.equal(out[:, : ids.shape[1]], ids.repeat_interleave(3, 0))
    assert len({tuple(row) for row in out[:3, ids.shape[1] :].tolist()}) > 1  # the copies are sampled apart
    cascade = omnidraft_fast.CascadeConfig("chow", (0.0, 1.0, 0.0))  # the second prompt trusts the drafter
    torch.manual_seed(6)
    out = engine.generate(ids, attention_mask=mask, num_return_sequences=2, cascade=cascade, **kwargs)
    torch.manual_seed(6)
    by_hand = engine.generate(ids.repeat_interleave(2, 0), attention_mask=mask.repeat_interleave(2, 0),
                              cascade=omnidraft_fast.CascadeConfig("chow", (0.0, 0.0, 1.0, 1.0, 0.0, 0.0)),
                              **kwargs)  # fmt: skip
    assert torch.equal(out, by_hand)
    with pytest.raises(
        ValueError,
        match=r"`cascade.alpha` has 3 values for a batch of 2 prompts.*copies of a prompt share its alpha",
    ):
        engine.generate(ids[:2], attention_mask=mask[:2], num_return_sequences=3, cascade=cascade, **kwargs)


def test_max_time_stops_every_row_at_once(target, drafter, batch):
    """``max_time``: no round starts once it has passed; as transformers stops every row at the same step,
    rows still going end at the shortest of them, a prefix of the full output."""
    ids, mask = batch
    full = reference(target, ids, mask, max_new_tokens=NEW)
    out = omnidraft_fast.generate(target, ids, attention_mask=mask, drafter=drafter, max_new_tokens=NEW,
                                  max_time=1e-9, return_dict_in_generate=True, output_logits=True)  # fmt: skip
    new = out.sequences.shape[1] - ids.shape[1]
    assert 1 <= new < NEW and out.stats.rounds == 1
    assert_equal(out.sequences, full[:, : ids.shape[1] + new])
    assert len(out.logits) == new and not torch.isnan(torch.stack(out.logits)).any()
    assert_equal(omnidraft_fast.generate(target, ids, attention_mask=mask, drafter=drafter, max_new_tokens=NEW,
                                         max_time=60.0), full)  # fmt: skip
    with pytest.raises(ValueError, match=r"`max_time` must be a number of seconds > 0, got 0"):
        omnidraft_fast.generate(target, ids, attention_mask=mask, drafter=drafter, max_time=0)


def test_output_is_a_transformers_generate_output(target, drafter, batch):
    """return_dict_in_generate gives what model.generate() gives: a GenerateDecoderOnlyOutput (plus stats)."""
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    ids, mask = batch
    out = omnidraft_fast.generate(
        target, ids, attention_mask=mask, drafter=drafter, max_new_tokens=6, return_dict_in_generate=True
    )
    assert isinstance(out, GenerateDecoderOnlyOutput)
    assert out[0] is out["sequences"] is out.sequences and out.to_tuple()[0] is out.sequences
    assert "sequences" in out and "scores" not in out and out.stats.requests == 1


def test_greedy_leaves_the_global_rng_alone(target, drafter, batch):
    """As transformers' greedy generate(): a seeded script's later random draws do not move."""
    ids, mask = batch
    torch.manual_seed(0)
    omnidraft_fast.generate(target, ids, attention_mask=mask, drafter=drafter, max_new_tokens=4)
    drawn = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(drawn, torch.rand(4))


def test_models_moved_after_the_engine_was_built(batch):
    """``model.to(...)`` after an engine was built: its bridge, table, learners and graphs stayed, so it says
    to build a new one; ``generate()`` drops the engine it kept for the model and builds one where the
    models are now. (This machine has one device; the meta device stands in for another.)"""
    from omnidraft_fast.api import _engine_for

    target = tiny_model("llama", VOCAB, seed=0)
    drafter = perturbed_copy(target, 0.3, seed=1)
    ids, mask = batch
    omnidraft_fast.generate(target, ids, attention_mask=mask, drafter=drafter, max_new_tokens=4)
    kept = _engine_for(target, drafter, None, None, None)
    assert kept.moved_models() == []
    target.to("meta"), drafter.to("meta")
    with pytest.raises(ValueError, match=r"the model moved from cpu to meta .*build a new SpeculativeEngine"):
        kept.generate(ids, attention_mask=mask, max_new_tokens=4)
    rebuilt = _engine_for(target, drafter, None, None, None)
    assert rebuilt is not kept and rebuilt.built_on == torch.device("meta") and not rebuilt.moved_models()


def test_vocabulary_resized_after_first_call(batch):
    """resize_token_embeddings() after a call: the engine kept on the model is rebuilt, as generate() works on."""
    target = tiny_model("llama", VOCAB, seed=0)
    drafter = perturbed_copy(target, 0.3, seed=1)
    ids, mask = batch
    omnidraft_fast.generate(target, ids, attention_mask=mask, drafter=drafter, max_new_tokens=4)
    target.resize_token_embeddings(VOCAB + 4)
    drafter.resize_token_embeddings(VOCAB + 4)
    ids = torch.cat([ids, torch.full_like(ids[:, :1], VOCAB + 3)], 1)
    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    expected = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=8)
    out = omnidraft_fast.generate(target, ids, attention_mask=mask, drafter=drafter, max_new_tokens=8)
    assert torch.equal(out, expected)
    engine = SpeculativeEngine(target, drafter)
    target.resize_token_embeddings(VOCAB + 8)
    with pytest.raises(ValueError, match=r"vocabulary changed from .*resize_token_embeddings"):
        engine.generate(ids, attention_mask=mask, max_new_tokens=4)
