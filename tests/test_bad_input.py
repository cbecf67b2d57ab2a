"""Bad input fails loudly, with a message that names the culprit, and leaves nothing broken behind.

Every case checks two things: the call raises ``ValueError``/``TypeError`` (``pytest.raises(match=...)``
on a word of the message that names the offending argument), and afterwards the *same* entry point
(the same ``SpeculativeEngine``, or ``omnidraft_fast.generate`` on the same target) still returns
exactly the target's own greedy ``model.generate`` output for a good request (:func:`assert_still_works`).
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from conftest import left_padded_prompts, perturbed_copy, tiny_model
from transformers import GenerationConfig, T5Config, T5ForConditionalGeneration

import omnidraft_fast
from omnidraft_fast import EngineConfig, SpeculativeEngine, ops

VOCAB = 80
NEW = 10  # max_new_tokens of the good request


# --------------------------------------------------------------------------------------------- fixtures
class Models:
    """The shared target/drafter pair, the good request and its reference output."""

    def __init__(self):
        self.target = tiny_model("llama", VOCAB, seed=0)
        self.drafter = perturbed_copy(self.target, 0.3, seed=1)
        self.ids, self.mask = left_padded_prompts(VOCAB, [6, 4], seed=3)
        self.reference = self.target.generate(
            self.ids, attention_mask=self.mask, do_sample=False, max_new_tokens=NEW
        )
        self.engine = SpeculativeEngine(self.target, self.drafter)


@pytest.fixture(scope="module")
def models() -> Models:
    return Models()


@pytest.fixture(params=["api", "engine"])
def run(request, models):
    """``run(input_ids, **kwargs)`` through ``omnidraft_fast.generate`` or through one long-lived engine."""
    if request.param == "api":

        def call(input_ids=None, **kwargs):
            return omnidraft_fast.generate(models.target, input_ids, drafter=models.drafter, **kwargs)

    else:

        def call(input_ids=None, **kwargs):
            return models.engine.generate(input_ids, **kwargs)

    call.kind = request.param
    return call


def assert_still_works(call, models: Models) -> None:
    """The good request through ``call`` gives exactly the target's greedy ``model.generate`` output."""
    out = call(models.ids, attention_mask=models.mask, max_new_tokens=NEW)
    assert isinstance(out, torch.Tensor)
    assert torch.equal(out, models.reference), f"\n{out}\n!=\n{models.reference}"


def api_call(models: Models, drafter=None):
    drafter = models.drafter if drafter is None else drafter

    def call(input_ids=None, **kwargs):
        return omnidraft_fast.generate(models.target, input_ids, drafter=drafter, **kwargs)

    return call


class RecordingStreamer:
    """Duck-typed ``transformers`` streamer: records every call."""

    def __init__(self):
        self.calls: list[tuple[str, torch.Tensor | None]] = []

    def put(self, value):
        self.calls.append(("put", value.clone()))

    def end(self):
        self.calls.append(("end", None))


