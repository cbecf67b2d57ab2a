"""Speculative cascades across vocabularies follow SPEC §3 on the translated proposal ``q'`` of SPEC §2.3.

The drafter and the target give the same law whatever the context (test_cross_vocab's constant models,
word-level tokenizers), so a round is a finite tree the oracle walks exactly, reading no engine code:
the drafter draws ``k = 2`` tokens from its sampled law ``q`` (temperature, top-k, top-p applied); the
run is translated left to right (SPEC §2.2: a drafted pair the n-gram table holds merges into its target
token, another token goes through the direct map, and the draft stops at a token with no target token);
each proposed target position carries ``q'`` (SPEC §2.3: the direct map of the drafter's law, and at a
merge ``q'(t_ng) = q(d_1) q(d_2)`` taken off ``q'(d2t[d_1])``, along the path drawn), and the rules read
``q'`` where SPEC §3 reads ``q``: its statistics at ``T=1`` (the path's ``q'`` of the unfiltered law), the
mixture, acceptance ratio and residual at the sampled law. The first rejection emits from
``norm(max(0, pi - q'))`` and ends the round; a round whose proposals all pass ends with a bonus token
from ``p``. With ``translation="tli"`` the drafter draws from its law restricted to the shared tokens
and nothing merges. A round that emits one token leaves the second to the next round, whose first token
has the same law (nothing depends on the context).

Merged proposals are only approximately the drafter's law (SPEC §2.3), so the engine's output is not
``pi``'s cascade but this procedure's, which the oracle computes. Where the draft stops at a token with no
target token, ``q'`` is sub-stochastic and SPEC §3 leaves ``pi`` open; the oracle takes kernels/cascade.py's
documented reading (the drafter's missing mass counts as deferred to the target: ``q(V \\ A) = 1 - q(A)``,
so that ``pi`` is a distribution and the position, proposed or not, emits it). With a confidence threshold
(``assistant_confidence_threshold``), a row that stops after its first drafted token translates that token
alone and gets the bonus from ``p``.

Each case checks that the bound separates the law from a wrong reading: ``"merge_keeps_mass"`` (a merge's
first sub-token keeps its whole mass in ``q'``), ``"stats_at_t"`` (the rules' statistics read from the
sampled ``q'`` and ``p``), ``"untranslated"`` (the rules' statistics read from the direct map, as if nothing
merged), ``"q_out_of_a_over_targets"`` (``q(V \\ A)`` summed over the target's tokens: a ``pi`` of less than
unit mass, SPEC §3 read literally), ``"no_stop"`` (the confidence stop ignored, merges reaching past it),
and under logits processing ``"unrestricted"`` (the rules read ``q'`` where the processed target logits are
-inf too) and ``"drafter_unprocessed"`` (the drafter's logits not processed through its twins).
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import pytest
import torch
from test_cascade_law import _emitted
from test_cross_vocab import _constant_model, _words_tokenizer
from test_lossless_sampling import _tv_bound, _warp

from omnidraft_fast import CascadeConfig, EngineConfig, SpeculativeEngine

ROWS = 8000
DELTA = 1e-8
K = 2
TARGET_WORDS = ["<unk>", "a", "b", "c", "d", "ab", "ca", "dd"]
P = torch.tensor([0.02, 0.15, 0.55, 0.05, 0.03, 0.05, 0.03, 0.12])
MERGES = {(1, 2): 5, (3, 1): 6, (4, 4): 7}  # drafter pairs the preseeded table merges: "ab", "ca", "dd"


class Drafter(NamedTuple):
    """A drafter's words, its constant law and its direct map into TARGET_WORDS (-1: no target token)."""

    words: list[str]
    q: torch.Tensor
    d2t: torch.Tensor


# <unk> has no target token and this drafter never draws it
MAPPED = Drafter(["<unk>", "a", "b", "c", "d"], torch.tensor([0.0, 0.5, 0.3, 0.12, 0.08]),
                 torch.tensor([-1, 1, 2, 3, 4]))  # fmt: skip
# "e" has no target token either (and no target spelling): the draft stops there a third of the time
STOPPING = Drafter(["<unk>", "a", "b", "c", "d", "e"], torch.tensor([0.0, 0.3, 0.2, 0.1, 0.05, 0.35]),
                   torch.tensor([-1, 1, 2, 3, 4, -1]))  # fmt: skip


def _engine(drafter: Drafter, translation: str) -> SpeculativeEngine:
    """An engine between the word-level tokenizers whose models give the laws ``drafter.q`` and P."""
    return SpeculativeEngine(
        _constant_model(P), _constant_model(drafter.q.clamp_min(1e-30)),
        target_tokenizer=_words_tokenizer(TARGET_WORDS), drafter_tokenizer=_words_tokenizer(drafter.words),
        config=EngineConfig(num_draft_tokens=K, translation=translation, prompt_bucket=8),
    )  # fmt: skip


