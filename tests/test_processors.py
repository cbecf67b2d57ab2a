"""Target-side logits processing (repetition_penalty, no_repeat_ngram_size, min_length, min_new_tokens, min_p)
as transformers applies it:
greedy output equal to transformers', sampled output in the processed target's law, scores equal."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from conftest import left_padded_prompts, peaked_pair, perturbed_copy, tiny_model
from transformers.generation import logits_process
from transformers.generation.logits_process import (
    ExponentialDecayLengthPenalty,
    LogitsProcessor,
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
)

from omnidraft_fast import CascadeConfig, EngineConfig, SpeculativeEngine

VOCAB = 48
NEW = 14


@pytest.fixture(scope="module")
def pair():  # peaked laws: greedy runs repeat tokens, so the penalty changes them
    return peaked_pair(VOCAB, seed=41, head_scale=8, noise=0.3, eos_token_id=2)


def _engine(pair, **config):
    return SpeculativeEngine(*pair, config=EngineConfig(num_draft_tokens=4, **config))


# transformers 5.24 leaves a prompt's left padding out of the penalty (older releases count the pad ids).
_SKIPS_PADDING = "prompt_ignore_length" in inspect.signature(RepetitionPenaltyLogitsProcessor).parameters


def _first_new(plain: torch.Tensor, prompt: int, row: int = 0, count: int = 1) -> list[int]:
    return plain[row, prompt : prompt + count].tolist()


# Each case builds its options from the unprocessed greedy output (so that they bear on it).
CASES = {
    "penalty 1.5": lambda plain, prompt: {"repetition_penalty": 1.5},
    "penalty 0.7": lambda plain, prompt: {"repetition_penalty": 0.7},  # < 1 rewards repeats
    "min_new_tokens": lambda plain, prompt: {"min_new_tokens": 9},
    "min_length": lambda plain, prompt: {"min_length": 15},
    "penalty, min_new_tokens": lambda plain, prompt: {"repetition_penalty": 1.3, "min_new_tokens": 5},
    "no_repeat 2": lambda plain, prompt: {"no_repeat_ngram_size": 2},
    "no_repeat 3, penalty": lambda plain, prompt: {"no_repeat_ngram_size": 3, "repetition_penalty": 1.2},
    "no_repeat 1": lambda plain, prompt: {"no_repeat_ngram_size": 1},
    # row 0's second new token is held back after its first; 7 is pushed up after row 1's third and fourth
    "sequence_bias": lambda plain, prompt: {
        "sequence_bias": {
            tuple(_first_new(plain, prompt, count=2)): -30.0,
            (plain[1, prompt + 2].item(), plain[1, prompt + 3].item(), 7): 40.0,
            (11,): 2.5,
        }
    },
    "sequence_bias -inf": lambda plain, prompt: {
        "sequence_bias": [[_first_new(plain, prompt, row=2, count=2), -math.inf]],
    },
    "bad_words_ids": lambda plain, prompt: {
        "bad_words_ids": [_first_new(plain, prompt, count=2), _first_new(plain, prompt, row=2, count=3)],
        "repetition_penalty": 1.1,
    },
    # one word of three tokens: a table of one sequence two tokens wide (its rows and its width differ)
    "bad_words_ids, one longer word": lambda plain, prompt: {
        "bad_words_ids": [_first_new(plain, prompt, row=1, count=3)],
    },
    "suppress_tokens": lambda plain, prompt: {"suppress_tokens": _first_new(plain, prompt, row=1, count=2)},
    "begin_suppress_tokens": lambda plain, prompt: {"begin_suppress_tokens": _first_new(plain, prompt)},
    "forced_eos_token_id": lambda plain, prompt: {"forced_eos_token_id": [7, 9]},
    "exponential_decay": lambda plain, prompt: {"exponential_decay_length_penalty": (3, 4.0)},
    # EOS held at -inf by the minimum past the decay's start stays there (no NaN)
    "exponential_decay, min_new_tokens": lambda plain, prompt: {
        "exponential_decay_length_penalty": (2, 4.0),
        "min_new_tokens": 7,
    },
    "remove_invalid_values": lambda plain, prompt: {"remove_invalid_values": True, "min_new_tokens": 6},
    # the prompt's tokens (its padding included) rewarded, or penalised below 1
    "encoder_repetition 2.5": lambda plain, prompt: {"encoder_repetition_penalty": 2.5},
    "encoder_repetition 0.4, penalty": lambda plain, prompt: {
        "encoder_repetition_penalty": 0.4,
        "repetition_penalty": 1.3,
    },
    # no n-gram of the prompt continued (n = 1: no prompt token at all); the bias asks for one of row 0's
    "encoder_no_repeat 2": lambda plain, prompt: {
        "encoder_no_repeat_ngram_size": 2,
        "sequence_bias": {
            (plain[0, prompt - 3].item(),): 20.0,
            tuple(plain[0, prompt - 3 : prompt - 1].tolist()): 40.0,
        },
    },
    "encoder_no_repeat 1": lambda plain, prompt: {"encoder_no_repeat_ngram_size": 1},
    "encoder_no_repeat 3, no_repeat 2": lambda plain, prompt: {
        "encoder_no_repeat_ngram_size": 3,
        "no_repeat_ngram_size": 2,
    },
}


# transformers 5.24 keeps a -inf EOS logit out of the length decay (older releases make it NaN).
_DECAY_KEEPS_INF = "isfinite" in inspect.getsource(ExponentialDecayLengthPenalty.__call__)


@pytest.mark.parametrize("cuda_graphs", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_greedy_equals_transformers(pair, case, cuda_graphs):
    if case == "exponential_decay, min_new_tokens" and not _DECAY_KEEPS_INF:
        pytest.skip("this transformers turns a -inf EOS logit into NaN in the length decay")
    target, _ = pair
    rows = [6, 6] if "penalty" in case and not _SKIPS_PADDING else [6, 4, 9]
    ids, mask = left_padded_prompts(VOCAB, rows, seed=3)
    # EOS: the third token of row 0's greedy continuation, so that a minimum length holds it back.
    eos = int(target.generate(ids, attention_mask=mask, max_new_tokens=3, pad_token_id=0)[0, -1])
    plain = target.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
    options = CASES[case](plain, ids.shape[1])
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0, **options)
    expected = target.generate(ids, do_sample=False, **kwargs)
    assert not torch.equal(expected, plain), "the option should change this output, or the test proves little"
    engine = _engine(pair, cuda_graphs=cuda_graphs)
    for _ in range(2):  # with cuda_graphs the second request replays the captured round
        assert torch.equal(engine.generate(ids, **kwargs), expected)
    assert engine.stats.accepted > 0


def test_processing_requests_replay_kept_graphs_on_other_prompts(pair):
    """With logits processing the engine keeps its graphs for prompts of the same width: a request on other
    prompts refills the processors' state (the tokens each row has seen) and replays from its first round,
    with transformers' output."""
    target, _ = pair
    options = {"max_new_tokens": NEW, "repetition_penalty": 1.8, "no_repeat_ngram_size": 2, "pad_token_id": 0}
    engine = _engine(pair, cuda_graphs=True)
    for seed in (3, 4):
        ids, mask = left_padded_prompts(VOCAB, [6, 4, 6], seed=seed)
        expected = target.generate(ids, attention_mask=mask, do_sample=False, **options)
        out = engine.generate(ids, attention_mask=mask, return_dict_in_generate=True, **options)
        assert torch.equal(out.sequences, expected)
    stages = set(out.stats.stage_seconds)  # the second request: replays only
    assert "round" in stages and "target" not in stages and not any(s.startswith("capture:") for s in stages)


