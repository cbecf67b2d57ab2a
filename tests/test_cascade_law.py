"""The engine's outputs under a speculative cascade follow SPEC §3, written out here from the models' logits.

The oracle reads no engine code: for each context it takes the two models' logits, the unfiltered ``T=1``
softmaxes ``q1``, ``p1`` (the rules' statistics: max q1, max p1, q1(v), p1(v)) and the laws actually sampled
from, ``q``, ``p`` (temperature, top-k and top-p applied to both, by transformers' own warpers; one-hot when
greedy), which the mixture, TV, acceptance ratio and residual use. A drafted position ``y ~ q`` is accepted
with ``min(1, pi(y) / q(y))``, else ``norm(max(0, pi - q))`` is emitted: it emits ``pi`` (accepted with
``min(q, pi)``, recovered with ``max(0, pi - q)``). A round whose ``k`` drafts all pass emits a bonus token
from the target's ``p`` (SPEC §3: "Bonus token: sample from p_{k+1}"). So the first two new tokens follow
``pi(a) pi(b | a)`` when ``k >= 2``, and with ``k = 1``, where the second is the bonus after an accepted
first, ``min(q, pi)(a) p(b | a) + max(0, pi - q)(a) pi(b | a)``.

The sampled comparisons use test_lossless_sampling's total-variation bound, here at a false-alarm rate of
1e-8 per test (seeds are fixed, so the tests are deterministic), and each checks that the bound separates
the law from a wrong reading of SPEC §3 (the rule's statistics at temperature ``T``, TV at ``T=1``, the
bonus from ``pi``, the target's own law), so that an engine making that mistake would fail.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import tiny_model
from test_lossless_sampling import _tv_bound, _warp
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
)

from omnidraft_fast import CascadeConfig, EngineConfig, SpeculativeEngine

VOCAB = 12
ROWS = 8000
DELTA = 1e-8
P1 = [3, 1, 4, 1, 5]
P2 = [3, 7, 7, 1, 3]  # max p1 > max q1 here, and TV at T differs from TV at T=1 across opt's threshold


@pytest.fixture(scope="module")
def engine():
    """The engine; its models as ``engine.models`` (target, drafter) for the oracle."""
    target = tiny_model("llama", VOCAB, seed=11, hidden=32)
    drafter = tiny_model("gpt2", VOCAB, seed=12, hidden=32, layers=1)
    with torch.no_grad():  # a peaked target and a drafter confident elsewhere: the rules' decisions split
        target.lm_head.weight.mul_(14.0)
        drafter.lm_head.weight.mul_(4.0)
    # prompt_bucket=8: thousands of rows prefill 8 columns, not the default 64 (outputs are the same)
    engine = SpeculativeEngine(target, drafter, config=EngineConfig(prompt_bucket=8))
    engine.models = (target, drafter)
    return engine


def _laws(model, contexts: torch.Tensor, temperature: float, top_k: int, top_p: float, process=None):
    """[n, V] float64: the T=1 softmax and the law sampled from (one-hot when greedy), at the last position,
    of the logits after ``process(contexts, logits)`` (logits processors) if given."""
    with torch.no_grad():
        logits = model(contexts).logits[:, -1].float()
    if process is not None:
        logits = process(contexts, logits)
    if temperature == 0.0:
        sampled = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1])
    else:
        sampled = _warp(logits, temperature, top_k, top_p)
    return logits.double().softmax(-1), sampled.double()


def _emitted(rule, alpha, q1, p1, q, p, wrong=None) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC §3 at one drafted position: the law of the emitted token split into its accepted part and its
    recovered (residual) part, [n, V] each. ``wrong`` names a misreading of the SPEC to compute instead."""
    if wrong == "stats_at_t":
        q1, p1 = q, p
    max_q1, max_p1 = q1.amax(-1, keepdim=True), p1.amax(-1, keepdim=True)
    tv = (q1 - p1 if wrong == "tv_at_t1" else q - p).clamp(min=0).sum(-1, keepdim=True)
    if rule == "lossy":  # CascadeConfig: accept with min(1, p / ((1 - alpha) q)), else rho
        accepted = torch.minimum(q, p / (1 - alpha))
        rho = (p - (1 - alpha) * q).clamp(min=0)  # norm(max(0, p - (1 - alpha) q))
        return accepted, (1 - accepted.sum(-1, keepdim=True)) * rho / rho.sum(-1, keepdim=True)
    if rule in ("exact", "chow", "diff", "opt"):  # mixture: pi = (1 - r) q + r p
        defer = {
            "exact": torch.ones_like(max_q1, dtype=torch.bool),
            "chow": max_q1 < 1 - alpha,
            "diff": max_q1 < max_p1 - alpha,
            "opt": max_q1 < max_p1 - alpha * tv,
        }[rule].double()
        pi = (1 - defer) * q + defer * p
    else:  # token-specific: pi(v) = q(v) [v in A] + q(V \ A) p(v)
        kept = {
            "token_v1": q1 >= max_p1 - alpha,
            "token_v2": p1 >= max_p1 - alpha,
            "token_v3": p1 >= (1 - alpha) * max_p1,
        }[rule].double()
        pi = q * kept + (q * (1 - kept)).sum(-1, keepdim=True) * p
    return torch.minimum(q, pi), (pi - q).clamp(min=0)