@pytest.fixture(scope="module")
def engines():
    return {translation: _engine(MAPPED, translation) for translation in ("omnidraft", "tli")}


def _law(
    probs: torch.Tensor, sampling, support: torch.Tensor | None = None, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """[V] float64: a constant model's T=1 law and the law it samples from, over ``support`` only (TLI), its
    logits processed by adding ``bias`` (-inf: a token the processors forbid)."""
    logits = probs.clamp_min(1e-30).log()
    if bias is not None:
        logits = logits + bias
    if support is not None:
        logits = logits.masked_fill(~support, -torch.inf)
    return logits.double().softmax(-1), _warp(logits[None], *sampling)[0].double()


def _direct(drafter: Drafter, q: torch.Tensor) -> torch.Tensor:
    """[V_t]: the direct map of a drafter law (SPEC §2.3); sub-stochastic where some token has no target token."""
    row = torch.zeros(len(TARGET_WORDS), dtype=torch.float64)
    mapped = drafter.d2t >= 0
    return row.index_put_((drafter.d2t[mapped],), q[mapped], accumulate=True)


def _proposal(
    drafter: Drafter, path, q: torch.Tensor, merges: bool, wrong=None
) -> list[tuple[int, torch.Tensor]]:
    """The target positions a drafted ``path`` proposes, (token, q' row), and at the end (token -1, q' row)
    where the draft stops at a token with no target token."""
    out, i = [], 0
    while i < len(path):
        d = path[i]
        merged = MERGES.get(tuple(path[i : i + 2])) if merges else None
        row = _direct(drafter, q)
        if merged is not None:
            row[merged] = q[path[i]] * q[path[i + 1]]
            if wrong != "merge_keeps_mass":
                row[drafter.d2t[d]] -= row[merged]
            out.append((merged, row))
            i += 2
        else:
            out.append((int(drafter.d2t[d]), row))
            if drafter.d2t[d] < 0:
                break
            i += 1
    return out


def _pi(rule, alpha, q1, p1, q, p, wrong=None) -> torch.Tensor:
    """[V_t]: SPEC §3's ``pi`` on a proposal ``q`` that may be sub-stochastic (the draft stops at this position
    with the missing mass): that mass counts as not kept, ``q(V \\ A) = 1 - q(A)`` (kernels/cascade.py; pi
    is then a distribution, which the rejection at the stop draws from exactly), unless ``wrong`` is
    ``"q_out_of_a_over_targets"`` (``q(V \\ A)`` summed over the target's tokens: pi sums to less than 1)."""
    accepted, recovered = (x[0] for x in _emitted(rule, alpha, q1[None], p1[None], q[None], p[None]))
    pi = accepted + recovered
    return pi if wrong == "q_out_of_a_over_targets" else pi + (1 - pi.sum()) * p


def _round(
    drafter: Drafter, rule, alpha, sampling, translation, wrong=None, threshold=None, bias=None
) -> dict[tuple[int, ...], float]:
    """The law of the tokens one round emits: {emitted tokens: probability}. With a confidence ``threshold``
    the draft stops after a first token whose sampled-law probability is below it: only that token is
    translated (nothing merges across the stop), and once it passes, the bonus comes from ``p``.

    ``bias`` [V_t]: the request's logits processing, context-free here (``suppress_tokens`` at -inf, one-token
    ``sequence_bias``): the target's logits get it, the drafter's through its twins (each drafter token with a
    target token gets that token's bias), and the proposal ``q'`` counts only where the target's processed
    logits are finite: a draft elsewhere is rejected (``kernels/verify.py``'s ``support_only``), unless
    ``wrong`` is ``"unrestricted"`` (the rules read the whole ``q'``)."""
    support = drafter.d2t >= 0 if translation == "tli" else None
    drafter_bias = None
    if bias is not None and wrong != "drafter_unprocessed":
        drafter_bias = torch.where(drafter.d2t >= 0, bias[drafter.d2t.clamp_min(0)], 0.0)
    q1, q = _law(drafter.q, sampling, support, drafter_bias)
    p1, p = _law(P, sampling, bias=bias)
    allowed = None if bias is None or wrong == "unrestricted" else ~bias.isneginf()
    if wrong == "stats_at_t":
        p1 = p
    outcomes: dict[tuple[int, ...], float] = {}

    def add(tokens, weight):
        outcomes[tokens] = outcomes.get(tokens, 0.0) + weight

    merges = translation == "omnidraft"
    for path in itertools.product(range(len(drafter.words)), repeat=K):
        weight = float(torch.tensor([q[d] for d in path]).prod())
        if weight == 0.0:
            continue
        if threshold is not None and q[path[0]] < threshold and wrong != "no_stop":
            path = path[:1]  # (the drafter's next token is drawn in no row: the K rows summed are its weight)
        proposals = _proposal(drafter, path, q, merges, wrong)
        proposals_t1 = _proposal(drafter, path, q1, merges, wrong)
        if wrong == "untranslated":  # the rules' statistics from the direct map alone
            proposals_t1 = [(t, _direct(drafter, q1)) for t, _ in proposals]
        emitted = ()
        for (token, row), (_, row_t1) in zip(proposals, proposals_t1, strict=True):
            if allowed is not None:
                row, row_t1 = row * allowed, row_t1 * allowed
            pi = _pi(rule, alpha, row if wrong == "stats_at_t" else row_t1, p1, row, p, wrong)
            accept = (
                0.0
                if token < 0 or row[token] == 0
                else float(torch.minimum(pi[token], row[token]) / row[token])
            )
            if accept < 1.0:  # rejected (always at the stop): the residual, or pi where it has no mass
                residual = (pi - row).clamp(min=0)
                residual = residual if residual.sum() > 0 else pi
                for v in range(len(TARGET_WORDS)):
                    add((*emitted, v), weight * (1 - accept) * float(residual[v] / residual.sum()))
            weight *= accept
            emitted = (*emitted, token)
        if weight > 0.0:  # every proposal passed: the bonus from p
            for v in range(len(TARGET_WORDS)):
                add((*emitted, v), weight * float(p[v]))
    return outcomes


def _two_tokens(
    drafter: Drafter, rule, alpha, sampling, translation, wrong=None, threshold=None, bias=None
) -> torch.Tensor:
    """[V_t, V_t] float64: P(first new token = a, second = b) (module docstring)."""
    outcomes = _round(drafter, rule, alpha, sampling, translation, wrong, threshold, bias)
    first = torch.zeros(len(TARGET_WORDS), dtype=torch.float64)
    for tokens, weight in outcomes.items():
        first[tokens[0]] += weight
    joint = torch.zeros(len(TARGET_WORDS), len(TARGET_WORDS), dtype=torch.float64)
    for tokens, weight in outcomes.items():
        if len(tokens) >= 2:
            joint[tokens[0], tokens[1]] += weight
        else:
            joint[tokens[0]] += weight * first
    return joint


def _sampled_pairs(engine, rule, alpha, sampling, threshold=None, options=None) -> torch.Tensor:
    temperature, top_k, top_p = sampling
    torch.manual_seed(99)
    out = engine.generate(
        torch.tensor([[1, 2, 3]]).expand(ROWS, -1), max_new_tokens=2, do_sample=True, temperature=temperature,
        top_k=top_k, top_p=top_p, cascade=CascadeConfig(rule, alpha), assistant_confidence_threshold=threshold,
        **(options or {}),
    )  # fmt: skip
    return out[:, 3] * len(TARGET_WORDS) + out[:, 4]


def _tv(pairs: torch.Tensor, law: torch.Tensor) -> float:
    empirical = torch.bincount(pairs, minlength=law.numel()).double() / pairs.numel()
    return 0.5 * (empirical - law.flatten()).abs().sum().item()


def _check(engine, drafter, rule, alpha, sampling, translation, wrong, threshold=None, processing=None):
    """``processing``: (the request's generate() options, the bias they add to the target's logits)."""
    options, bias = processing or (None, None)
    law = _two_tokens(drafter, rule, alpha, sampling, translation, threshold=threshold, bias=bias)
    assert abs(law.sum().item() - 1.0) < 1e-6  # fp32 laws
    bound = _tv_bound(law, ROWS, DELTA)
    misread = _two_tokens(drafter, rule, alpha, sampling, translation, wrong, threshold, bias)
    assert 0.5 * (law - misread).abs().sum().item() > 2 * bound, "the case cannot tell the misreading apart"
    pairs = _sampled_pairs(engine, rule, alpha, sampling, threshold, options)
    if bias is not None:  # no forbidden token comes out, in either position
        forbidden = bias.isneginf()
        assert not (forbidden[pairs // len(TARGET_WORDS)] | forbidden[pairs % len(TARGET_WORDS)]).any()
    tv = _tv(pairs, law)
    assert tv < bound, f"TV {tv:.4f} >= bound {bound:.4f}"


# (rule, alpha, (T, top_k, top_p), translation, the misreading the bound must tell apart); no rule's statistic
# sits on its threshold (a tie that fp32 and fp64 could break apart)
CASES = [
    ("chow", 0.55, (0.8, 3, 1.0), "omnidraft", "merge_keeps_mass"),
    ("chow", 0.55, (1.3, 0, 0.9), "omnidraft", "stats_at_t"),
    ("diff", 0.15, (0.9, 0, 0.8), "omnidraft", "untranslated"),
    ("opt", 0.2, (0.7, 0, 1.0), "omnidraft", "stats_at_t"),
    ("token_v1", 0.1, (0.8, 3, 1.0), "omnidraft", "stats_at_t"),
    ("token_v2", 0.48, (0.8, 3, 1.0), "omnidraft", "stats_at_t"),
    ("token_v3", 0.7, (1.3, 0, 0.9), "omnidraft", "stats_at_t"),
    ("token_v1", 0.1, (0.7, 0, 1.0), "tli", "stats_at_t"),
]  # fmt: skip


@pytest.mark.law
@pytest.mark.parametrize(("rule", "alpha", "sampling", "translation", "wrong"), CASES)
def test_two_tokens_follow_the_cascade_on_the_translated_proposal(engines, rule, alpha, sampling, translation,
                                                                    wrong):  # fmt: skip
    _check(engines[translation], MAPPED, rule, alpha, sampling, translation, wrong)


STOP_CASES = [
    ("chow", 0.8, (0.8, 3, 1.0)),
    ("opt", 1.0, (0.7, 0, 1.0)),
    ("token_v1", 0.28, (1.0, 0, 1.0)),
    ("token_v2", 0.48, (0.8, 3, 1.0)),
]  # fmt: skip


@pytest.mark.law
@pytest.mark.parametrize(("rule", "alpha", "sampling"), STOP_CASES)
def test_a_stop_at_a_token_with_no_target_token_defers_its_mass(rule, alpha, sampling):
    """Where the draft stops at a drafted token with no target token, ``q'`` is sub-stochastic; the drafter's
    missing mass counts as deferred to the target (``_pi``), and that position draws from the residual."""
    engine = _engine(STOPPING, "omnidraft")
    _check(engine, STOPPING, rule, alpha, sampling, "omnidraft", "q_out_of_a_over_targets")


CONFIDENCE_CASES = [("chow", 0.55, (0.8, 3, 1.0), 0.4), ("token_v1", 0.1, (1.0, 0, 1.0), 0.4)]


@pytest.mark.law
@pytest.mark.parametrize(("rule", "alpha", "sampling", "threshold"), CONFIDENCE_CASES)
def test_a_confidence_stop_keeps_merges_inside_the_draft(engines, rule, alpha, sampling, threshold):
    """A row that stops drafting after an unsure first token (``assistant_confidence_threshold``) proposes
    that token alone, never merged with the token it did not draft, then gets the bonus from ``p``."""
    _check(engines["omnidraft"], MAPPED, rule, alpha, sampling, "omnidraft", "no_stop", threshold)


def _bias(**values: float) -> torch.Tensor:
    """[V_t]: what a context-free processing adds to the target's logits, by word."""
    bias = torch.zeros(len(TARGET_WORDS))
    for word, value in values.items():
        bias[TARGET_WORDS.index(word)] = value
    return bias


# (rule, alpha, sampling, (generate() options, the bias they add), the misreading the bound must tell apart):
# "ab" is the merge of a drafted pair (the drafter's law cannot see that it is forbidden), "b" and "c" direct
# maps (the drafter sees their bias or suppression through its twins)
PROCESSED_CASES = [
    ("chow", 0.7, (1.0, 0, 1.0), ({"suppress_tokens": [5], "sequence_bias": {(2,): 1.0}}, _bias(ab=-torch.inf, b=1.0)),
     "unrestricted"),
    ("token_v1", 0.7, (1.0, 0, 1.0), ({"suppress_tokens": [5], "sequence_bias": {(2,): 1.5}},
                                      _bias(ab=-torch.inf, b=1.5)), "drafter_unprocessed"),
    ("diff", 0.5, (0.9, 0, 0.9), ({"suppress_tokens": [5, 3]}, _bias(ab=-torch.inf, c=-torch.inf)), "unrestricted"),
]  # fmt: skip


@pytest.mark.law
@pytest.mark.parametrize(("rule", "alpha", "sampling", "processing", "wrong"), PROCESSED_CASES)
def test_logits_processing_holds_where_the_rule_keeps_a_draft(
    engines, rule, alpha, sampling, processing, wrong
):
    """A cascade across vocabularies under logits processing: the drafter drafts from its logits processed
    through its twins, and the rules read ``q'`` only where the processed target logits are finite, so that a
    merged token the processors forbid is rejected, its mass deferred to the processed target: no forbidden
    token comes out, and the two tokens follow the cascade on the restricted ``q'``."""
    _check(engines["omnidraft"], MAPPED, rule, alpha, sampling, "omnidraft", wrong, processing=processing)