def test_forced_bos_on_a_one_token_prompt(pair):
    """forced_bos_token_id applies at a sequence of one token, and then begin_suppress_tokens applies one
    token later (transformers' begin_index)."""
    target, _ = pair
    ids = torch.tensor([[17], [30]])
    kwargs = dict(max_new_tokens=NEW, pad_token_id=0, forced_bos_token_id=5)
    forced = target.generate(ids, **kwargs)
    assert (forced[:, 1] == 5).all()
    assert torch.equal(_engine(pair).generate(ids, **kwargs), forced)
    kwargs["begin_suppress_tokens"] = forced[:, 2].tolist()  # what follows the forced BOS
    expected = target.generate(ids, **kwargs)
    assert not torch.equal(expected, forced)
    assert torch.equal(_engine(pair).generate(ids, **kwargs), expected)
    longer = torch.tensor([[17, 4]])
    assert torch.equal(_engine(pair).generate(longer, **kwargs), target.generate(longer, **kwargs))


def test_a_sequence_whose_prefix_is_the_whole_context(pair):
    """A biased (or bad) sequence whose prefix is every token before the position, from the first prompt
    token on (a one-token prompt), applies there, at the first new token; one whose prefix is longer than the
    context does not (the context read from its first token on, repeated before it, would match it). The
    output is transformers' where it applies such a sequence (5.2x); 5.17 waits for a context as long as the
    whole sequence (docs/usage.md), so there the first new token alone is checked."""
    target, _ = pair
    ids = torch.tensor([[17], [30]])
    kwargs = dict(max_new_tokens=6, pad_token_id=0)
    plain = target.generate(ids, **kwargs)
    first = plain[:, 1].tolist()
    for options, applies in (
        ({"bad_words_ids": [[17, first[0]]]}, True),
        # beside a longer one: the table is two tokens wide, its column before the first token any token
        ({"sequence_bias": {(30, first[1]): -20.0, (17, 30, 3): 1.0}}, True),
        ({"bad_words_ids": [[17, 17, first[0]]]}, False),
    ):
        out = _engine(pair).generate(ids, **kwargs, **options)
        assert torch.equal(out[:, 1], plain[:, 1]) != applies, options
        expected = target.generate(ids, **kwargs, **options)
        if not applies or not torch.equal(expected[:, 1], plain[:, 1]):  # transformers applies it too
            assert torch.equal(out, expected), options


def test_half_precision_logits_are_processed_in_fp32():
    """A half-precision target's logits are processed in fp32, as transformers processes its scores (upcast
    first): the result is fp32 and bit for bit that of the upcast logits (a penalty's quotient is not rounded
    to bf16)."""
    from omnidraft_fast.config import SamplingParams
    from omnidraft_fast.processing import Processing
    from omnidraft_fast.processors import Processors

    generator = torch.Generator().manual_seed(0)
    batch, prompt, n = 2, 5, 3
    tokens = torch.zeros(batch, 1 + prompt + 8, dtype=torch.int64)  # slot 0: the dummy
    tokens[:, 1 : 1 + prompt] = torch.randint(0, VOCAB, (batch, prompt), generator=generator)
    processors = Processors(
        Processing(repetition_penalty=1.3, encoder_repetition_penalty=0.7),
        sampling=SamplingParams(),
        eos_ids=torch.tensor([2]),
        tokens=tokens,
        start=torch.ones(batch, dtype=torch.int64),
        prompt=prompt,
        vocab=VOCAB,
        max_new_tokens=8,
    )
    logits = (4 * torch.randn(batch, n, VOCAB, generator=generator)).bfloat16()
    proposal = torch.randint(0, VOCAB, (batch, n - 1), generator=generator)
    generated, active = torch.zeros(batch, dtype=torch.int64), torch.ones(batch, dtype=torch.bool)
    out = processors(logits, proposal, generated, active)
    assert out.dtype == torch.float32
    assert torch.equal(out, processors(logits.float(), proposal, generated, active))


def test_forced_tokens_all_suppressed_refused(pair):
    """Forcing only suppressed tokens leaves no token at the forcing step: refused before any work, naming
    both options (as transformers' GenerationConfig.validate() refuses it); a partial overlap runs."""
    engine = _engine(pair)
    ids = torch.tensor([[17], [30]])
    for forced, suppressed in (
        ({"forced_bos_token_id": 5}, [5, 6]),
        ({"forced_eos_token_id": [2, 9]}, [9, 2]),
        ({"forced_eos_token_id": 2}, [2]),
    ):
        name = next(iter(forced))
        with pytest.raises(ValueError, match=rf"every token of `{name}` .* is also in `suppress_tokens`"):
            engine.generate(ids, max_new_tokens=4, pad_token_id=0, suppress_tokens=suppressed, **forced)
    kwargs = dict(max_new_tokens=4, pad_token_id=0, forced_eos_token_id=[2, 9], suppress_tokens=[9])
    out = engine.generate(ids, **kwargs)  # the engine is still usable, and the overlap-free token is forced
    assert torch.equal(out, pair[0].generate(ids, **kwargs))
    assert (out[:, -1] == 2).all()