def _two_tokens(
    engine, rule, alpha, temperature, top_k, top_p, k, prompt, wrong=None, process=None
) -> torch.Tensor:
    """[V, V] float64: P(first new token = a, second = b) under SPEC §3 (module docstring), both models'
    logits processed by ``process`` if given."""
    first_context = torch.tensor([prompt])
    second_contexts = torch.cat([first_context.expand(VOCAB, -1), torch.arange(VOCAB)[:, None]], 1)
    sampling = (temperature, top_k, top_p)
    target, drafter = engine.models
    drafter_process = None if wrong == "drafter_unprocessed" else process
    q1, q = _laws(drafter, first_context, *sampling, drafter_process)
    p1, p = _laws(target, first_context, *sampling, process)
    q1_next, q_next = _laws(drafter, second_contexts, *sampling, drafter_process)
    p1_next, p_next = _laws(target, second_contexts, *sampling, process)
    rule = "exact" if wrong == "exact" else rule
    accepted, recovered = (x[0] for x in _emitted(rule, alpha, q1, p1, q, p, wrong))
    pi_next = sum(_emitted(rule, alpha, q1_next, p1_next, q_next, p_next, wrong))
    if k >= 2:
        return (accepted + recovered)[:, None] * pi_next
    bonus = pi_next if wrong == "bonus_from_pi" else p_next
    return accepted[:, None] * bonus + recovered[:, None] * pi_next


def _sampled_pairs(
    engine, prompts, rule, alpha, temperature, top_k, top_p, k, mask=None, **options
) -> torch.Tensor:
    torch.manual_seed(1234)
    out = engine.generate(
        prompts, attention_mask=mask, max_new_tokens=2, num_draft_tokens=k, do_sample=True,
        temperature=temperature, top_k=top_k, top_p=top_p, cascade=CascadeConfig(rule, alpha), **options,
    )  # fmt: skip
    new = out[:, prompts.shape[1] :]
    return new[:, 0] * VOCAB + new[:, 1]


def _tv(pairs: torch.Tensor, law: torch.Tensor) -> float:
    empirical = torch.bincount(pairs, minlength=VOCAB * VOCAB).double() / pairs.numel()
    return 0.5 * (empirical - law.flatten()).abs().sum().item()


# (rule, alpha, T, top_k, top_p, k, prompt, the misreading the bound must tell apart)
CASES = [
    ("chow", 0.5, 0.7, 5, 1.0, 2, P1, "stats_at_t"),
    ("chow", 0.5, 1.0, 4, 1.0, 2, P1, "stats_at_t"),  # T = 1 but filtered: the rule reads the unfiltered q1
    ("chow", 0.5, 1.3, 0, 0.8, 1, P2, "bonus_from_pi"),
    ("diff", 0.1, 0.7, 5, 1.0, 2, P2, "stats_at_t"),
    ("opt", 1.5, 0.7, 5, 1.0, 2, P2, "tv_at_t1"),
    ("opt", 0.75, 1.3, 0, 0.8, 2, P2, "tv_at_t1"),
    ("token_v1", 0.1, 1.0, 0, 1.0, 1, P1, "bonus_from_pi"),
    ("token_v1", 0.1, 0.7, 5, 1.0, 2, P2, "stats_at_t"),
    ("token_v2", 0.3, 1.3, 0, 0.8, 2, P2, "exact"),
    ("token_v3", 0.8, 0.7, 5, 1.0, 2, P2, "exact"),
    ("lossy", 0.6, 1.0, 0, 1.0, 2, P2, "exact"),
]  # fmt: skip


