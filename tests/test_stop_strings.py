"""``stop_strings`` as transformers handles them: a row ends at the first new token that completes one."""

from __future__ import annotations

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

import omnidraft_fast
from omnidraft_fast import EngineConfig, SpeculativeEngine
from omnidraft_fast.bridge import token_bytes
from omnidraft_fast.stopping import Criteria, Stops, StopStrings
from omnidraft_fast.zoo import load
from omnidraft_fast.zoo.data import heldout_prompts

NEW = 40


@pytest.fixture(scope="module")
def zoo():
    return load("code-pair")


@pytest.fixture(scope="module")
def batch(zoo):
    tokenizer = zoo.target_tokenizer
    tokenizer.padding_side = "left"
    return tokenizer([p for _, p in heldout_prompts(1)], return_tensors="pt", padding=True)


def test_matching_by_hand(zoo):
    """The token that completes a stop string ends the row, whether the string starts in an earlier token
    (or in the prompt) or lies inside the token; an occurrence wholly before the new tokens does not."""
    tokenizer = zoo.target_tokenizer
    pieces = token_bytes(tokenizer, zoo.target.config.vocab_size).pieces
    ids = tokenizer("x = compute(a)\\n    return x + 1", add_special_tokens=False).input_ids
    text = [pieces[i] for i in ids]
    at = next(n for n in range(1, len(ids) + 1) if b"return" in b"".join(text[:n]))  # the completing token
    assert StopStrings(("return",), pieces, [ids[:2]]).first_stop(0, ids[2:]) == at - 2
    assert StopStrings(("zzz", "return"), pieces, [[]]).first_stop(0, ids) == at
    assert (
        StopStrings(("return",), pieces, [ids[: at + 1]]).first_stop(0, ids[at + 1 :]) is None
    )  # in the prompt
    spanning = StopStrings(("e(a",), pieces, [ids[:1]])  # spans token boundaries
    assert spanning.first_stop(0, ids[1:3]) is None  # fed in two calls: the state carries over
    assert spanning.first_stop(0, ids[3:]) == next(
        n for n in range(1, len(ids)) if b"e(a" in b"".join(text[: 3 + n])
    )


def test_an_occurrence_in_the_context_does_not_stop_a_later_token(zoo):
    """A stop string shorter than another lies whole in the context kept for the longer one's matches: an
    occurrence there (in the prompt, here) ends before the new token and stops nothing; one the new tokens
    complete does."""
    tokenizer = zoo.target_tokenizer
    pieces = token_bytes(tokenizer, zoo.target.config.vocab_size).pieces
    ids = tokenizer("x = compute(a)\\n    return x + 1", add_special_tokens=False).input_ids
    text = [pieces[i] for i in ids]
    at = next(n for n in range(1, len(ids) + 1) if b"return" in b"".join(text[:n]))  # the completing token
    stops = ("return", "a much longer stop string")
    assert StopStrings(stops, pieces, [ids[:at]]).first_stop(0, ids[at:]) is None
    assert StopStrings(stops, pieces, [ids[: at - 1]]).first_stop(0, ids[at - 1 :]) == 1


def test_id_zero_is_a_token_like_any_other():
    """Every id with bytes takes part in matches, the first one (id 0) too."""
    pieces = [b"re", b"tu", b"rn", None]
    assert StopStrings(("return",), pieces, [[]]).first_stop(0, [0, 1, 2]) == 3
    assert StopStrings(("return",), pieces, [[0]]).first_stop(0, [1, 2]) == 2  # in the prompt
    assert StopStrings(("rnre",), pieces, [[2]]).first_stop(0, [0]) == 1


def test_the_earliest_stop_of_several_conditions(zoo):
    """With stop strings and criteria together, a row keeps its tokens through the first that any of them
    stops at, also where both stop within one round's tokens (each condition alone is the reference)."""
    tokenizer = zoo.target_tokenizer
    pieces = token_bytes(tokenizer, zoo.target.config.vocab_size).pieces
    ids = tokenizer("x = compute(a)\\n    return x + 1", add_special_tokens=False).input_ids

    def strings() -> StopStrings:
        return StopStrings(("return",), pieces, [ids[:1]])

    def criteria() -> Criteria:
        return Criteria((_StopAt(ids[3]),), [ids[:1]], torch.device("cpu"))

    by_string, by_criterion = strings().first_stop(0, ids[1:]), criteria().first_stop(0, ids[1:])
    assert by_string is not None and by_criterion is not None and by_string != by_criterion
    for checks in ([strings(), criteria()], [criteria(), strings()]):
        assert Stops(checks).first_stop(0, ids[1:], None) == min(by_string, by_criterion)