def test_nothing_to_suppress_suppresses_nothing(pair):
    """``suppress_tokens=[]`` and ``begin_suppress_tokens=[]`` are no-ops in transformers, and here."""
    target, _ = pair
    engine = _engine(pair)
    ids, mask = left_padded_prompts(VOCAB, [6, 4], seed=3)
    kwargs = dict(
        attention_mask=mask, max_new_tokens=4, pad_token_id=0, suppress_tokens=[], begin_suppress_tokens=[]
    )
    assert torch.equal(engine.generate(ids, **kwargs), target.generate(ids, **kwargs))


def test_min_new_tokens_replaces_min_length(pair):
    """With min_new_tokens set, transformers replaces min_length by prompt + min_new_tokens: so does the
    engine (min_length alone would hold row 0's EOS back)."""
    target, _ = pair
    ids, mask = left_padded_prompts(VOCAB, [6, 4, 9], seed=3)
    plain = target.generate(ids, attention_mask=mask, max_new_tokens=3, eos_token_id=None, pad_token_id=0)
    # EOS: a row's second new token (its first another): min_length 17 holds it back, min_new_tokens 1 not
    eos = next(int(row[-2]) for row in plain if row[-3] != row[-2])
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0, min_length=17)
    expected = target.generate(ids, min_new_tokens=1, **kwargs)
    assert not torch.equal(expected, target.generate(ids, **kwargs))
    assert torch.equal(_engine(pair).generate(ids, min_new_tokens=1, **kwargs), expected)


def test_the_minimum_holds_back_an_early_eos(pair):
    """A row whose greedy continuation emits EOS early runs to min_new_tokens first (EOS masked before)."""
    target, _ = pair
    ids = torch.tensor([[5, 9, 13]])
    for eos in range(3, VOCAB):
        out = target.generate(ids, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
        if out.shape[1] - ids.shape[1] < 6:
            break
    else:
        pytest.skip("no token ends this greedy continuation within 6 tokens")
    engine = _engine(pair)
    out = engine.generate(ids, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0, min_new_tokens=8)
    assert out.shape[1] - ids.shape[1] >= 8 and eos not in out[0, ids.shape[1] : ids.shape[1] + 7].tolist()
    assert torch.equal(out, target.generate(ids, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0,
                                            min_new_tokens=8))  # fmt: skip


def _assert_outputs_as_transformers(out, expected, prompt: int, names=("scores",), eos: int = 2):
    """``out`` (the engine's generate output dict) holds transformers' sequences, and its per-step
    ``names`` (scores, logits) are transformers' on every row until it has emitted ``eos``."""
    assert torch.equal(out.sequences, expected.sequences)
    assert all(len(getattr(out, name)) == len(getattr(expected, name)) for name in names)
    done = torch.zeros(expected.sequences.shape[0], dtype=torch.bool)
    for step in range(len(expected.scores)):
        for name in names:
            ours, theirs = getattr(out, name)[step], getattr(expected, name)[step]
            torch.testing.assert_close(ours[~done], theirs[~done], atol=1e-4, rtol=1e-4)
        done |= expected.sequences[:, prompt + step] == eos


def test_scores_are_transformers_processed_scores(pair):
    target, _ = pair
    ids = torch.tensor([[5, 9, 13, 5], [7, 7, 1, 20]])
    kwargs = dict(max_new_tokens=NEW, eos_token_id=2, pad_token_id=0, repetition_penalty=1.4, min_new_tokens=6,
                  return_dict_in_generate=True, output_scores=True, output_logits=True)  # fmt: skip
    expected = target.generate(ids, do_sample=False, **kwargs)
    out = _engine(pair).generate(ids, **kwargs)
    _assert_outputs_as_transformers(out, expected, ids.shape[1], names=("scores", "logits"))
    assert all(
        (score[:, 2] == -math.inf).all() for score in out.scores[:6]
    )  # EOS held back by min_new_tokens


def test_prompt_options_scores_are_transformers_processed_scores(pair):
    """encoder_repetition_penalty and encoder_no_repeat_ngram_size read the prompt as given and nothing else:
    scores equal transformers' on prompts without padding (the dummy slot before a prompt, id 0, is none of
    its tokens) and on a prompt narrower than the n-gram (it has no n-gram to continue, even where the new
    tokens repeat its own)."""
    target, _ = pair
    cases = (
        (torch.tensor([[5, 9, 13, 5], [7, 7, 1, 20]]), {"encoder_repetition_penalty": 2.5}),
        (torch.tensor([[0, 0], [0, 5]]), {"encoder_no_repeat_ngram_size": 3}),
    )
    for ids, options in cases:
        kwargs = dict(max_new_tokens=NEW, eos_token_id=2, pad_token_id=1, return_dict_in_generate=True,
                      output_scores=True, **options)  # fmt: skip
        expected = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, **kwargs)
        out = _engine(pair).generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        _assert_outputs_as_transformers(out, expected, ids.shape[1])


def test_an_eos_id_past_the_vocabulary(pair):
    """An EOS id with no logit (a tokenizer's token past the model's vocabulary) is left out of the minimum's
    EOS mask, as transformers leaves it: the output is transformers'."""
    target, _ = pair
    ids, mask = left_padded_prompts(VOCAB, [6, 4, 9], seed=3)
    eos = int(target.generate(ids, attention_mask=mask, max_new_tokens=3, pad_token_id=0)[0, -1])
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW, eos_token_id=[eos, VOCAB], pad_token_id=0)
    expected = target.generate(ids, min_new_tokens=9, **kwargs)
    assert not torch.equal(expected, target.generate(ids, **kwargs))  # the minimum held an EOS back
    assert torch.equal(_engine(pair).generate(ids, min_new_tokens=9, **kwargs), expected)