def t5(seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = T5Config(vocab_size=VOCAB, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16)
    return T5ForConditionalGeneration(config).eval()


# --------------------------------------------------------------------------------------------- models
def test_no_drafter(models):
    with pytest.raises(ValueError, match="drafter"):
        omnidraft_fast.generate(models.target, models.ids, attention_mask=models.mask, max_new_tokens=NEW)
    with pytest.raises(ValueError, match="assistant_model"):
        omnidraft_fast.generate(
            models.target, models.ids, drafter=None, assistant_model=None, max_new_tokens=NEW
        )
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens"):  # the other way to draft
        omnidraft_fast.generate(models.target, models.ids, max_new_tokens=NEW)
    assert_still_works(api_call(models), models)
    assert_still_works(SpeculativeEngine(models.target, models.drafter).generate, models)


def test_drafter_on_another_device(models):
    # A drafter on the meta device: the only device a CPU-only machine can put next to "cpu". Without
    # the device check in SpeculativeEngine.__init__ this would fail later with some meta-tensor error
    # (or not at all), so matching the message proves the check ran.
    meta_drafter = copy.deepcopy(models.drafter).to(torch.device("meta"))
    assert next(meta_drafter.parameters()).device.type == "meta"
    with pytest.raises(ValueError, match=r"drafter on meta"):
        SpeculativeEngine(models.target, meta_drafter)
    with pytest.raises(ValueError, match=r"one device"):
        omnidraft_fast.generate(models.target, models.ids, attention_mask=models.mask, drafter=meta_drafter)
    # ... and the other way round: the target elsewhere.
    meta_target = copy.deepcopy(models.target).to(torch.device("meta"))
    with pytest.raises(ValueError, match=r"target is on meta"):
        SpeculativeEngine(meta_target, models.drafter)
    assert_still_works(api_call(models), models)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_drafter_dtype_may_differ(models, dtype):
    other = copy.deepcopy(models.drafter).to(dtype)
    assert next(other.parameters()).dtype == dtype
    engine = SpeculativeEngine(models.target, other)
    assert_still_works(engine.generate, models)
    assert_still_works(api_call(models, other), models)
    assert engine.last_stats.accepted > 0  # the drafter's proposals were actually used


def test_vocabulary_sizes_differ_without_tokenizers(models):
    """The message names the arguments of the entry point at hand: `SpeculativeEngine` takes the target's
    tokenizer as `target_tokenizer` (it has no `tokenizer`), generate() as `tokenizer`."""
    other = tiny_model("llama", VOCAB + 16, seed=2)
    both = "cross-vocabulary drafting needs both tokenizers"
    with pytest.raises(ValueError, match=both) as raised:
        omnidraft_fast.generate(models.target, models.ids, attention_mask=models.mask, drafter=other)
    assert "`tokenizer=`" in str(raised.value) and "`assistant_tokenizer=`" in str(raised.value)
    with pytest.raises(ValueError, match=both) as raised:
        SpeculativeEngine(models.target, other, target_tokenizer=_Tokenizer())  # one is not enough
    assert "`target_tokenizer=`" in str(raised.value) and "`drafter_tokenizer=`" in str(raised.value)
    with pytest.raises(ValueError, match=both):
        SpeculativeEngine(other, models.drafter, drafter_tokenizer=_Tokenizer())
    assert_still_works(api_call(models), models)


class _Tokenizer:
    def get_vocab(self) -> dict[str, int]:
        return {}


@pytest.mark.parametrize("name", ["tokenizer", "drafter_tokenizer", "assistant_tokenizer"])
def test_a_tokenizer_given_by_name_is_refused_by_name(models, name):
    """A hub name or path where a tokenizer object goes: refused naming the argument and the fix, not an
    AttributeError from inside the bridge (nor a misleading one about fast tokenizers)."""
    fix = r"must be a tokenizer object \(e.g. AutoTokenizer.from_pretrained\(path\)\), got str 'gpt2'"
    with pytest.raises(TypeError, match=rf"`{name}` {fix}"):
        api_call(models)(models.ids, attention_mask=models.mask, max_new_tokens=NEW, **{name: "gpt2"})
    with pytest.raises(TypeError, match=rf"`target_tokenizer` {fix}"):
        SpeculativeEngine(models.target, models.drafter, target_tokenizer="gpt2")
    with pytest.raises(TypeError, match=rf"`tokenizer` {fix}"):
        models.engine.generate(models.ids, attention_mask=models.mask, tokenizer="gpt2", stop_strings=["x"])
    assert_still_works(api_call(models), models)
    assert_still_works(models.engine.generate, models)


@pytest.mark.parametrize("role", ["target", "drafter"])
def test_encoder_decoder_model(models, role):
    seq2seq = t5()
    target, drafter = (seq2seq, models.drafter) if role == "target" else (models.target, seq2seq)
    name = "model" if role == "target" else "drafter"
    with pytest.raises(ValueError, match=rf"`{name}` is an encoder-decoder"):
        omnidraft_fast.generate(
            target, models.ids, attention_mask=models.mask, drafter=drafter, max_new_tokens=NEW
        )
    with pytest.raises(ValueError, match="encoder-decoder"):
        SpeculativeEngine(target, drafter)
    assert_still_works(api_call(models), models)


# --------------------------------------------------------------------------------------------- input ids
def _bad_ids(kind: str) -> torch.Tensor:
    good = torch.tensor([[5, 6, 7, 8]])
    return {
        "float": good.float(),
        "bool": good > 6,
        "1-D": good[0],
        "3-D": good[None],
        "negative": torch.tensor([[5, -1, 7, 8]]),
        "too large": torch.tensor([[5, VOCAB, 7, 8]]),
        "list": good.tolist(),
    }[kind]


@pytest.mark.parametrize(
    ("kind", "error", "match"),
    [
        ("float", TypeError, r"`input_ids` must hold integer token ids.*float32"),
        ("bool", TypeError, r"`input_ids` must hold integer token ids.*bool"),
        ("1-D", ValueError, r"`input_ids` must be 2-D.*unsqueeze"),
        ("3-D", ValueError, r"`input_ids` must be 2-D"),
        ("negative", ValueError, r"`input_ids` holds ids in \[-1, 8\]"),
        ("too large", ValueError, rf"`input_ids` holds ids in \[5, {VOCAB}\].*\[0, {VOCAB}\)"),
        ("list", TypeError, r"`input_ids` must be a torch.LongTensor"),
    ],
)
def test_bad_input_ids(models, run, kind, error, match):
    with pytest.raises(error, match=match):
        run(_bad_ids(kind), max_new_tokens=NEW)
    assert_still_works(run, models)


def test_missing_input_ids(models, run):
    with pytest.raises(ValueError, match="`input_ids` is required"):
        run(None, max_new_tokens=NEW)
    assert_still_works(run, models)


@pytest.mark.parametrize("shape", [(1, 0), (0, 5)])
def test_empty_prompt(models, run, shape):
    with pytest.raises(ValueError, match=r"`input_ids` is empty"):
        run(torch.zeros(shape, dtype=torch.int64), max_new_tokens=NEW)
    assert_still_works(run, models)


def test_left_padding_without_attention_mask(models, run):
    """With pad_token_id an EOS id, model.generate() attends to every token: left padding is refused."""
    pad = 0
    ids = torch.tensor([[pad, pad, 5, 6], [3, 4, 5, 6], [pad, 9, 9, 9]])
    with pytest.raises(ValueError, match=r"`input_ids` look left-padded.*`attention_mask`.*torch.ones_like"):
        run(ids, pad_token_id=pad, eos_token_id=[7, pad], max_new_tokens=NEW)
    # pad_token_id can also come in as the fallback from eos_token_id (as in transformers)
    with pytest.raises(ValueError, match=r"look left-padded.*`attention_mask`"):
        run(ids, eos_token_id=pad, max_new_tokens=NEW)
    assert_still_works(run, models)


def test_attention_mask_of_another_type(models, run):
    with pytest.raises(TypeError, match=r"`attention_mask` must be a torch\.Tensor, got list"):
        run(models.ids, attention_mask=models.mask.tolist(), max_new_tokens=NEW)
    assert_still_works(run, models)


@pytest.mark.parametrize("rows", [[[0, 0, 5, 6]], [[0, 4, 5, 6], [0, 0, 9, 9]], [[0, 0, 5, 6], [3, 4, 5, 6]]])
def test_attention_mask_inferred_from_pad_tokens(models, run, rows):
    """With pad_token_id no EOS id, model.generate() masks its tokens out: so does the engine."""
    ids = torch.tensor(rows)
    expected = models.target.generate(
        ids, pad_token_id=0, eos_token_id=1, do_sample=False, max_new_tokens=NEW
    )
    assert torch.equal(run(ids, pad_token_id=0, eos_token_id=1, max_new_tokens=NEW), expected)
    assert_still_works(run, models)


@pytest.mark.parametrize(("rows", "match"), [([[5, 0, 6, 7]], "left-padded"), ([[0, 0, 0]], "all zeros")])
def test_inferred_attention_mask_unusable(models, run, rows, match):
    with pytest.raises(ValueError, match=rf"inferred as model.generate\(\) does.*{match}.*attention_mask"):
        run(torch.tensor(rows), pad_token_id=0, eos_token_id=1, max_new_tokens=NEW)
    assert_still_works(run, models)


# --------------------------------------------------------------------------------------------- attention mask
@pytest.mark.parametrize("kind", ["shape", "right padded", "all-zero row", "hole", "not binary"])
def test_bad_attention_mask(models, run, kind):
    ids = models.ids
    mask = models.mask.clone()
    if kind == "shape":
        mask, match = mask[:, 1:], r"`attention_mask` has shape \(2, 5\) but `input_ids` has \(2, 6\)"
    elif kind == "right padded":
        mask, match = mask.flip(1), r"`attention_mask` must be left-padded"
    elif kind == "all-zero row":
        mask[1] = 0
        match = r"row of `attention_mask` is all zeros"
    elif kind == "hole":
        mask[0, 3] = 0
        match = r"`attention_mask` must be left-padded"
    else:
        mask[0, -1] = 2
        match = r"`attention_mask` must hold only 0 and 1"
    with pytest.raises(ValueError, match=match):
        run(ids, attention_mask=mask, max_new_tokens=NEW)
    assert_still_works(run, models)


# --------------------------------------------------------------------------------------------- lengths
@pytest.mark.parametrize("value", [0, -3])
def test_bad_max_new_tokens(models, run, value):
    with pytest.raises(ValueError, match=rf"`max_new_tokens` must be an int >= 1, got {value}"):
        run(models.ids, attention_mask=models.mask, max_new_tokens=value)
    assert_still_works(run, models)


def test_max_length_leaves_no_room(models, run):
    with pytest.raises(ValueError, match=r"`max_length`=6 leaves no room"):
        run(models.ids, attention_mask=models.mask, max_length=6)
    for value in (12.0, "x"):  # named as itself, not as the max_new_tokens it would give
        with pytest.raises(ValueError, match=r"`max_length` must be an int"):
            run(models.ids, attention_mask=models.mask, max_length=value)
    assert_still_works(run, models)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def short_models(request):
    """A target with a 32-position limit (gpt2: learned position embeddings, a hard limit)."""
    target = tiny_model(request.param, VOCAB, seed=4, max_positions=32)
    return target, perturbed_copy(target, 0.3, seed=5)


def test_position_limit(models, short_models):
    target, drafter = short_models
    engine = SpeculativeEngine(target, drafter)
    ids, mask = left_padded_prompts(VOCAB, [20, 15], seed=6)
    for call in (engine.generate, lambda *a, **k: omnidraft_fast.generate(target, *a, drafter=drafter, **k)):
        with pytest.raises(ValueError, match=r"= 33 exceeds the model's position limit of 32"):
            call(ids, attention_mask=mask, max_new_tokens=13)
        with pytest.raises(ValueError, match=r"position limit of 32"):
            call(ids, attention_mask=mask, max_length=33)
        with pytest.raises(ValueError, match=r"the 32-token prompt leaves no room .* position limit of 32"):
            call(torch.ones(1, 32, dtype=torch.int64))  # no length set: nothing fits
        # exactly at the limit: 20 + 12 = 32 positions
        out = call(ids, attention_mask=mask, max_new_tokens=12)
        expected = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12)
        assert torch.equal(out, expected), f"\n{out}\n!=\n{expected}"
        assert out.shape == (2, 32)
    # A drafter with a shorter position limit than the target's only drafts worse near its end.
    short_drafter = tiny_model("gpt2", VOCAB, seed=7, max_positions=16)
    out = omnidraft_fast.generate(target, ids, attention_mask=mask, drafter=short_drafter, max_new_tokens=12)
    assert torch.equal(out, expected), f"\n{out}\n!=\n{expected}"
    assert_still_works(api_call(models), models)