def test_no_match_spans_an_id_the_tokenizer_does_not_have(zoo):
    """A model's padded vocabulary has ids its tokenizer lacks: transformers' StopStringCriteria lets no
    match span one of them, and neither does the engine (it matched across their empty bytes)."""
    from transformers.generation.stopping_criteria import StopStringCriteria

    tokenizer = zoo.target_tokenizer
    unknown = len(tokenizer.get_vocab()) + 3
    pieces = token_bytes(tokenizer, unknown + 8).pieces
    assert pieces[unknown] is None
    letters = tokenizer.convert_tokens_to_ids(list("return"))
    transformers_stops = StopStringCriteria(tokenizer, ["return"])
    for ids, stops in ((letters, True), ([*letters[:3], unknown, *letters[3:]], False)):
        ours = StopStrings(("return",), pieces, [[]]).first_stop(0, ids)
        assert ours == (len(ids) if stops else None)
        assert bool(transformers_stops(torch.tensor([ids]), None)[0]) == stops
    # in the prompt too: the prompt's tail ends at the unknown id
    assert StopStrings(("return",), pieces, [[*letters[:3], unknown]]).first_stop(0, letters[3:]) is None
    assert StopStrings(("return",), pieces, [letters[:3]]).first_stop(0, letters[3:]) == 3


@pytest.mark.parametrize("config", [{}, {"cuda_graphs": True}, {"rounds_per_sync": 3}])
@pytest.mark.parametrize("stops", [["\n"], ["return", "):"], [" = ", "\n\n"]])
def test_greedy_equals_transformers(zoo, batch, stops, config):
    tokenizer = zoo.target_tokenizer
    kwargs = dict(max_new_tokens=NEW, stop_strings=stops, tokenizer=tokenizer)
    expected = zoo.target.generate(**batch, do_sample=False, **kwargs)
    plain = zoo.target.generate(**batch, do_sample=False, max_new_tokens=NEW)
    assert expected.shape[1] < plain.shape[1] or not torch.equal(expected, plain)  # the stops did stop rows
    out = omnidraft_fast.generate(zoo.target, **batch, drafter=zoo.drafter_shared,
                                  engine_config=EngineConfig(**config), **kwargs)  # fmt: skip
    assert torch.equal(out, expected)


def test_across_vocabularies_sampled_and_streamed(zoo, batch):
    """Across vocabularies, sampled: every row's text ends with a stop string or runs to max_new_tokens;
    a streamer gets the text through the stop and no further."""
    from transformers import TextIteratorStreamer

    tokenizer = zoo.target_tokenizer
    engine = SpeculativeEngine(zoo.target, zoo.drafter_cross, target_tokenizer=tokenizer,
                               drafter_tokenizer=zoo.drafter_tokenizer)  # fmt: skip
    torch.manual_seed(0)
    out = engine.generate(**batch, max_new_tokens=NEW, do_sample=True, top_k=0, stop_strings=["\n"],
                          return_dict_in_generate=True, output_logits=True)  # fmt: skip
    width = batch["input_ids"].shape[1]
    for row, logits in zip(out.sequences[:, width:], torch.stack(out.logits, 1), strict=True):
        n = int((~torch.isnan(logits[:, 0])).sum())  # the row's new tokens (NaN logits past its end)
        assert not torch.isnan(logits[:n]).any() and torch.isnan(logits[n:]).all()
        text, before = tokenizer.decode(row[:n]), tokenizer.decode(row[: n - 1])
        assert ("\n" in text and "\n" not in before) or (n == NEW and "\n" not in text), repr(text)
    ids = batch["input_ids"][:1, batch["attention_mask"][0].bool()]
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    streamed = engine.generate(ids, max_new_tokens=NEW, stop_strings=["\n"], streamer=streamer)
    assert "".join(streamer) == tokenizer.decode(streamed[0, ids.shape[1] :])