def test_finished_rows_are_not_processed(pair):
    """The caller's Python runs at the positions of rows still generating: a row that committed its EOS is not
    called again (transformers goes on calling it, its EOS then padding). A ``prefix_allowed_tokens_fn`` that
    allows nothing after an EOS (refused at a committed context) serves the request here, with transformers'
    output for one that allows everything there."""
    target, _ = pair
    ids, mask = left_padded_prompts(VOCAB, [6, 4, 9], seed=3)
    width = ids.shape[1]
    eos = int(target.generate(ids, attention_mask=mask, max_new_tokens=3, pad_token_id=0)[0, -1])

    def allowed(after_eos: list[int]):
        return lambda batch_id, sent: after_eos if eos in sent[width:].tolist() else list(range(VOCAB))

    kwargs = dict(attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
    expected = target.generate(ids, prefix_allowed_tokens_fn=allowed(list(range(VOCAB))), **kwargs)
    new = expected[:, width:]
    assert (new[0, :-2] == eos).any() and not (new[1:] == eos).any()  # row 0 ends rounds before the others
    out = _engine(pair).generate(ids, prefix_allowed_tokens_fn=allowed([]), **kwargs)
    assert torch.equal(out, expected)


ROWS = 8000


def test_sampled_law_is_the_processed_targets(pair):
    """The first two sampled tokens (T=0.6) follow the target's law after the repetition penalty (the second
    with the first in its context; 0.3 rewards repeats, which moves this law far) and min_new_tokens (no
    EOS), whatever the drafter: total variation within the bound of tests/test_lossless_sampling.py (delta
    1e-6), and the unprocessed law outside it."""
    target, _ = pair
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(0.3)])

    @torch.no_grad()
    def law(context: torch.Tensor, processed: bool) -> torch.Tensor:  # [n, V] next-token law per context
        logits = target(context).logits[:, -1].float()
        if processed:
            logits = processors(context, logits)
            logits[:, 2] = -math.inf  # min_new_tokens=4: EOS masked at both positions
        return (logits / 0.6).softmax(-1)

    def joint(processed: bool) -> torch.Tensor:
        first = law(prompt, processed)[0]
        continued = torch.cat([prompt.expand(VOCAB, -1), torch.arange(VOCAB)[:, None]], 1)
        return (first[:, None] * law(continued, processed)).flatten().double()

    torch.manual_seed(0)
    out = _engine(pair).generate(
        prompt.expand(ROWS, -1), max_new_tokens=2, do_sample=True, temperature=0.6, top_k=0,
        repetition_penalty=0.3, min_new_tokens=4, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    new = out[:, prompt.shape[1] :]
    empirical = torch.bincount(new[:, 0] * VOCAB + new[:, 1], minlength=VOCAB * VOCAB).double() / ROWS
    exact = joint(True)
    bound = 0.5 * torch.sqrt(exact * (1 - exact) / ROWS).sum().item() + math.sqrt(math.log(1e6) / (2 * ROWS))
    assert 0.5 * (empirical - exact).abs().sum().item() < bound
    assert 0.5 * (joint(False) - exact).abs().sum().item() > 2 * bound  # the processing matters here


def _transformers_warpers(temperature: float, top_k: int, top_p: float = 1.0, **extra) -> LogitsProcessorList:
    """transformers' sampling warpers, in its order, built here independently of the engine's code."""
    from transformers.generation import logits_process as lp

    chain = [lp.TemperatureLogitsWarper(temperature)]
    if "top_h" in extra:  # after temperature, before top-k
        chain.append(lp.TopHLogitsWarper(extra["top_h"]))
    chain.append(lp.TopKLogitsWarper(top_k))
    if top_p < 1:
        chain.append(lp.TopPLogitsWarper(top_p))
    for name, warper in (("min_p", lp.MinPLogitsWarper), ("typical_p", lp.TypicalLogitsWarper),
                         ("epsilon_cutoff", lp.EpsilonLogitsWarper), ("eta_cutoff", lp.EtaLogitsWarper)):  # fmt: skip
        if name in extra:
            chain.append(warper(extra[name]))
    return LogitsProcessorList(chain)


WARPERS = [
    {"min_p": 0.2},
    {"min_p": 0.3, "top_p": 0.8},  # top-p first, then min-p on the renormalised law (the order matters here)
    {"typical_p": 0.5},
    {"epsilon_cutoff": 0.06, "top_p": 0.9},
    {"eta_cutoff": 0.2},
    pytest.param(
        {"top_h": 0.4},  # after temperature, before top-k
        marks=pytest.mark.skipif(not hasattr(logits_process, "TopHLogitsWarper"), reason="no top_h here"),
    ),
]


@pytest.mark.parametrize("warpers", WARPERS)
def test_sampling_warpers_follow_transformers_law(pair, warpers):
    """The warpers transformers applies after top-p (min_p, typical_p, epsilon_cutoff, eta_cutoff; at T=0.8,
    top-k 12): the first token's law is transformers' within the total-variation bound, and far from the law
    without them; nothing they remove is drawn; greedy ignores them, as transformers does. The copies come
    from num_return_sequences."""
    target, _ = pair
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        logits = target(prompt).logits[:, -1].float()
    top_p = warpers.get("top_p", 1.0)
    extra = {name: value for name, value in warpers.items() if name != "top_p"}
    exact = _transformers_warpers(0.8, 12, top_p, **extra)(prompt, logits).softmax(-1)[0].double()
    unwarped = _transformers_warpers(0.8, 12, top_p)(prompt, logits).softmax(-1)[0].double()
    engine = _engine(pair)
    torch.manual_seed(0)
    out = engine.generate(prompt, max_new_tokens=1, do_sample=True, temperature=0.8, top_k=12, eos_token_id=2,
                          pad_token_id=0, num_return_sequences=ROWS, **warpers)  # fmt: skip
    assert out.shape == (ROWS, prompt.shape[1] + 1)
    empirical = torch.bincount(out[:, -1], minlength=VOCAB).double() / ROWS
    bound = 0.5 * torch.sqrt(exact * (1 - exact) / ROWS).sum().item() + math.sqrt(math.log(1e6) / (2 * ROWS))
    assert 0.5 * (empirical - exact).abs().sum().item() < bound
    assert 0.5 * (unwarped - exact).abs().sum().item() > 2 * bound
    assert (empirical[exact == 0] == 0).all()  # nothing the warpers remove is ever drawn
    ids = torch.tensor([[5, 9, 13, 5]])
    greedy = target.generate(ids, max_new_tokens=NEW, eos_token_id=2, pad_token_id=0)
    assert torch.equal(
        engine.generate(ids, max_new_tokens=NEW, eos_token_id=2, pad_token_id=0, **warpers), greedy
    )


@pytest.mark.parametrize("warpers", WARPERS)
def test_warped_rounds_capture(pair, warpers):
    """Every warper runs without a host read: captured rounds give the eager rounds' output."""
    prompt = torch.tensor([[3, 1, 4, 1, 5], [7, 7, 1, 20, 9]])
    outputs = []
    for cuda_graphs in (False, True):
        torch.manual_seed(3)
        engine = _engine(pair, cuda_graphs=cuda_graphs)
        outputs.append(engine.generate(prompt, max_new_tokens=10, do_sample=True, temperature=0.9, **warpers))
    assert torch.equal(outputs[0], outputs[1])


def test_top_h_warper_is_transformers():
    """processors.TopHWarper (no host read) computes what transformers' TopHLogitsWarper does."""
    from transformers.generation import logits_process

    from omnidraft_fast.warpers import TopHWarper

    if not hasattr(logits_process, "TopHLogitsWarper"):
        pytest.skip("this transformers has no TopHLogitsWarper (top_h came later)")
    generator = torch.Generator().manual_seed(1)
    scores = torch.randn(5, 160, generator=generator) * torch.tensor([0.3, 1, 2, 5, 12])[:, None]
    scores[1, :150] = -torch.inf  # fewer than 100 tokens left
    for top_h in (0.1, 0.5, 0.9, 1.0):
        expected = logits_process.TopHLogitsWarper(top_h)(None, scores)
        assert torch.equal(TopHWarper(top_h)(None, scores), expected)
    assert (expected > -torch.inf).sum() < 5 * 100  # it removed tokens


def test_eta_warper_is_transformers():
    """processors.EtaWarper (no host read) computes what transformers' EtaLogitsWarper does."""
    from transformers.generation.logits_process import EtaLogitsWarper

    from omnidraft_fast.warpers import EtaWarper

    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 50, generator=generator) * torch.tensor([0.5, 1, 2, 4, 8, 16])[:, None]
    scores[1, :20] = -torch.inf
    scores[2, 1:] = -torch.inf  # one token left
    for epsilon in (1e-4, 0.02, 0.3):
        expected = EtaLogitsWarper(epsilon)(None, scores)
        assert torch.equal(EtaWarper(epsilon, scores.device)(None, scores), expected)
    assert (expected == -torch.inf).sum() > 20  # it removed tokens