@pytest.mark.law
@pytest.mark.parametrize(("rule", "alpha", "temperature", "top_k", "top_p", "k", "prompt", "wrong"), CASES)
def test_two_tokens_follow_the_cascade_law(engine, rule, alpha, temperature, top_k, top_p, k, prompt, wrong):
    law = _two_tokens(engine, rule, alpha, temperature, top_k, top_p, k, prompt)
    bound = _tv_bound(law, ROWS, DELTA)
    misread = _two_tokens(engine, rule, alpha, temperature, top_k, top_p, k, prompt, wrong)
    assert 0.5 * (law - misread).abs().sum().item() > 2 * bound, "the case cannot tell the misreading apart"
    pairs = _sampled_pairs(engine, torch.tensor([prompt]).expand(ROWS, -1), rule, alpha, temperature, top_k,
                           top_p, k)  # fmt: skip
    tv = _tv(pairs, law)
    assert tv < bound, f"TV {tv:.4f} >= bound {bound:.4f}"


@pytest.mark.law
def test_padded_rows_each_follow_their_own_law(engine):
    """Two prompts of other lengths, left-padded, alternating over the batch, each with its own alpha: each
    row follows the law of its own prompt and alpha."""
    short, rows = [7, 2], ROWS // 2
    ids = torch.tensor([P1, [0, 0, 0, *short]]).repeat(rows, 1)
    mask = torch.tensor([[1] * 5, [0, 0, 0, 1, 1]]).repeat(rows, 1)
    alphas = (0.1, 1.0)
    pairs = _sampled_pairs(engine, ids, "token_v1", alphas * rows, 0.7, 5, 1.0, 2, mask=mask)
    for row, prompt in enumerate((P1, short)):
        law = _two_tokens(engine, "token_v1", alphas[row], 0.7, 5, 1.0, 2, prompt)
        bound = _tv_bound(law, rows, DELTA)
        other_alpha = _two_tokens(engine, "token_v1", alphas[1 - row], 0.7, 5, 1.0, 2, prompt)
        assert 0.5 * (law - other_alpha).abs().sum().item() > 2 * bound
        tv = _tv(pairs[row::2], law)
        assert tv < bound, f"row {row}: TV {tv:.4f} >= bound {bound:.4f}"


def _processed(
    contexts: torch.Tensor, logits: torch.Tensor, penalty: float, suppressed: list[int]
) -> torch.Tensor:
    """transformers' own processors, in its order: the repetition penalty, then the suppressed tokens."""
    logits = RepetitionPenaltyLogitsProcessor(penalty)(contexts, logits)
    return SuppressTokensLogitsProcessor(suppressed, device=logits.device)(contexts, logits)


@pytest.mark.law
@pytest.mark.parametrize(("rule", "alpha", "temperature", "top_k", "k"), [("chow", 0.5, 0.7, 5, 2),
                                                                        ("token_v1", 0.1, 1.0, 0, 1)])  # fmt: skip
def test_processed_cascades_mix_the_processed_laws(engine, rule, alpha, temperature, top_k, k):
    """With logits processors (a repetition penalty, the drafter's favourite token suppressed), both models'
    logits are processed at each position with its context: the rules read the processed T=1 softmaxes and
    the mixture, acceptance and residual the processed sampled laws. The misreading it must tell apart is
    the drafter's law left unprocessed."""
    drafter_t1, _ = _laws(engine.models[1], torch.tensor([P1]), 1.0, 0, 1.0)
    suppressed = [int(drafter_t1[0].argmax())]
    process = functools.partial(_processed, penalty=1.6, suppressed=suppressed)
    law = _two_tokens(engine, rule, alpha, temperature, top_k, 1.0, k, P1, process=process)
    bound = _tv_bound(law, ROWS, DELTA)
    misread = _two_tokens(engine, rule, alpha, temperature, top_k, 1.0, k, P1, "drafter_unprocessed", process)
    assert 0.5 * (law - misread).abs().sum().item() > 2 * bound, "the case cannot tell the misreading apart"
    pairs = _sampled_pairs(engine, torch.tensor([P1]).expand(ROWS, -1), rule, alpha, temperature, top_k, 1.0, k,
                           repetition_penalty=1.6, suppress_tokens=suppressed)  # fmt: skip
    tv = _tv(pairs, law)
    assert tv < bound, f"TV {tv:.4f} >= bound {bound:.4f}"