def test_bad_stop_strings(zoo, batch):
    engine = SpeculativeEngine(zoo.target, zoo.drafter_shared)
    with pytest.raises(ValueError, match="`stop_strings` need the target's tokenizer"):
        engine.generate(**batch, max_new_tokens=4, stop_strings=["\n"])
    for bad in ([""], "", [3], 5):
        with pytest.raises(ValueError, match="`stop_strings` must be a non-empty string or a list of them"):
            engine.generate(**batch, max_new_tokens=4, stop_strings=bad, tokenizer=zoo.target_tokenizer)
    out = engine.generate(**batch, max_new_tokens=4, stop_strings="\n", tokenizer=zoo.target_tokenizer)
    assert out.shape[1] <= batch["input_ids"].shape[1] + 4  # the engine still works


class _StopAt(StoppingCriteria):
    """A caller's criterion: stop a row once its last token is ``token`` (it reads input_ids only)."""

    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return input_ids[:, -1] == self.token


class _Unsure(StoppingCriteria):
    """A criterion that reads the scores (transformers passes its output_scores tuple so far): stop a row
    at a token where the target was unsure."""

    def __call__(self, input_ids: torch.Tensor, scores: tuple[torch.Tensor, ...], **kwargs) -> torch.Tensor:
        return scores[-1].softmax(-1).amax(-1) < 0.5


@pytest.mark.parametrize("config", [{}, {"cuda_graphs": True}, {"rounds_per_sync": 3}])
def test_stopping_criteria_as_transformers(zoo, batch, config):
    """The caller's ``stopping_criteria``, checked after each new token as transformers checks them (one
    row at a time here): greedy output equals transformers', with stop strings too; criteria reading the
    scores get them with ``output_scores``."""
    tokenizer = zoo.target_tokenizer
    plain = zoo.target.generate(**batch, do_sample=False, max_new_tokens=NEW)
    width = batch["input_ids"].shape[1]
    stop_at = _StopAt(int(plain[0, width + 5]))  # row 0's sixth new token (maybe other rows' too)
    engine = SpeculativeEngine(zoo.target, zoo.drafter_shared, config=EngineConfig(**config))
    for kwargs in (
        {"stopping_criteria": StoppingCriteriaList([stop_at])},
        {"stopping_criteria": [stop_at], "stop_strings": ["):"], "tokenizer": tokenizer},
        {"stopping_criteria": [_Unsure()], "return_dict_in_generate": True, "output_scores": True},
        # two criteria: a row stops where either says so; one reading the scores beside stop strings
        {"stopping_criteria": [_StopAt(int(plain[1, width + 3])), stop_at]},
        {
            "stopping_criteria": [_Unsure()],
            "stop_strings": ["):"],
            "tokenizer": tokenizer,
            "return_dict_in_generate": True,
            "output_scores": True,
        },
    ):
        expected = zoo.target.generate(**batch, do_sample=False, max_new_tokens=NEW, **kwargs)
        out = engine.generate(**batch, max_new_tokens=NEW, **kwargs)
        if "output_scores" in kwargs:
            expected, out = expected.sequences, out.sequences
        assert expected.shape[1] < plain.shape[1] or not torch.equal(expected, plain)
        assert torch.equal(out, expected)
    with pytest.raises(TypeError, match=r"`stopping_criteria` must be a list"):
        engine.generate(**batch, max_new_tokens=4, stopping_criteria=stop_at)


def test_a_max_length_criterion_decides_the_length(zoo, batch):
    """A ``MaxLengthCriteria`` among the caller's criteria takes the place of the one the length options make,
    as transformers merges the lists: it decides the length, longer or shorter, with a warning; beside
    ``forced_eos_token_id`` (which transformers would force mid-way) it is refused."""
    from transformers.generation.stopping_criteria import MaxLengthCriteria

    width = batch["input_ids"].shape[1]
    engine = SpeculativeEngine(zoo.target, zoo.drafter_shared)
    for length, options in (
        (width + 9, {"max_new_tokens": 4}),
        (width + 3, {"max_new_tokens": 8}),
        (width + 6, {}),
    ):
        kwargs = dict(stopping_criteria=StoppingCriteriaList([MaxLengthCriteria(length)]), **options)
        expected = zoo.target.generate(**batch, do_sample=False, **kwargs)
        with pytest.warns(
            UserWarning, match=r"`stopping_criteria` holds a MaxLengthCriteria, which `max_length`"
        ):
            out = engine.generate(**batch, **kwargs)
        assert out.shape[1] == length and torch.equal(out, expected)
    with pytest.raises(ValueError, match=r"`forced_eos_token_id` .* MaxLengthCriteria"):
        engine.generate(**batch, stopping_criteria=[MaxLengthCriteria(width + 5)], forced_eos_token_id=3)