def test_warped_second_token_and_scores(pair):
    """The warped law holds at a drafted position too (the second token, its context including the first;
    min-p after top-p, then typical), and the returned scores are transformers' processed and warped scores
    of the tokens produced (recomputed by teacher forcing)."""
    target, _ = pair
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    warp = _transformers_warpers(0.7, 20, 0.95, min_p=0.05, typical_p=0.9)

    @torch.no_grad()
    def law(context: torch.Tensor) -> torch.Tensor:
        return warp(context, target(context).logits[:, -1].float()).softmax(-1)

    first = law(prompt)[0]
    continued = torch.cat([prompt.expand(VOCAB, -1), torch.arange(VOCAB)[:, None]], 1)
    exact = (first[:, None] * law(continued)).flatten().double()
    options = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.95, min_p=0.05, typical_p=0.9,
                   eos_token_id=2, pad_token_id=0)  # fmt: skip
    torch.manual_seed(1)
    out = _engine(pair).generate(prompt, max_new_tokens=2, num_return_sequences=ROWS, **options)
    new = out[:, prompt.shape[1] :]
    empirical = torch.bincount(new[:, 0] * VOCAB + new[:, 1], minlength=VOCAB * VOCAB).double() / ROWS
    bound = 0.5 * torch.sqrt(exact * (1 - exact) / ROWS).sum().item() + math.sqrt(math.log(1e6) / (2 * ROWS))
    assert 0.5 * (empirical - exact).abs().sum().item() < bound

    torch.manual_seed(2)  # 8 rows of 12 tokens: 2 of them end early (EOS), so scores past an end are seen
    result = _engine(pair).generate(prompt.expand(8, -1), max_new_tokens=12, return_dict_in_generate=True,
                                    output_scores=True, renormalize_logits=True, **options)  # fmt: skip
    torch.manual_seed(2)  # the warped round captures as it runs eagerly
    replayed = _engine(pair, cuda_graphs=True).generate(prompt.expand(8, -1), max_new_tokens=12, **options)
    assert torch.equal(replayed, result.sequences)
    produced = result.sequences[:, prompt.shape[1] :]
    ended = 0
    for step, score in enumerate(result.scores):
        context = result.sequences[:, : prompt.shape[1] + step]
        with torch.no_grad():
            expected = warp(context, target(context).logits[:, -1].float()).log_softmax(-1)
        # NaN past a row's end: after its EOS (the pad id 0 is a token the rows may sample too)
        live = ~(produced[:, :step] == 2).any(1)
        assert live[0] or step > 0
        torch.testing.assert_close(score[live], expected[live], atol=1e-4, rtol=1e-4)
        assert score[~live].isnan().all()
        ended += int((~live).sum())
    assert ended > 0  # some row's scores were read past its end


def test_warpers_checked(pair):
    engine = _engine(pair)
    ids = torch.tensor([[5, 9, 13, 5]])
    for option, value, match in (
        ("min_p", 1.5, r"`min_p` must be in \[0, 1\] \(0: off\), got 1.5"),
        ("typical_p", 0.0, r"`typical_p` must be in \(0, 1\] \(1: off\), got 0.0"),
        ("epsilon_cutoff", 1.0, r"`epsilon_cutoff` must be in \[0, 1\) \(0: off\), got 1.0"),
        ("eta_cutoff", -0.1, r"`eta_cutoff` must be in \[0, 1\)"),
        ("top_h", 1.5, r"`top_h` must be in \(0, 1\] \(unset: off\), got 1.5"),
        # transformers' top-h warper refuses 0 (5.17 to 5.25); greedy builds no warper and takes it
        ("top_h", 0, r"`top_h` must be in \(0, 1\] when sampling, got 0"),
    ):
        with pytest.raises(ValueError, match=match):
            engine.generate(ids, max_new_tokens=4, do_sample=True, **{option: value})
    assert engine.generate(ids, max_new_tokens=4, top_h=0).shape == (1, 8)