# --------------------------------------------------------------------------------------------- draft length
@pytest.mark.parametrize("name", ["num_draft_tokens", "num_assistant_tokens"])
def test_zero_draft_tokens(models, run, name):
    # The message must name the argument the caller actually used (transformers users pass
    # `num_assistant_tokens`, which omnidraft_fast accepts as an alias of `num_draft_tokens`).
    with pytest.raises(ValueError, match=rf"`{name}`.*must be an int >= 1, got 0"):
        run(models.ids, attention_mask=models.mask, max_new_tokens=NEW, **{name: 0})
    assert_still_works(run, models)


def test_zero_draft_tokens_in_engine_config(models):
    with pytest.raises(ValueError, match="`num_draft_tokens` must be an int >= 1"):
        EngineConfig(num_draft_tokens=0)
    with pytest.raises(TypeError, match="`config` must be an EngineConfig"):
        SpeculativeEngine(models.target, models.drafter, config={"num_draft_tokens": 2})
    assert_still_works(api_call(models), models)


def test_a_prompt_bucket_whose_prefill_outgrows_the_device(models):
    """Every padded prompt is at least a bucket wide, and its prefill mask a bucket squared: a bucket whose
    mask the device cannot hold is refused when the engine is built, by name (not in the first request)."""
    with pytest.raises(ValueError, match=r"`prompt_bucket`=10000000 needs 400,000,000,000,000 bytes"):
        SpeculativeEngine(models.target, models.drafter, config=EngineConfig(prompt_bucket=10**7))
    engine = SpeculativeEngine(models.target, models.drafter, config=EngineConfig(prompt_bucket=512))
    assert_still_works(engine.generate, models)  # a large bucket that fits serves as any