def test_an_eos_criterion_with_other_ids_is_refused(zoo, batch):
    """An ``EosTokenCriteria`` takes the place of the one ``eos_token_id`` makes in transformers: with the same
    ids it changes nothing and is served; with others (rows would stop at its ids only) it is refused. So is a
    ``StopStringCriteria`` beside ``stop_strings``."""
    from transformers.generation.stopping_criteria import EosTokenCriteria

    engine = SpeculativeEngine(zoo.target, zoo.drafter_shared)
    plain = zoo.target.generate(**batch, do_sample=False, max_new_tokens=8, eos_token_id=None)
    eos = int(plain[0, -4])
    kwargs = dict(max_new_tokens=8, eos_token_id=eos, stopping_criteria=[EosTokenCriteria(eos)])
    assert torch.equal(
        engine.generate(**batch, **kwargs), zoo.target.generate(**batch, do_sample=False, **kwargs)
    )
    with pytest.raises(
        ValueError, match=rf"EosTokenCriteria .* stops at \[{eos + 1}\] and `eos_token_id` is \[{eos}\]"
    ):
        engine.generate(
            **batch, max_new_tokens=8, eos_token_id=eos, stopping_criteria=[EosTokenCriteria(eos + 1)]
        )
    from transformers.generation.stopping_criteria import StopStringCriteria

    strings = StopStringCriteria(zoo.target_tokenizer, ["):"])  # the same: one or the other
    with pytest.raises(ValueError, match=r"a StopStringCriteria in `stopping_criteria` and `stop_strings`"):
        engine.generate(**batch, max_new_tokens=8, stop_strings=["):"], tokenizer=zoo.target_tokenizer,
                        stopping_criteria=[strings])  # fmt: skip


def test_criteria_see_each_token_with_its_scores(zoo, batch):
    """A criterion is called once per new token with the sequence through it and the output scores so far."""
    calls = []

    def record(input_ids, scores, **kwargs):
        calls.append((input_ids.clone(), scores))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    ids = batch["input_ids"][:1, batch["attention_mask"][0].bool()]
    engine = SpeculativeEngine(zoo.target, zoo.drafter_shared)
    out = engine.generate(ids, max_new_tokens=12, do_sample=True, temperature=0.8, stopping_criteria=[record],
                          return_dict_in_generate=True, output_scores=True)  # fmt: skip
    assert len(calls) == len(out.scores) == 12
    for step, (input_ids, scores) in enumerate(calls):
        assert torch.equal(input_ids, out.sequences[:, : ids.shape[1] + step + 1])
        assert len(scores) == step + 1 and torch.equal(scores[-1], out.scores[step])


@pytest.mark.parametrize("config", [{}, {"cuda_graphs": True}, {"rounds_per_sync": 3}])
def test_without_eos_stopped_rows_go_on_until_every_row_stops(zoo, batch, config):
    """transformers pads a row a stop ended only when an EOS id is set; without one the row keeps generating
    until every row has stopped, and all end with the last to stop (or at max_new_tokens)."""
    tokenizer = zoo.target_tokenizer
    engine = SpeculativeEngine(zoo.target, zoo.drafter_shared, config=EngineConfig(**config))
    plain = zoo.target.generate(**batch, do_sample=False, max_new_tokens=NEW, eos_token_id=None)
    width = batch["input_ids"].shape[1]
    for kwargs in (
        {"stop_strings": ["\n"], "tokenizer": tokenizer},  # stops every row, at different tokens
        {"stopping_criteria": [_StopAt(int(plain[0, width + 3]))]},  # may leave rows going to the end
        {"stop_strings": ["("], "tokenizer": tokenizer, "max_new_tokens": 6},
    ):
        kwargs = {"max_new_tokens": NEW, **kwargs}
        expected = zoo.target.generate(**batch, do_sample=False, eos_token_id=None, pad_token_id=0, **kwargs)
        out = engine.generate(**batch, eos_token_id=None, pad_token_id=0, **kwargs)
        assert torch.equal(out, expected), (kwargs, out[:, width:], expected[:, width:])
    ends = expected[:, width:] == 0
    assert not ends.any()  # nothing padded