@pytest.mark.parametrize("do_sample", [False, True])
def test_cascades_process_the_drafters_logits_too(do_sample):
    """Where a cascade's rule keeps a draft, the token comes from the drafter's law: with one vocabulary the
    request's processing applies to the drafter's logits as to the target's, so what it forbids never comes
    out. (With the drafter's law unprocessed, greedy chow at alpha 1 emitted suppressed tokens and, sampled,
    23-50% of rows held one; since b69f249 such requests were refused.)"""
    target = tiny_model("llama", VOCAB, seed=31)
    drafter = perturbed_copy(target, 0.3, seed=32)
    engine = SpeculativeEngine(target, drafter)
    rows, new = 64, 12
    ids, cascade = torch.tensor([[3, 4, 5, 6]]).expand(rows, -1), CascadeConfig("chow", 1.0)
    torch.manual_seed(0)
    plain = engine.generate(ids, max_new_tokens=new, do_sample=do_sample, cascade=cascade)[:, 4:]
    often = torch.bincount(plain.flatten(), minlength=VOCAB).argsort(descending=True)[:3].tolist()
    eos = often[2]  # emitted early without a minimum length
    for options, forbidden in (
        ({"suppress_tokens": often[:2]}, lambda out: torch.isin(out, torch.tensor(often[:2]))),
        ({"bad_words_ids": [[often[0]]], "repetition_penalty": 1.3}, lambda out: out == often[0]),
        ({"min_new_tokens": new - 1, "eos_token_id": eos}, lambda out: out[:, : new - 1] == eos),
    ):
        assert forbidden(plain).any(), options  # the case can fail: the unprocessed cascade emits them
        torch.manual_seed(0)
        out = engine.generate(ids, max_new_tokens=new, do_sample=do_sample, cascade=cascade, **options)
        assert not forbidden(out[:, 4:]).any(), options


class _NoSuccessor(LogitsProcessor):
    """A caller's processor that reads the context: the token after the last one (id + 1) is banned."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        banned = (input_ids[:, -1:] + 1) % scores.shape[-1]
        return scores.scatter(1, banned, -torch.inf)


def test_processed_drafts_follow_the_processed_target():
    """A drafter equal to the target, both processed alike: every draft is accepted, greedy and sampled (with
    the drafter's logits unprocessed, a repetition penalty or a banned n-gram rejected drafts)."""
    target = tiny_model("llama", VOCAB, seed=33)
    engine = SpeculativeEngine(target, target, config=EngineConfig(num_draft_tokens=4))
    ids = torch.tensor([[3, 4, 5, 6, 3, 4]]).expand(8, -1)
    for options in (
        {"repetition_penalty": 2.0},
        {"no_repeat_ngram_size": 2, "suppress_tokens": [7], "sequence_bias": {(4, 5): 5.0}},
        {"do_sample": True, "top_k": 0, "repetition_penalty": 0.5, "min_p": 0.05},
        # the processors that read a draft step's position among the new tokens
        {
            "min_new_tokens": 9,
            "begin_suppress_tokens": [5, 6, 7],
            "forced_eos_token_id": 2,
            "eos_token_id": 2,
        },
        {"exponential_decay_length_penalty": (3, 1.5), "eos_token_id": 2, "do_sample": True, "top_k": 0},
        {"logits_processor": [_NoSuccessor()], "prefix_allowed_tokens_fn": lambda row, context: [9, 10, 11]},
    ):
        out = engine.generate(ids, max_new_tokens=16, return_dict_in_generate=True, **options)
        assert out.stats.acceptance_rate == 1.0, (options, out.stats.summary())


def test_callers_logits_processor_and_prefix_fn_as_transformers(pair):
    """The caller's ``logits_processor`` list and ``prefix_allowed_tokens_fn`` (both reading the context at
    each drafted position; the list after the built-in processors, the function among them): greedy output
    is transformers'. A captured engine refuses them and stays usable."""
    target, _ = pair
    ids, mask = left_padded_prompts(VOCAB, [6, 4, 9], seed=3)

    def allowed(batch_id: int, sent: torch.Tensor) -> list[int]:  # a third of the vocabulary, by context
        return [t for t in range(VOCAB) if (t + int(sent[-1]) + batch_id) % 3 != 0]

    kwargs = dict(
        attention_mask=mask, max_new_tokens=NEW, eos_token_id=2, pad_token_id=0, repetition_penalty=1.2
    )
    plain = target.generate(ids, **kwargs)
    engine = _engine(pair)
    for extra in (
        {"logits_processor": LogitsProcessorList([_NoSuccessor(), NoRepeatNGramLogitsProcessor(2)])},
        {"prefix_allowed_tokens_fn": allowed},
    ):
        expected = target.generate(ids, **kwargs, **extra)
        assert not torch.equal(expected, plain)
        assert torch.equal(engine.generate(ids, **kwargs, **extra), expected)
    captured = _engine(pair, cuda_graphs=True)
    with pytest.raises(ValueError, match=r"run Python at every drafted position.*cuda_graphs=False"):
        captured.generate(ids, **kwargs, logits_processor=[_NoSuccessor()])
    assert torch.equal(captured.generate(ids, **kwargs), plain)
    with pytest.raises(TypeError, match=r"`logits_processor` must be a list"):
        engine.generate(ids, **kwargs, logits_processor=_NoSuccessor())
    with pytest.raises(
        ValueError, match=r"`prefix_allowed_tokens_fn` returned no allowed token for batch ID 0"
    ):
        engine.generate(ids, **kwargs, prefix_allowed_tokens_fn=lambda batch_id, sent: [])
    assert torch.equal(engine.generate(ids, **kwargs), plain)


def test_callers_processor_leaves_the_raw_logits(pair):
    """The caller's processor alone (the first step of the processing) works on a copy: the logits a request
    returns are the target's raw ones and its scores the processed ones, each transformers'."""
    target, _ = pair
    ids, mask = left_padded_prompts(VOCAB, [6, 4, 9], seed=3)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, eos_token_id=2, pad_token_id=0, do_sample=False,
                  logits_processor=LogitsProcessorList([_NoSuccessor()]), return_dict_in_generate=True,
                  output_scores=True, output_logits=True)  # fmt: skip
    expected = target.generate(ids, **kwargs)
    out = _engine(pair).generate(ids, **kwargs)
    _assert_outputs_as_transformers(out, expected, ids.shape[1], names=("logits", "scores"))