def test_conflicting_draft_lengths(models, run):
    with pytest.raises(ValueError, match=r"`num_draft_tokens`=2 and `num_assistant_tokens`=3 disagree"):
        run(models.ids, attention_mask=models.mask, num_draft_tokens=2, num_assistant_tokens=3)
    assert_still_works(run, models)


# --------------------------------------------------------------------------------------------- sampling knobs
def test_negative_temperature_when_sampling(models, run):
    with pytest.raises(ValueError, match=r"`temperature` must be a number > 0 when sampling.*got -0.5"):
        run(models.ids, attention_mask=models.mask, max_new_tokens=NEW, do_sample=True, temperature=-0.5)
    assert_still_works(run, models)


@pytest.mark.parametrize("value", [0.0, float("nan")])
def test_zero_or_nan_temperature_when_sampling(models, run, value):
    """transformers refuses these when sampling; 0 would silently decode greedily here, NaN emit garbage."""
    with pytest.raises(
        ValueError, match=r"`temperature` must be a number > 0 when sampling.*do_sample=False"
    ):
        run(models.ids, attention_mask=models.mask, max_new_tokens=NEW, do_sample=True, temperature=value)
    assert_still_works(run, models)


def test_a_temperature_that_is_no_number_when_greedy(models, run):
    with pytest.raises(ValueError, match=r"`temperature` must be a number, got \[1.0\]"):
        run(models.ids, attention_mask=models.mask, max_new_tokens=NEW, temperature=[1.0])
    assert_still_works(run, models)


@pytest.mark.parametrize("value", [1e-45, 9e-31])
def test_a_temperature_too_small_to_sample_with(models, run, value):
    """logits / T overflows float32 (at 1e-45 for every logit, NaN probabilities: transformers' sampling
    fails, and the draws here were token 0): refused, greedy named as the limit; 1e-30 samples, greedily."""
    with pytest.raises(ValueError, match=r"`temperature`=.* is too small to sample with.*do_sample=False"):
        run(models.ids, attention_mask=models.mask, max_new_tokens=NEW, do_sample=True, temperature=value)
    with pytest.raises(ValueError, match=r"`temperature` must be 0 \(greedy\) or >= 1e-30"):
        ops.sample(torch.zeros(1, 4), torch.ones(1, 4), temperature=value)
    out = run(models.ids, attention_mask=models.mask, max_new_tokens=NEW, do_sample=True, temperature=1e-30)
    assert torch.equal(out, api_call(models)(models.ids, attention_mask=models.mask, max_new_tokens=NEW))
    assert_still_works(run, models)


@pytest.mark.parametrize("returned", ["narrow", "none"])
def test_logits_processor_returns_the_wrong_thing(models, run, returned):
    processor = (lambda ids, scores: scores[:, :3]) if returned == "narrow" else (lambda ids, scores: None)
    with pytest.raises(TypeError, match=r"`logits_processor`.*must return the scores"):
        run(models.ids, attention_mask=models.mask, max_new_tokens=NEW, logits_processor=[processor])
    assert_still_works(run, models)


def test_stopping_criterion_returns_several_values(models, run):
    with pytest.raises(ValueError, match=r"stopping criterion must return one bool per row"):
        run(models.ids, attention_mask=models.mask, max_new_tokens=NEW,
            stopping_criteria=[lambda ids, scores: torch.tensor([True, False, True])])  # fmt: skip
    assert_still_works(run, models)


@pytest.mark.parametrize("which", ["input_ids", "attention_mask"])
def test_meta_tensors(models, run, which):
    kwargs = {"input_ids": models.ids, "attention_mask": models.mask}
    kwargs[which] = kwargs[which].to("meta")
    with pytest.raises(ValueError, match=rf"`{which}` is on the meta device"):
        run(kwargs.pop("input_ids"), max_new_tokens=NEW, **kwargs)
    assert_still_works(run, models)