def test_special_tokens_read_as_their_text(zoo, batch):
    """A special token that is no EOS id (``<|im_end|>`` here) reads as its text, as transformers' stop
    strings read it: a stop string naming it stops there, and text does not match across it."""
    tokenizer = zoo.target_tokenizer
    special = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert (
        tokenizer.added_tokens_decoder[special].special
        and special != zoo.target.generation_config.eos_token_id
    )
    newline = tokenizer("\n", add_special_tokens=False).input_ids[0]
    after = {(newline, special): 60.0, (special, newline): 60.0}  # "\n<|im_end|>\n" at every line end
    engine = SpeculativeEngine(zoo.target, zoo.drafter_shared)
    for stops in (["<|im_end|>"], ["\n\n"]):
        kwargs = dict(max_new_tokens=NEW, stop_strings=stops, tokenizer=tokenizer, sequence_bias=after)
        expected = zoo.target.generate(**batch, do_sample=False, **kwargs)
        assert (expected == special).any()  # the biases put the special token in
        out = engine.generate(**batch, **kwargs)
        assert torch.equal(out, expected)


def test_a_tokenizer_per_request_is_not_kept(zoo, batch):
    """A held engine reads each tokenizer's token bytes once and forgets them with the tokenizer: a server
    that loads one per request does not pile tokenizers and tables up (about 40 MB each for Llama-3's)."""
    import copy
    import gc
    import weakref

    engine = SpeculativeEngine(zoo.target, zoo.drafter_shared)
    expected = zoo.target.generate(**batch, do_sample=False, max_new_tokens=NEW, stop_strings=["\n"],
                                   tokenizer=zoo.target_tokenizer)  # fmt: skip
    gone = []
    for _ in range(3):
        tokenizer = copy.deepcopy(zoo.target_tokenizer)
        out = engine.generate(**batch, max_new_tokens=NEW, stop_strings=["\n"], tokenizer=tokenizer)
        assert torch.equal(out, expected)
        gone.append(weakref.ref(tokenizer))
        del tokenizer
    gc.collect()
    assert not any(ref() for ref in gone) and len(engine._token_bytes) == 0


def test_tokens_added_to_the_tokenizer_between_requests_are_read(cross_pair):
    """A held engine reads a tokenizer's token bytes again once tokens were added to it: transformers' stop
    strings read the tokenizer as it is at each call (the engine kept the bytes of the first request's, where
    an added token had none, and ran past the stop string it completes)."""
    import copy

    from conftest import perturbed_copy

    target, _, tokenizer, _ = cross_pair
    target, tokenizer = copy.deepcopy(target), copy.deepcopy(tokenizer)
    ids = tokenizer(["def fibonacci(n):\n    return"], return_tensors="pt").input_ids
    added = len(tokenizer)  # the model's vocabulary is padded past its tokenizer's
    with torch.no_grad():  # the added id comes out within the 12 tokens (where first depends on the weights)
        sixth = target.generate(ids, max_new_tokens=6, do_sample=False)[0, -1]
        target.lm_head.weight[added] = target.lm_head.weight[sixth] * 1.5
    engine = SpeculativeEngine(target, perturbed_copy(target, 0.3))
    kwargs = dict(max_new_tokens=12, stop_strings=["QQQ"], tokenizer=tokenizer)
    first = engine.generate(ids, **kwargs)
    assert (
        torch.equal(first, target.generate(ids, do_sample=False, **kwargs))
        and first.shape[1] == ids.shape[1] + 12
    )
    tokenizer.add_tokens(["QQQ"])
    assert tokenizer.convert_tokens_to_ids("QQQ") == added
    expected = target.generate(ids, do_sample=False, **kwargs)
    assert expected[0, -1] == added and expected.shape[1] < ids.shape[1] + 12  # stopped at the added token
    assert torch.equal(engine.generate(ids, **kwargs), expected)