def test_callers_processor_takes_the_place_of_its_class(pair):
    """A caller's processor of a class that the request's options make too takes that one's place, as
    transformers' generate() merges the lists (the caller's "takes precedence"; a repeated object runs
    once): scores and greedy output are transformers'. Before, both ran (a penalty applied twice)."""
    from transformers.generation.logits_process import (
        InfNanRemoveLogitsProcessor,
        MinLengthLogitsProcessor,
        MinNewTokensLengthLogitsProcessor,
        SequenceBiasLogitsProcessor,
        SuppressTokensLogitsProcessor,
    )

    target, _ = pair
    ids, mask = left_padded_prompts(VOCAB, [6, 4, 9], seed=3)
    eos = torch.tensor([2])
    penalty = RepetitionPenaltyLogitsProcessor(2.5)
    cases = (
        ({"repetition_penalty": 1.2}, [penalty]),
        (
            {"repetition_penalty": 0.8, "suppress_tokens": [5, 6]},
            [SuppressTokensLogitsProcessor([7]), penalty],
        ),
        ({"min_new_tokens": 4}, [MinLengthLogitsProcessor(ids.shape[1] + 6, eos)]),  # min_new_tokens stays
        # a weaker minimum in min_length's slot: min_new_tokens' own processor still holds EOS back to 6
        ({"min_new_tokens": 6}, [MinLengthLogitsProcessor(ids.shape[1] + 2, eos)]),
        # both slots the caller's: its 3 new tokens hold, not the request's 6
        (
            {"min_new_tokens": 6},
            [
                MinLengthLogitsProcessor(ids.shape[1] + 1, eos),
                MinNewTokensLengthLogitsProcessor(ids.shape[1], 3, eos),
            ],
        ),
        ({"sequence_bias": {(9,): 4.0}}, [penalty, SequenceBiasLogitsProcessor({(9,): -4.0}), penalty]),
        (
            {"remove_invalid_values": True, "repetition_penalty": 1.3},
            [InfNanRemoveLogitsProcessor(), penalty],
        ),
    )
    engine = _engine(pair)
    for options, processors in cases:
        kwargs = dict(attention_mask=mask, max_new_tokens=NEW, eos_token_id=2, pad_token_id=0, do_sample=False,
                      return_dict_in_generate=True, output_scores=True, **options)  # fmt: skip
        expected = target.generate(ids, logits_processor=LogitsProcessorList(processors), **kwargs)
        with pytest.warns(UserWarning, match=r"`logits_processor` holds a \w+, which `\w+` makes too"):
            out = engine.generate(ids, logits_processor=LogitsProcessorList(processors), **kwargs)
        _assert_outputs_as_transformers(out, expected, ids.shape[1])