@pytest.mark.parametrize("do_sample", [True, False])
@pytest.mark.parametrize(
    ("knob", "value", "match"),
    [
        ("top_p", 0.0, r"`top_p` must be in \(0, 1\]"),
        ("top_p", 1.5, r"`top_p` must be in \(0, 1\]"),
        ("top_p", "x", r"`top_p` must be a number"),  # not float()'s message, which names nothing
        ("top_p", [0.9], r"`top_p` must be a number"),
        ("top_k", -1, r"`top_k` must be an int >= 0"),
    ],
)
def test_bad_top_p_top_k(models, run, do_sample, knob, value, match):
    with pytest.raises(ValueError, match=match):
        run(models.ids, attention_mask=models.mask, max_new_tokens=NEW, do_sample=do_sample, **{knob: value})
    assert_still_works(run, models)


# --------------------------------------------------------------------------------------------- NaN
@pytest.mark.parametrize("do_sample", [False, True])
def test_nan_drafter(models, do_sample):
    nan_drafter = copy.deepcopy(models.drafter)
    with torch.no_grad():
        nan_drafter.lm_head.weight.fill_(float("nan"))
    engine = SpeculativeEngine(models.target, nan_drafter)
    requests = models.engine.stats.requests
    for call in (engine.generate, api_call(models, nan_drafter)):
        streamer = RecordingStreamer()
        with pytest.raises(ValueError, match="NaN"):
            call(
                models.ids[:1],
                attention_mask=models.mask[:1],
                max_new_tokens=NEW,
                do_sample=do_sample,
                streamer=streamer,
            )
        assert streamer.calls[-1] == ("end", None)  # the streamer is closed even though generation failed
        with pytest.raises(ValueError, match="NaN"):
            call(models.ids, attention_mask=models.mask, max_new_tokens=NEW, do_sample=do_sample)
    assert engine.stats.requests == 0  # failed requests are not counted
    assert_still_works(api_call(models), models)
    assert_still_works(models.engine.generate, models)
    assert models.engine.stats.requests == requests + 1


@pytest.mark.parametrize("do_sample", [False, True])
def test_nan_target(models, do_sample):
    nan_target = copy.deepcopy(models.target)
    with torch.no_grad():
        nan_target.model.norm.weight.fill_(float("nan"))  # finite embeddings, NaN hidden states at the head
    engine = SpeculativeEngine(nan_target, models.drafter)
    for call in (
        engine.generate,
        lambda *a, **k: omnidraft_fast.generate(nan_target, *a, drafter=models.drafter, **k),
    ):
        with pytest.raises(ValueError, match="NaN"):
            call(models.ids, attention_mask=models.mask, max_new_tokens=NEW, do_sample=do_sample)
    assert_still_works(api_call(models), models)
    assert_still_works(models.engine.generate, models)


def test_nan_from_one_token_of_the_target(models):
    # Only the embedding of one token is NaN: the failure shows up in the one row whose prompt holds it.
    nan_target = copy.deepcopy(models.target)
    bad = int(models.ids[1, -1])
    with torch.no_grad():
        nan_target.model.embed_tokens.weight[bad] = float("nan")
    assert bad not in models.ids[0].tolist()
    with pytest.raises(ValueError, match="NaN"):
        SpeculativeEngine(nan_target, models.drafter).generate(
            models.ids, attention_mask=models.mask, max_new_tokens=NEW
        )
    assert_still_works(api_call(models), models)


# --------------------------------------------------------------------------------------------- options
def test_unsupported_guidance_scale(models, run):
    with pytest.raises(ValueError, match=r"`guidance_scale=1.5` is not supported"):
        run(models.ids, attention_mask=models.mask, max_new_tokens=NEW, guidance_scale=1.5)
    assert_still_works(run, models)


@pytest.mark.parametrize(
    ("option", "value", "match"),
    [
        ("repetition_penalty", 0.0, r"`repetition_penalty` must be a number > 0 \(1.0: off\), got 0.0"),
        ("repetition_penalty", -1.2, r"`repetition_penalty` must be a number > 0"),
        ("repetition_penalty", "1.2", r"`repetition_penalty` must be a number > 0"),
        ("min_new_tokens", -1, r"`min_new_tokens` must be an int >= 0 \(0: off\), got -1"),
        ("min_length", 2.5, r"`min_length` must be an int >= 0"),
        ("no_repeat_ngram_size", -2, r"`no_repeat_ngram_size` must be an int >= 0"),
        (
            "sequence_bias",
            {(3, 4): "high"},
            r"`sequence_bias` entries must be \(token ids, bias number\) pairs",
        ),
        ("sequence_bias", {}, r"`sequence_bias` must be a non-empty dict"),
        ("sequence_bias", {1: 2.0}, r"`sequence_bias` keys are sequences of token ids: write \(1,\) for"),
        ("sequence_bias", [[1, 2.0]], r"`sequence_bias` keys are sequences of token ids: write \(1,\) for"),
        (
            "sequence_bias",
            {(3,): float("nan")},
            r"`sequence_bias` entries must be \(token ids, bias number\)",
        ),
        ("sequence_bias", [[[3, 10**6], -1.0]], r"`sequence_bias` holds ids outside the target's vocabulary"),
        (
            "sequence_bias",
            {(5,): float("inf")},
            r"`sequence_bias` bias \+inf for \(5,\): give a large finite",
        ),
        ("bad_words_ids", [3, 4], r"`bad_words_ids` must be a non-empty list of lists of token ids"),
        (
            "bad_words_ids",
            [[3], []],
            r"`bad_words_ids` must be a token id or a non-empty list of them, got \[\]",
        ),
        (
            "suppress_tokens",
            [-1],
            r"`suppress_tokens` holds ids outside the target's vocabulary \[0, \d+\): \[-1\]",
        ),
        ("begin_suppress_tokens", "4", r"`begin_suppress_tokens` must be a token id or a list of them"),
        ("forced_bos_token_id", [1, 2], r"`forced_bos_token_id` must be one token id"),
        ("forced_eos_token_id", 10**7, r"`forced_eos_token_id` holds ids outside the target's vocabulary"),
        ("remove_invalid_values", 1, r"`remove_invalid_values` must be True or False, got 1"),
        (
            "exponential_decay_length_penalty",
            (2, 0.0),
            r"`exponential_decay_length_penalty` must be \(start_index",
        ),
        (
            "exponential_decay_length_penalty",
            1.5,
            r"`exponential_decay_length_penalty` must be \(start_index",
        ),
        ("num_return_sequences", 0, r"`num_return_sequences` must be an int >= 1, got 0"),
        ("num_return_sequences", 2, r"`num_return_sequences`=2 needs sampling"),
    ],
)
def test_bad_logits_processing(models, run, option, value, match):
    with pytest.raises(ValueError, match=match):
        run(models.ids, attention_mask=models.mask, max_new_tokens=NEW, **{option: value})
    assert_still_works(run, models)