def _greedy(engine, rule, alpha, prompt, new, k, wrong=None) -> list[int]:
    """SPEC §3 greedy, round by round (k drafts, then the bonus): q and p one-hot, the rules on q1 and p1."""
    target, drafter = engine.models
    tokens, out = list(prompt), []
    while len(out) < new:
        drafts = []
        for _ in range(k):
            drafts.append(int(_laws(drafter, torch.tensor([tokens + drafts]), 0.0, 0, 1.0)[1][0].argmax()))
        emitted = []
        for y in drafts:
            context = torch.tensor([tokens + emitted])
            q1, q = _laws(drafter, context, 0.0, 0, 1.0)
            p1, p = _laws(target, context, 0.0, 0, 1.0)
            accepted, recovered = (x[0] for x in _emitted(rule, alpha, q1, p1, q, p, wrong))
            if accepted[y] == 1:
                emitted.append(y)
                continue
            emitted.append(int(recovered.argmax()))  # rejected: the residual is one-hot
            break
        else:
            emitted.append(int(_laws(target, torch.tensor([tokens + emitted]), 0.0, 0, 1.0)[1][0].argmax()))
        tokens += emitted
        out += emitted
    return out[:new]


# alphas where the rule's decisions split on these prompts; the misreading changes some row's output
GREEDY_CASES = [("chow", 0.5, "stats_at_t"), ("diff", -0.15, "stats_at_t"), ("opt", 0.1, "tv_at_t1"),
                ("token_v1", 0.05, "stats_at_t"), ("token_v2", 0.3, "stats_at_t"), ("token_v3", 0.6, "stats_at_t")]  # fmt: skip


@pytest.mark.parametrize(("rule", "alpha", "wrong"), GREEDY_CASES)
def test_greedy_follows_the_rule_token_for_token(engine, rule, alpha, wrong):
    """Greedy under a cascade (one-hot q and p, decisions on the T=1 softmaxes): left-padded rows of two
    lengths, a draft length of 1 and of 3, each row token for token the SPEC §3 decode of its own prompt."""
    short = [7, 2]
    ids, mask = torch.tensor([P1, [0, 0, 0, *short]]), torch.tensor([[1] * 5, [0, 0, 0, 1, 1]])
    for k in (1, 3):
        want = [_greedy(engine, rule, alpha, prompt, 12, k) for prompt in (P1, short)]
        misread = [_greedy(engine, rule, alpha, prompt, 12, k, wrong) for prompt in (P1, short)]
        assert want != misread, "the case cannot tell the misreading apart"
        cascade = CascadeConfig(rule, alpha)
        out = engine.generate(
            ids, attention_mask=mask, max_new_tokens=12, num_draft_tokens=k, cascade=cascade
        )
        assert out[:, 5:].tolist() == want, k


EXACT_LIMITS = [("chow", 0.0), ("diff", -1.0), ("token_v1", -1.0), ("token_v2", -1e-9), ("token_v2", -0.5),
                ("token_v3", -1e-9), ("token_v3", -0.5), ("lossy", 0.0)]  # fmt: skip


def test_exact_limits_sample_what_speculative_sampling_samples(engine):
    """At the exact end of its range every rule defers everywhere (r = 1: pi = p), so with the same seed
    it samples exactly the tokens of speculative sampling without a cascade (temperature, top-k, top-p),
    whose law test_lossless_sampling checks."""
    ids = torch.tensor([P2]).expand(400, -1)
    sampling = dict(max_new_tokens=6, num_draft_tokens=3, do_sample=True, temperature=0.7, top_k=5, top_p=0.9)
    torch.manual_seed(5)
    want = engine.generate(ids, **sampling)
    for rule, alpha in EXACT_LIMITS:
        torch.manual_seed(5)
        cascade = CascadeConfig(rule, alpha)
        out = engine.generate(ids, cascade=cascade, return_dict_in_generate=True, **sampling)
        assert torch.equal(out.sequences, want), rule
        assert out.stats.deferral_rate == 1.0, rule


def test_lenient_limits_accept_every_draft_when_sampling(engine):
    """At the lenient end (alpha 1) a rule keeps every drafted token (r = 0: pi = q), accepted without a coin
    flip whatever the uniform, also where q is tempered and filtered."""
    ids = torch.tensor([P2]).expand(2000, -1)
    for rule in ("chow", "diff", "token_v1", "token_v2", "token_v3"):
        torch.manual_seed(6)
        out = engine.generate(
            ids, max_new_tokens=8, num_draft_tokens=3, do_sample=True, temperature=1.3, top_k=0, top_p=0.8,
            cascade=CascadeConfig(rule, 1.0), return_dict_in_generate=True,
        )  # fmt: skip
        stats = out.stats
        assert stats.acceptance_rate == 1.0 and stats.deferral_rate == 0.0, (rule, stats.summary())