def test_prefix_fn_batch_ids_with_copies(pair):
    """With num_return_sequences, the batch ID is what the installed transformers passes: the prompt's for
    each of its copies (5.2x), or each copy's row (5.17); the function sees the row's padded sequence."""
    from omnidraft_fast.processors import _prefix_batch_is_the_prompt

    per_prompt = _prefix_batch_is_the_prompt()
    ids, mask = left_padded_prompts(VOCAB, [5, 3], seed=8)
    seen = []

    def allowed(batch_id: int, sent: torch.Tensor) -> list[int]:
        assert torch.equal(sent[: ids.shape[1]], ids[batch_id if per_prompt else batch_id // 3])
        seen.append(batch_id)
        return list(range(batch_id % 2, VOCAB, 2))  # even batch IDs: even ids, odd ones: odd ids

    out = _engine(pair).generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, pad_token_id=1,
                                 num_return_sequences=3, prefix_allowed_tokens_fn=allowed)  # fmt: skip
    for row, tokens in enumerate(out[:, ids.shape[1] :].tolist()):
        tokens = tokens[: tokens.index(2) + 1] if 2 in tokens else tokens  # through EOS (2), then padding
        assert all(t % 2 == (row // 3 if per_prompt else row) % 2 for t in tokens), (row, tokens)
    assert set(seen) == ({0, 1} if per_prompt else set(range(6)))


def test_prefix_fn_tokens_banned_by_earlier_processors(pair):
    """Where bad_words_ids or min_new_tokens banned every token the function allows, the installed
    transformers forces them (5.2x: greedy output is transformers') or leaves the row -inf (5.17), which the
    engine refuses rather than emit what an all -inf row gives."""
    from omnidraft_fast.processors import _prefix_forces_banned_tokens

    target, _ = pair
    ids, mask = left_padded_prompts(VOCAB, [5, 3, 7], seed=1)

    def allowed(batch_id: int, sent: torch.Tensor) -> list[int]:  # after 3 new tokens, token 10 only
        return [10] if sent.shape[-1] >= ids.shape[1] + 3 else list(range(VOCAB))

    engine = _engine(pair)
    for extra in ({"bad_words_ids": [[10]]}, {"eos_token_id": 10, "min_new_tokens": 6}):
        kwargs = dict(attention_mask=mask, max_new_tokens=6, pad_token_id=0, prefix_allowed_tokens_fn=allowed)
        if _prefix_forces_banned_tokens():
            expected = target.generate(ids, do_sample=False, **kwargs, **extra)
            assert (expected[:, ids.shape[1] + 3] == 10).all()
            assert torch.equal(engine.generate(ids, **kwargs, **extra), expected)
        else:
            with pytest.raises(ValueError, match="all -inf"):
                engine.generate(ids, **kwargs, **extra)


def test_watermarking_as_transformers(pair):
    """Green-list watermarking (``WatermarkingConfig``) after every other processor and warper: greedy
    output is transformers', the first sampled token follows transformers' law (its warpers, then the
    watermark); SynthID's per-step state is refused, and so is a captured engine."""
    from transformers.generation import SynthIDTextWatermarkingConfig, WatermarkingConfig

    target, _ = pair
    watermark = WatermarkingConfig(bias=4.0, greenlist_ratio=0.3)
    ids, mask = left_padded_prompts(VOCAB, [6, 4, 9], seed=3)
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW, eos_token_id=2, pad_token_id=0)
    expected = target.generate(ids, watermarking_config=watermark, **kwargs)
    assert not torch.equal(expected, target.generate(ids, **kwargs))
    engine = _engine(pair)
    assert torch.equal(engine.generate(ids, watermarking_config=watermark, **kwargs), expected)

    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        logits = target(prompt).logits[:, -1].float()
    processor = watermark.construct_processor(VOCAB, "cpu")
    warped = _transformers_warpers(0.8, 12)(prompt, logits)
    exact = processor(prompt, warped).softmax(-1)[0].double()
    torch.manual_seed(0)
    out = engine.generate(prompt, max_new_tokens=1, do_sample=True, temperature=0.8, top_k=12, eos_token_id=2,
                          pad_token_id=0, num_return_sequences=ROWS, watermarking_config=watermark)  # fmt: skip
    empirical = torch.bincount(out[:, -1], minlength=VOCAB).double() / ROWS
    bound = 0.5 * torch.sqrt(exact * (1 - exact) / ROWS).sum().item() + math.sqrt(math.log(1e6) / (2 * ROWS))
    assert 0.5 * (empirical - exact).abs().sum().item() < bound
    assert 0.5 * (warped.softmax(-1)[0].double() - exact).abs().sum().item() > 2 * bound

    with pytest.raises(ValueError, match=r"`watermarking_config` must be a transformers WatermarkingConfig"):
        engine.generate(
            prompt,
            max_new_tokens=4,
            watermarking_config=SynthIDTextWatermarkingConfig(keys=[1, 2], ngram_len=2),
        )
    # as a dict: transformers 5.25 reads one with `ngram_len` as SynthID's config (5.24 fails on its keys)
    with pytest.raises(ValueError, match=r"`watermarking_config` .* holds `ngram_len`, .* SynthID"):
        engine.generate(prompt, max_new_tokens=4, watermarking_config={"keys": [1, 2], "ngram_len": 2})
    with pytest.raises(ValueError, match=r"`watermarking_config` .* is not a WatermarkingConfig's fields"):
        engine.generate(prompt, max_new_tokens=4, watermarking_config={"bias": 2.0, "greenlist": 0.3})
    with pytest.raises(
        ValueError, match=r"`watermarking_config` .* `context_width` should be a positive integer"
    ):
        engine.generate(prompt, max_new_tokens=4, watermarking_config=WatermarkingConfig(context_width=0))
    with pytest.raises(ValueError, match=r"`watermarking_config` run Python at every drafted position"):
        _engine(pair, cuda_graphs=True).generate(prompt, max_new_tokens=4, watermarking_config=watermark)


@pytest.mark.parametrize("draft", [2, 3, 5])
def test_no_token_left_where_no_token_is_emitted(draft):
    """A drafted context can leave a position no allowed token (no_repeat_ngram_size=1 on 8 ids, 5 of them in
    the prompt) where the row never emits: past its last new token, or after a rejection. Transformers
    never computes such a position, so the request is served, and every row keeps the rule."""
    target = tiny_model("llama", 8, seed=3)
    drafter = tiny_model("gpt2", 8, seed=5, layers=1)
    prompt = torch.tensor([[1, 2, 3, 4, 5, 3]]).expand(64, -1)  # 0, 6 and 7 left: three, then two, then one
    engine = SpeculativeEngine(target, drafter, config=EngineConfig(num_draft_tokens=draft))
    torch.manual_seed(1)
    out = engine.generate(prompt, max_new_tokens=2, do_sample=True, top_k=0, no_repeat_ngram_size=1)
    new = out[:, prompt.shape[1] :]
    assert new.shape == (64, 2) and torch.isin(new, torch.tensor([0, 6, 7])).all()
    assert (new[:, 0] != new[:, 1]).all()


def test_a_grammar_with_dead_states():
    """A ``prefix_allowed_tokens_fn`` that allows nothing once a context broke its grammar (a dead state, as
    grammar engines return): only drafted contexts reach one, transformers' generate never does, so the
    request is served; greedy output is transformers', sampled output keeps the grammar. A dead state at a
    committed context is refused as transformers refuses it."""
    prompt_length = 6

    def grammar(batch_id, input_ids):  # new tokens alternate between {1, 2} and {6, 7}
        new = input_ids[prompt_length:].tolist()
        if any(t not in ((1, 2) if i % 2 == 0 else (6, 7)) for i, t in enumerate(new)):
            return []
        return [1, 2] if len(new) % 2 == 0 else [6, 7]

    target = tiny_model("llama", 8, seed=3)
    engine = SpeculativeEngine(
        target, tiny_model("gpt2", 8, seed=5, layers=1), config=EngineConfig(num_draft_tokens=3)
    )
    prompt = torch.tensor([[1, 2, 3, 4, 5, 3]]).expand(8, -1)
    options = {"max_new_tokens": 6, "prefix_allowed_tokens_fn": grammar}
    reference = target.generate(prompt, do_sample=False, pad_token_id=0, **options)
    assert torch.equal(engine.generate(prompt, do_sample=False, **options), reference)
    torch.manual_seed(0)
    new = engine.generate(prompt, do_sample=True, top_k=0, **options)[:, prompt_length:]
    assert (
        torch.isin(new[:, 0::2], torch.tensor([1, 2])).all()
        and torch.isin(new[:, 1::2], torch.tensor([6, 7])).all()
    )
    with pytest.raises(ValueError, match="returned no allowed token for batch ID 0"):
        engine.generate(prompt, max_new_tokens=2, prefix_allowed_tokens_fn=lambda batch_id, ids: [])
    assert torch.equal(engine.generate(prompt, do_sample=False, **options), reference)


def test_drafts_into_a_dead_state_are_rejected():
    """A grammar allowing a token after which it allows nothing: the processed drafter samples it (its law is
    uniform; 42 of its rows reach the dead state in this run) and drafts on from its own logits there; the
    target, which all but never emits that token, rejects it, so the request is served within the grammar."""
    target = tiny_model("llama", 8, seed=3)
    drafter = tiny_model("gpt2", 8, seed=5, layers=1)
    with torch.no_grad():
        target.lm_head.weight[5] = 0.0  # the other logits scaled far above it: p(5) is negligible
        target.lm_head.weight[torch.arange(8) != 5] *= 40.0
        drafter.lm_head.weight.zero_()  # q uniform: 5 is drafted an eighth of the time
    engine = SpeculativeEngine(target, drafter, config=EngineConfig(num_draft_tokens=3))
    prompt = torch.tensor([[1, 2, 3, 4]]).expand(32, -1)

    def grammar(batch_id, input_ids):
        return [] if int(input_ids[-1]) == 5 else list(range(8))

    torch.manual_seed(0)
    out = engine.generate(
        prompt, max_new_tokens=8, do_sample=True, top_k=0, prefix_allowed_tokens_fn=grammar,
        return_dict_in_generate=True,
    )  # fmt: skip
    assert out.sequences.shape == (32, 12) and not (out.sequences[:, 4:] == 5).any()
    assert out.stats.proposed > out.stats.accepted > 0