def test_processing_that_leaves_no_token(models, run):
    """Options that leave a position no possible token: the invalid-logits error names them as a cause."""
    with pytest.raises(ValueError, match=r"or the request's logits processing left a position no token"):
        run(models.ids, attention_mask=models.mask, max_new_tokens=NEW, suppress_tokens=list(range(VOCAB)))
    assert_still_works(run, models)


def test_unsupported_num_beams_in_generation_config(models, run):
    with pytest.raises(ValueError, match=r"`num_beams=2` is not supported"):
        run(
            models.ids,
            attention_mask=models.mask,
            generation_config=GenerationConfig(num_beams=2, max_new_tokens=NEW),
        )
    assert_still_works(run, models)


def test_neutral_generation_options_accepted(models, run):
    out = run(
        models.ids,
        attention_mask=models.mask,
        max_new_tokens=NEW,
        repetition_penalty=1.0,
        num_return_sequences=1,
        generation_config=GenerationConfig(num_beams=1, no_repeat_ngram_size=0),
    )
    assert torch.equal(out, models.reference)
    assert_still_works(run, models)


def test_bad_generation_config_type(models, run):
    with pytest.raises(TypeError, match=r"`generation_config` must be a transformers\.GenerationConfig"):
        run(models.ids, attention_mask=models.mask, generation_config={"max_new_tokens": NEW})
    assert_still_works(run, models)


def test_unknown_keyword(models, run):
    with pytest.raises(
        TypeError,
        match=r"unexpected keyword argument `not_a_generate_option`: .* check its spelling, or drop it",
    ):
        run(models.ids, attention_mask=models.mask, max_new_tokens=NEW, not_a_generate_option=3)
    assert_still_works(run, models)


@pytest.mark.parametrize(
    ("keyword", "built"),
    [("drafter", "SpeculativeEngine(target, drafter)"), ("assistant_model", "SpeculativeEngine(target, drafter)"),
     ("assistant_tokenizer", "drafter_tokenizer=..."), ("drafter_tokenizer", "drafter_tokenizer=..."),
     ("target_tokenizer", "target_tokenizer=..."), ("engine_config", "config=EngineConfig(...)"),
     ("config", "config=EngineConfig(...)")],
)  # fmt: skip
def test_an_engine_refuses_per_call_what_it_takes_when_built(models, keyword, built):
    """What generate() takes per call and an engine once, when built: the message says where it goes."""
    with pytest.raises(
        TypeError, match=rf"got `{keyword}`, which an engine takes when it is built: .*{re.escape(built)}"
    ):
        models.engine.generate(
            models.ids, attention_mask=models.mask, max_new_tokens=NEW, **{keyword: object()}
        )
    assert_still_works(models.engine.generate, models)


@pytest.mark.parametrize(
    ("keyword", "match"),
    [
        ("inputs_embeds", r"`inputs_embeds` is not supported by omnidraft_fast: .* pass `input_ids`"),
        ("past_key_values", r"`past_key_values` is not supported by omnidraft_fast: .* whole prompt"),
        ("synced_gpus", r"`synced_gpus` is not supported by omnidraft_fast: the engine runs on one device"),
        (
            "position_ids",
            r"`position_ids` is not supported by omnidraft_fast: positions follow from `attention_mask`",
        ),
    ],
)
def test_generate_keywords_the_engine_does_not_take(models, run, keyword, match):
    """transformers' generate() keywords without a counterpart here: an error that says why (None and False
    are accepted: they ask for nothing)."""
    with pytest.raises(TypeError, match=match):
        run(models.ids, attention_mask=models.mask, max_new_tokens=NEW, **{keyword: torch.zeros(1)})
    out = run(models.ids, attention_mask=models.mask, max_new_tokens=NEW, **{keyword: None})
    assert torch.equal(out, models.reference)
    assert_still_works(run, models)


def test_token_type_ids_of_a_model_that_embeds_them():
    """GPT-2 adds an embedding of token_type_ids even when they are all zero; they are not fed, so refused."""
    target = tiny_model("gpt2", VOCAB, seed=8)
    ids = torch.randint(3, VOCAB, (1, 5))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel embeds them even when they are all zero"):
        omnidraft_fast.generate(
            target, ids, drafter=target, max_new_tokens=3, token_type_ids=torch.zeros_like(ids)
        )
    out = omnidraft_fast.generate(target, ids, drafter=target, max_new_tokens=3)
    assert torch.equal(out, target.generate(ids, do_sample=False, max_new_tokens=3))


def test_non_zero_token_type_ids(models, run):
    with pytest.raises(ValueError, match="`token_type_ids`"):
        run(
            models.ids,
            attention_mask=models.mask,
            max_new_tokens=NEW,
            token_type_ids=torch.ones_like(models.ids),
        )
    assert_still_works(run, models)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eos_token_id": "</s>"}, r"`eos_token_id` must be an int or a list of ints"),
        ({"eos_token_id": [3, 4.0]}, r"`eos_token_id` must be an int or a list of ints"),
        ({"eos_token_id": 1.5}, r"`eos_token_id` must be an int or a list of ints"),  # not list()'s message
        ({"eos_token_id": 2**63}, r"`eos_token_id` must be an int or a list of ints"),  # nor torch's overflow
        ({"pad_token_id": 1.5}, r"`pad_token_id` must be an int"),
        ({"pad_token_id": 2**63}, r"`pad_token_id` must be an int \(a token id, within int64\), got 9223"),
        ({"pad_token_id": -(2**63) - 1}, r"`pad_token_id` must be an int \(a token id, within int64\)"),
        ({"pad_token_id": torch.tensor(1.5), "eos_token_id": 5}, r"`pad_token_id` must be an int"),  # not 1
        # no effect here, but model.generate() refuses what no int64 tensor holds: so does the engine
        ({"bos_token_id": 2**63}, r"`bos_token_id` must be a token id \(an int within int64\)"),
        ({"bos_token_id": "<s>"}, r"`bos_token_id` must be a token id"),
        ({"decoder_start_token_id": -(2**63) - 1}, r"`decoder_start_token_id` must be a token id"),
    ],
)
def test_bad_special_token_ids(models, run, kwargs, match):
    with pytest.raises(TypeError, match=match):
        run(models.ids, attention_mask=models.mask, max_new_tokens=NEW, **kwargs)
    assert_still_works(run, models)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pad_token_id": -1, "eos_token_id": 5}, r"`pad_token_id`=-1 lies outside the target's vocabulary"),
        ({"pad_token_id": VOCAB, "eos_token_id": [99, 5]}, rf"`pad_token_id`={VOCAB} lies outside"),
        (
            {"eos_token_id": [-1, 5]},
            r"`pad_token_id`=-1 \(eos_token_id\[0\], as no pad_token_id is set\) lies",
        ),
        # an EOS id no token can match, but a stop string ends a row: padded too
        (
            {"pad_token_id": -1, "eos_token_id": 99, "stopping_criteria": [lambda ids, scores: True]},
            "`pad_token_id`",
        ),
    ],
)
def test_pad_token_id_outside_the_vocabulary_in_a_batch(models, run, kwargs, match):
    """A pad id that no token has pads the rows that end early (model.generate() feeds it to the model
    then: an IndexError): refused by name."""
    with pytest.raises(ValueError, match=match):
        run(models.ids, attention_mask=models.mask, max_new_tokens=NEW, **kwargs)
    assert_still_works(run, models)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"pad_token_id": -1, "eos_token_id": 5, "rows": 1},  # a row alone is never padded
        {"pad_token_id": -1, "eos_token_id": 99},  # no row can end early
        {"pad_token_id": 10**7},  # no EOS: no padding
        {"eos_token_id": -1},  # transformers warns, and generates to the length
        {"bos_token_id": -1, "decoder_start_token_id": 1.5},  # no effect, made into tensors by transformers
        {"pad_token_id": torch.tensor(3), "eos_token_id": 5},
    ],
)
def test_special_token_ids_transformers_takes(models, run, kwargs):
    """Special token ids model.generate() runs with (out of the vocabulary, negative, ...): the same output."""
    kwargs = dict(kwargs)
    rows = kwargs.pop("rows", 2)
    ids, mask = models.ids[-rows:], models.mask[-rows:]  # the last row ends at id 5
    expected = models.target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW, **kwargs)
    assert torch.equal(run(ids, attention_mask=mask, max_new_tokens=NEW, **kwargs), expected)


@pytest.mark.parametrize(
    ("returned", "match"),
    [
        (
            [2**63],
            r"must return a list of token ids \(ints within int64\), got \[9223372036854775808\] for batch",
        ),
        ([3, 10**7], rf"returned ids beyond the target's vocabulary of {VOCAB} for batch ID 0: \[10000000\]"),
        (
            [-VOCAB - 1],
            rf"returned ids beyond the target's vocabulary of {VOCAB} for batch ID 0: \[-{VOCAB + 1}\]",
        ),
        ([3, 1.5], r"must return a list of token ids"),  # not cut to 1
        (["w3"], r"must return a list of token ids"),
    ],
)
def test_prefix_allowed_tokens_fn_returning_what_indexes_no_score(models, run, returned, match):
    """Ids transformers fails on (an overflow, an IndexError) or would truncate: an error naming the function."""
    with pytest.raises(ValueError, match=rf"`prefix_allowed_tokens_fn` {match}"):
        run(
            models.ids,
            attention_mask=models.mask,
            max_new_tokens=NEW,
            prefix_allowed_tokens_fn=lambda b, ids: returned,
        )
    assert_still_works(run, models)


def test_prefix_allowed_tokens_fn_not_a_function(models, run):
    with pytest.raises(TypeError, match=r"`prefix_allowed_tokens_fn` must be a function .* got list"):
        run(models.ids, attention_mask=models.mask, max_new_tokens=NEW, prefix_allowed_tokens_fn=[3, 4])
    assert_still_works(run, models)


def test_max_length_criteria_without_an_int_length(models, run):
    from transformers import StoppingCriteriaList
    from transformers.generation.stopping_criteria import MaxLengthCriteria

    criteria = StoppingCriteriaList([MaxLengthCriteria(max_length=12.5)])
    with pytest.raises(
        ValueError, match=r"a MaxLengthCriteria in `stopping_criteria` must have an int max_length"
    ):
        run(models.ids, attention_mask=models.mask, stopping_criteria=criteria)
    assert_still_works(run, models)


def test_prefix_allowed_tokens_fn_negative_ids_count_from_the_end(models, run):
    """transformers indexes the scores with the ids, so -1 is the last token: the same here."""
    kwargs = dict(
        attention_mask=models.mask, max_new_tokens=NEW, prefix_allowed_tokens_fn=lambda b, ids: [3, -1]
    )
    expected = models.target.generate(models.ids, do_sample=False, **kwargs)
    assert torch.equal(run(models.ids, **kwargs), expected)
    assert set(expected[:, models.ids.shape[1] :].flatten().tolist()) <= {3, VOCAB - 1}


def test_streamer_with_batch_of_two(models, run):
    streamer = RecordingStreamer()
    with pytest.raises(
        ValueError, match=r"`streamer` supports one row only \(batch size 1, num_return_sequences=1"
    ):
        run(models.ids, attention_mask=models.mask, max_new_tokens=NEW, streamer=streamer)
    assert streamer.calls == []  # nothing was streamed before the error
    assert_still_works(run, models)


def test_a_streamer_failing_on_the_prompt(models, run):
    """A streamer whose first put() raises: the request ends as on any failure (caches released, the
    streamer closed so that a consumer waiting on it stops) and the engine serves exactly afterwards."""

    class Failing(RecordingStreamer):
        def put(self, value):
            raise OSError("the client went away")

    streamer = Failing()
    ids, mask = models.ids[:1], models.mask[:1]
    with pytest.raises(OSError, match="the client went away"):
        run(ids, attention_mask=mask, max_new_tokens=NEW, streamer=streamer)
    assert streamer.calls == [("end", None)]
    engine = models.engine if run.kind == "engine" else models.target._omnidraft_engines[-1]
    assert engine.target.cache is None and engine.drafter.cache is None
    assert_still_works(run, models)


# ------------------------------------------------------------------------ objects of the wrong kind
def test_an_engine_config_of_another_type_is_refused_by_its_name(models):
    """``generate(engine_config=...)`` names ``engine_config`` (the caller's word), not the engine's ``config``."""
    with pytest.raises(
        TypeError, match=r"`engine_config` must be an omnidraft_fast.EngineConfig or None, got dict"
    ):
        api_call(models)(
            models.ids, attention_mask=models.mask, max_new_tokens=NEW, engine_config={"num_draft_tokens": 2}
        )
    assert_still_works(api_call(models), models)


class _PutOnly:
    """A streamer missing ``end()``."""

    def __init__(self):
        self.values = []

    def put(self, value):
        self.values.append(value)


@pytest.mark.parametrize("streamer", [object(), _PutOnly()], ids=["no methods", "no end"])
def test_a_streamer_without_put_and_end_is_refused_before_anything_runs(models, run, streamer):
    """Refused naming `streamer` and what it must have, not an AttributeError from inside the request."""
    prompt, mask = models.ids[:1], models.mask[:1]
    with pytest.raises(TypeError, match=r"`streamer` must have the methods `put\(token_ids\)` and `end\(\)`"):
        run(prompt, attention_mask=mask, max_new_tokens=NEW, streamer=streamer)
    assert getattr(streamer, "values", []) == []  # nothing was streamed
    assert_still_works(run, models)


@pytest.mark.parametrize("path", [None, 3])
def test_a_state_path_that_is_no_file_name_is_refused_by_name(models, path):
    for method in (models.engine.save_state, models.engine.load_state):
        with pytest.raises(TypeError, match=r"`path` must be a file name \(a str or a pathlib.Path\)"):
            method(path)
    assert_still_works(models.engine.generate, models)


@pytest.mark.parametrize(
    "name", ["ngram_preseed", "split_tokens", "lean_forward", "cuda_graphs", "time_stages"]
)
def test_engine_switches_take_bools_only(models, name):
    """A switch is True or False, as its message says (1 == True, but 1 is no switch); numpy's bools are
    bools, as numpy's ints are ints."""
    for value in (1, 0, "yes"):
        with pytest.raises(TypeError, match=rf"`{name}` must be True,? (or )?False"):
            EngineConfig(**{name: value})
    for value in (np.True_, np.False_):
        config = EngineConfig(**{name: value})
        assert type(getattr(config, name)) is bool and getattr(config, name) == bool(value)
        assert config == EngineConfig(**{name: bool(value)})
    assert_still_works(api_call(models), models)
