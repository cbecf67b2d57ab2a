"""Online learning while serving: LoRA hybrid distillation (SPEC §4) and adaptive draft length (SPEC §5)."""

from __future__ import annotations

import copy
import dataclasses
import math
import sys

import pytest
import torch
from conftest import left_padded_prompts, perturbed_copy, tiny_model
from omnidraft_fast.kernels.sampling import sampling_probs_reference

from omnidraft_fast import AdaptiveConfig, DistillConfig, EngineConfig, SamplingParams, SpeculativeEngine
from omnidraft_fast.adaptive import (
    AcceptanceHead,
    acceptance_loss,
    expected_acceptance,
    stop_drafting,
    target_law,
)
from omnidraft_fast.bridge import token_bytes
from omnidraft_fast.distill import hybrid_distillation_loss, reverse_kl
from omnidraft_fast.experience import Example, Recorder
from omnidraft_fast.learner import OnlineLearner

VOCAB = 96
NO_STEP = 10_000  # an interval no test reaches: rows are recorded, never trained on


@pytest.fixture(scope="module")
def shared_pair():
    target = tiny_model("llama", VOCAB, seed=5)
    return target, perturbed_copy(target, 0.6, seed=6)


def _engine(target, drafter, **config):
    return SpeculativeEngine(target, copy.deepcopy(drafter), config=EngineConfig(**config))


# ---------------------------------------------------------------------------------------------- maths
def test_reverse_kl_by_hand():
    # Drafter ids 0..3: 0 and 1 canonical with targets, 2 a twin of 1, 3 unmapped.
    logits = torch.tensor([[0.0, 1.0, 0.5, 2.0]])
    target_logits = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    support = torch.tensor([True, True, False, False])
    twins = torch.tensor([[2], [1]])
    q = logits.softmax(-1)[0]
    q_fold = torch.stack([q[0], q[1] + q[2]])
    q_tilde = q_fold / q_fold.sum()
    p_tilde = torch.tensor([1.0, 0.0]).softmax(-1)
    expected = (q_tilde * (q_tilde / p_tilde).log()).sum()
    assert torch.allclose(reverse_kl(logits, target_logits, support, twins), expected[None], atol=1e-6)
    # Zero exactly when the folded, renormalised drafter matches the target on the support.
    match = torch.tensor([[0.0, math.log(0.5), math.log(0.5), 5.0]])
    assert reverse_kl(match, torch.tensor([[0.0, 0.0, 9.0, 9.0]]), support, twins).abs().item() < 1e-6


def test_adamw_matches_torch_and_a_gated_off_step_changes_nothing():
    """The learners' device-side AdamW (optim.py) is torch's AdamW; with its gate off, a step is no step."""
    from omnidraft_fast.optim import AdamW

    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    optimizer = AdamW(ours, lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1)
    reference = torch.optim.AdamW(theirs, lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1)
    for i in range(7):
        gate = [None, torch.tensor(True), torch.tensor(False)][i % 3]
        optimizer.zero_grad()
        reference.zero_grad()
        for p, q in zip(ours, theirs, strict=True):
            gradient = torch.randn_like(p)
            p.grad += gradient
            q.grad = gradient.clone()
        before = [p.detach().clone() for p in ours] + [
            m.clone() for m in optimizer.exp_avg + optimizer.exp_avg_sq
        ]
        optimizer.step(gate)
        if gate is None or bool(gate):
            reference.step()
        else:
            after = [p.detach() for p in ours] + optimizer.exp_avg + optimizer.exp_avg_sq
            assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
        for p, q in zip(ours, theirs, strict=True):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert optimizer.steps.item() == reference.state[theirs[0]]["step"].item() == 5
    gated = AdamW([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    gated.params[0].grad.fill_(torch.nan)  # a NaN gradient stays out of a gated-off step
    gated.step(torch.tensor(False))  # a first step gated off: no 0/0 in the bias correction either
    assert torch.equal(gated.params[0].detach(), torch.ones(2)) and gated.steps.item() == 0
    assert not gated.exp_avg[0].any() and not gated.exp_avg_sq[0].any()


def test_masked_losses_equal_the_losses_of_the_selected_positions():
    """A window's fixed-shape losses (masks over every position) are the losses of the labelled positions
    alone; what sits at the unlabelled ones does not matter, not even to the gradient."""
    torch.manual_seed(1)
    logits = torch.randn(6, 9, requires_grad=True)
    targets = torch.randn(6, 9)
    tokens = torch.randint(9, (6,))
    kl, ce = (
        torch.tensor([1, 0, 1, 0, 0, 1], dtype=torch.bool),
        torch.tensor([0, 1, 0, 0, 1, 0], dtype=torch.bool),
    )
    support = torch.rand(9) < 0.8
    twins = torch.tensor([[3], [support.long().argmax().item()]])
    support[3] = False
    selected = hybrid_distillation_loss(logits[kl], targets[kl], logits[ce], tokens[ce], support, twins, 0.2)
    (expected,) = torch.autograd.grad(selected, logits)
    masked = hybrid_distillation_loss(
        logits, targets, logits, tokens, support, twins, 0.2, kl_mask=kl, ce_mask=ce
    )
    (gradient,) = torch.autograd.grad(masked, logits)
    torch.testing.assert_close(masked, selected)
    torch.testing.assert_close(gradient, expected)

    head = torch.randn(2, 5, requires_grad=True)
    labels = torch.rand(2, 5)
    mask = torch.rand(2, 5) < 0.5
    mask[0, 0] = True
    torch.testing.assert_close(
        acceptance_loss(head, labels, 6.0, mask), acceptance_loss(head[mask], labels[mask], 6.0)
    )
    assert acceptance_loss(head, labels, 6.0, torch.zeros_like(mask)).item() == 0.0


def test_distillation_loss_weights_the_ngram_term():
    logits = torch.randn(3, 6)
    tokens = torch.tensor([1, 4])
    support = torch.ones(6, dtype=torch.bool)
    twins = torch.empty(2, 0, dtype=torch.int64)
    kl = reverse_kl(logits[:1], logits[:1] + 0.3 * torch.randn(1, 6), support, twins)
    ce = torch.nn.functional.cross_entropy(logits[1:], tokens, reduction="sum")
    loss = hybrid_distillation_loss(
        logits[:1], logits[:1] + 0, logits[1:], tokens, support, twins, ngram_weight=0.2
    )  # q = p: the KL term vanishes
    assert torch.allclose(loss, 0.2 * ce / 3, atol=1e-6)
    assert kl.item() > 0


def test_acceptance_loss_and_stopping_rule():
    logits = torch.tensor([0.0, 2.0, -1.0])
    labels = torch.tensor([1.0, 0.25, 0.0])
    a = logits.sigmoid()
    expected = -(labels * a.log() + 6 * (1 - labels) * (1 - a).log()).mean()
    assert torch.allclose(acceptance_loss(logits, labels, reject_weight=6.0), expected, atol=1e-6)
    log_keep = torch.tensor([0.9, 0.5, 0.2]).log()  # P(some rejection) = 0.1, 0.5, 0.8
    assert stop_drafting(log_keep, 2, gamma=0.3, k_min=1).tolist() == [False, True, True]
    assert stop_drafting(log_keep, 1, gamma=0.3, k_min=2).tolist() == [False, False, False]


def _filtered(logits: torch.Tensor, sampling: SamplingParams) -> torch.Tensor:
    """What a request samples from, computed by sorting (one-hot when greedy): an independent check of the
    filters the recomputed labels apply."""
    if sampling.temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    z = logits / sampling.temperature
    if sampling.top_k:
        z = z.masked_fill(
            z < z.sort(-1, descending=True).values[..., sampling.top_k - 1 : sampling.top_k], -math.inf
        )
    probs = z.softmax(-1)
    ordered, order = probs.sort(-1, descending=True)
    keep = (ordered.cumsum(-1) - ordered < sampling.top_p).scatter(
        -1, order, (ordered.cumsum(-1) - ordered < sampling.top_p)
    )
    return torch.where(keep, probs, 0.0) / torch.where(keep, probs, 0.0).sum(-1, keepdim=True)


def test_expected_acceptance():
    """A fresh draft's expected acceptance over the mapped ids, with the request's filters on both sides; or,
    given the drafted tokens, theirs."""
    support = torch.tensor([True, True, True, False])
    twins = torch.empty(2, 0, dtype=torch.int64)
    logits = torch.tensor([[2.0, 1.0, 0.0, -9.0], [2.0, 1.0, 0.0, 3.0]])
    target = torch.tensor([[0.0, 1.0, 2.0, 5.0], [1.0, 0.5, 0.0, 0.0]])
    q, p = logits.softmax(-1), target[:, :3].softmax(-1)
    sampled = expected_acceptance(logits, target, support, twins, SamplingParams(1.0))
    assert torch.allclose(sampled, torch.minimum(q[:, :3], p).sum(-1))
    # top-k 2: the drafter keeps ids {0, 1} and {3, 0}, the target (over the mapped ids) {1, 2} and {0, 1}
    e = math.e
    top2 = expected_acceptance(logits, target, support, twins, SamplingParams(1.0, top_k=2))
    assert torch.allclose(top2, torch.tensor([1 / (e + 1), 1 / (e + 1)]))
    drafted = torch.tensor(
        [0, 1]
    )  # row 0: q = e/(e+1), p = 0; row 1: the drafter would not draft 1 now, p > 0
    assert expected_acceptance(
        logits, target, support, twins, SamplingParams(1.0, top_k=2), drafted
    ).tolist() == [0, 1]
    ratio = expected_acceptance(logits, target, support, twins, SamplingParams(1.0), torch.tensor([0, 2]))
    assert torch.allclose(ratio, torch.stack([p[0, 0] / q[0, 0], torch.tensor(1.0)]))
    greedy = expected_acceptance(logits, logits.clone(), support, twins, SamplingParams())
    assert greedy.tolist() == [1.0, 0.0]  # row 1's drafter prefers an unmapped id


def test_recomputed_labels_follow_each_rows_sampling(shared_pair):
    """The alternating mode's replay labels rows sampled differently in one pass, each under its own
    request's temperature, top-k and top-p (what verification's labels measure), and a head with the
    confidence input on the drafted token's confidence and acceptance."""
    target, drafter = shared_pair
    samplings = [
        SamplingParams(1.0, top_k=3),
        SamplingParams(0.7, top_p=0.8),
        SamplingParams(1.0),
        SamplingParams(),
    ]
    generator = torch.Generator().manual_seed(4)
    rows = []
    for sampling in samplings:
        ids = torch.randint(VOCAB, (10,), generator=generator)
        labelled = torch.arange(10) >= 4
        rows.append(Example(ids=ids, kl=torch.where(labelled, torch.arange(10) - 4, -1), ce=torch.zeros(10, dtype=torch.bool),
                            head=torch.where(labelled, 0.5, torch.nan), logits=3 * torch.randn(6, VOCAB, generator=generator),
                            drafted=torch.where(labelled, torch.randint(VOCAB, (10,), generator=generator), ids),
                            sampling=sampling))  # fmt: skip
    for confidence in (False, True):
        engine = _engine(
            target, drafter, adaptive=AdaptiveConfig(interval=NO_STEP, confidence_input=confidence)
        )
        seen = {}
        engine.learner._fit_head = lambda hidden, inputs, labels, mask, recompute, seen=seen: seen.update(
            inputs=inputs, labels=labels
        )
        engine.learner._head_step(rows, recompute=True)
        labels, inputs = [], []
        for row in rows:
            with torch.no_grad():
                logits = drafter(row.ids[None]).logits[0, 3:9]  # predicting slots 4..9
            q, p = _filtered(logits, row.sampling), _filtered(row.logits.float(), row.sampling)
            y = row.drafted[4:, None]
            c = logits.softmax(-1).gather(1, y)[:, 0]
            inputs.append(torch.log(c / (1 - c)))
            q_y, p_y = q.gather(1, y)[:, 0], p.gather(1, y)[:, 0]
            mine = torch.where(q_y > 0, (p_y / q_y).clamp(max=1), (p_y > 0).float())
            labels.append(mine if confidence else torch.minimum(q, p).sum(-1))
        torch.testing.assert_close(seen["labels"], torch.cat(labels), atol=2e-5, rtol=1e-4)
        if confidence:
            torch.testing.assert_close(seen["inputs"], torch.cat(inputs), atol=1e-4, rtol=1e-4)
        else:
            assert seen["inputs"] is None


@pytest.mark.parametrize("confidence", [False, True])
def test_recomputed_labels_follow_exact_match_verification(cross_pair, confidence):
    """With ``translation="exact"`` a sampled draft is accepted with probability ``p(y)`` (a draw from p must
    be y): verification's head labels say so, and the alternating mode's replay must recompute that
    acceptance too (``sum_v q(v) p~(v)``, ``p~(y)`` for a head with the confidence input), not speculative
    sampling's ``sum_v min(q, p~)``. Here, on a near-uniform random target, verification's labels average
    0.003 where speculative sampling's recomputed ones averaged 0.66."""
    target, drafter, target_tokenizer, drafter_tokenizer = cross_pair
    engine = SpeculativeEngine(
        target, copy.deepcopy(drafter), target_tokenizer=target_tokenizer, drafter_tokenizer=drafter_tokenizer,
        config=EngineConfig(num_draft_tokens=4, translation="exact",
                            adaptive=AdaptiveConfig(interval=NO_STEP, prior=0.999, confidence_input=confidence)),
    )  # fmt: skip
    batch = target_tokenizer(["def fibonacci(n):\n    return", "The café on the corner"] * 2, return_tensors="pt",
                             padding=True)  # fmt: skip
    engine.generate(**batch, max_new_tokens=16, do_sample=True, top_k=0, eos_token_id=[])
    rows = list(engine.learner.pending)
    verified = torch.cat([row.head[1:][~row.head[1:].isnan()] for row in rows])
    seen = {}
    engine.learner._fit_head = lambda hidden, inputs, labels, mask, recompute: seen.update(labels=labels)
    engine.learner._head_step(rows, recompute=True)
    assert verified.numel() > 20 and verified.mean() < 0.05
    assert seen["labels"].mean() < 0.05, (seen["labels"].mean(), verified.mean())
    # by hand: a fresh draft's exact-match acceptance, and a drafted token's
    logits, target_logits = torch.tensor([[2.0, 1.0, 0.0, -9.0]]), torch.tensor([[0.0, 1.0, 2.0, 5.0]])
    support, twins = torch.tensor([True, True, True, False]), torch.empty(2, 0, dtype=torch.int64)
    q, p = logits.softmax(-1)[:, :3], target_logits[:, :3].softmax(-1)
    sampled = SamplingParams(1.0)
    torch.testing.assert_close(
        expected_acceptance(logits, target_logits, support, twins, sampled, exact_match=True), (q * p).sum(-1)
    )
    drafted = expected_acceptance(logits, target_logits, support, twins, sampled, torch.tensor([1]), True)
    torch.testing.assert_close(drafted, p[:, 1])


@pytest.mark.parametrize(
    ("translation", "filtering"),
    [("omnidraft", {}), ("tli", {}), ("exact", {}), ("omnidraft", {"top_k": 20}),
     ("omnidraft", {"top_p": 0.8}), ("tli", {"top_k": 30, "top_p": 0.9})],
)  # fmt: skip
def test_recomputed_labels_of_drafted_tokens_are_verifications_across_vocabularies(cross_pair, translation,
                                                                                   filtering):  # fmt: skip
    """Under the drafter that drafted them, the alternating mode's recomputed label of a drafted token with a
    target twin (a head with the confidence input: that token's acceptance) is the one verification gave:
    ``min(1, p(t)/q'(t))`` with ``p`` the target's law over its whole vocabulary (not renormalised over the
    directly mapped ids: 0.88 against 0.79 on average here; with top-k/top-p, filtered over the whole
    vocabulary, not over the mapped ids), ``q'`` with split tokens' mass on their first piece, a TLI drafter's
    law over the directly mapped ids; ``p(t)`` under exact match."""
    target, drafter, target_tokenizer, drafter_tokenizer = cross_pair
    engine = SpeculativeEngine(
        target, copy.deepcopy(drafter), target_tokenizer=target_tokenizer, drafter_tokenizer=drafter_tokenizer,
        config=EngineConfig(num_draft_tokens=4, translation=translation,
                            adaptive=AdaptiveConfig(interval=NO_STEP, prior=0.999, confidence_input=True)),
    )  # fmt: skip
    prompts = ["def fibonacci(n):\n    return", "The café on the corner", "    x = [i for i in range("]
    batch = target_tokenizer(prompts * 2, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    engine.generate(**batch, max_new_tokens=24, do_sample=True, eos_token_id=[], **{"top_k": 0, **filtering})
    learner, rows = engine.learner, list(engine.learner.pending)
    labels = {}
    for recompute in (False, True):
        learner._fit_head = lambda hidden, inputs, labels_, mask, recompute_, at=recompute: labels.update(
            {at: labels_}
        )
        learner._head_step(rows, recompute=recompute)
    relabelled = torch.cat(
        [(part.head_kl >= 0) & (engine.bridge.d2t[part.head_tokens] >= 0)
         for part in (learner._run(chunk, grad=False) for chunk in learner._passes(rows))]
    )  # fmt: skip
    assert relabelled.sum() > 30
    torch.testing.assert_close(labels[True][relabelled], labels[False][relabelled], atol=1e-4, rtol=0)


@pytest.mark.parametrize("filtering", [{"top_k": 20}, {"top_p": 0.8, "top_k": 0}])
def test_recomputed_labels_across_vocabularies_under_top_k_and_top_p(cross_pair, filtering):
    """A filtered request keeps the target's law filtered over its whole vocabulary (``adaptive.target_law``:
    a finite cut at each kept token); the recomputed labels are probabilities, and the head trains on them."""
    target, drafter, target_tokenizer, drafter_tokenizer = cross_pair
    engine = SpeculativeEngine(
        target, copy.deepcopy(drafter), target_tokenizer=target_tokenizer, drafter_tokenizer=drafter_tokenizer,
        config=EngineConfig(num_draft_tokens=4, adaptive=AdaptiveConfig(interval=NO_STEP, prior=0.8)),
    )  # fmt: skip
    batch = target_tokenizer(["def fibonacci(n):\n    return", "The café on the corner"], return_tensors="pt",
                             padding=True)  # fmt: skip
    torch.manual_seed(0)
    engine.generate(**batch, max_new_tokens=24, do_sample=True, eos_token_id=[], **filtering)
    learner, rows = engine.learner, list(engine.learner.pending)
    assert all(row.law is not None and row.law[:, 1].isfinite().all() for row in rows)
    seen = {}
    fit = learner._fit_head
    learner._fit_head = lambda hidden, inputs, labels, mask, recompute: (
        seen.update(labels=labels if mask is None else labels[mask])
        or fit(hidden, inputs, labels, mask, recompute)
    )
    learner._head_step(rows, recompute=True)
    labels = seen["labels"]
    assert labels.numel() > 20 and ((labels >= 0) & (labels <= 1)).all() and 0 < labels.mean() < 1
    assert learner.stats.head_steps > 0 and math.isfinite(learner.stats.head_loss)


@pytest.mark.parametrize(
    "sampling",
    [SamplingParams(0.0), SamplingParams(0.7), SamplingParams(1.0, top_k=5), SamplingParams(1.3, top_p=0.6),
     SamplingParams(0.8, top_k=8, top_p=0.9)],
    ids=["greedy", "T", "top_k", "top_p", "both"],
)  # fmt: skip
def test_target_law_reads_the_whole_vocabularys_law_at_the_mapped_ids(sampling):
    """``target_law``'s two numbers give, at the directly mapped ids, the target's law over its whole
    vocabulary (``sampling_probs_reference``: temperature, then top-k/top-p ranked over every token; one-hot
    at the argmax when greedy, zero where the argmax has no twin), not its law over the mapped ids: under
    exact match a drafted token's label is that probability."""
    generator = torch.Generator().manual_seed(5)
    n, vocab_t = 6, 40
    target_logits = torch.randn(n, vocab_t, generator=generator) * 2
    mapped = torch.randperm(vocab_t, generator=generator)[:24]  # drafter id i is target id mapped[i]
    target_logits[0, mapped] -= 10  # a row whose best tokens have no twin
    support, twins = torch.ones(24, dtype=torch.bool), torch.empty(2, 0, dtype=torch.int64)
    tokens = torch.randint(0, 24, (n,), generator=generator)
    tokens[:3] = target_logits[:3, mapped].argmax(-1)  # the best mapped id (row 0: not the argmax)
    law = target_law(target_logits, sampling)
    label = expected_acceptance(torch.zeros(n, 24), target_logits[:, mapped], support, twins, sampling, tokens,
                                exact_match=True, law=law)  # fmt: skip
    whole = sampling_probs_reference(target_logits, sampling.temperature, sampling.top_k, sampling.top_p)
    torch.testing.assert_close(label, whole[torch.arange(n), mapped[tokens]], atol=1e-6, rtol=1e-5)
    over_mapped = expected_acceptance(torch.zeros(n, 24), target_logits[:, mapped], support, twins, sampling,
                                      tokens, exact_match=True)  # fmt: skip
    assert (over_mapped - label).abs().max() > 0.05  # what the two numbers change


def test_untrained_head_predicts_its_prior():
    head = AcceptanceHead(16, blocks=2, prior=0.3)
    assert torch.allclose(head(torch.randn(5, 16)), torch.full((5,), 0.3), atol=1e-6)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: DistillConfig(rank=4), "rank"),
        (lambda: DistillConfig(interval=0), "interval"),
        (lambda: DistillConfig(lr=-1.0), "lr"),
        (lambda: DistillConfig(betas=(0.9, 1.5)), "betas"),
        (lambda: DistillConfig(target_modules=()), "target_modules"),
        (lambda: DistillConfig(target_modules=5), "target_modules"),
        (lambda: DistillConfig(target_modules=True), "target_modules"),
        (lambda: AdaptiveConfig(confidence_input=1), "confidence_input"),
        (lambda: AdaptiveConfig(gamma=1.0), "gamma"),
        (lambda: AdaptiveConfig(mode="both"), "mode"),
        (lambda: AdaptiveConfig(prior=0.0), "prior"),
        (lambda: EngineConfig(num_draft_tokens=2, adaptive=AdaptiveConfig(k_min=3)), "k_min"),
        (lambda: EngineConfig(distill="yes"), "distill"),
        (lambda: EngineConfig(in_flight_rounds=2), "in_flight_rounds"),
        (lambda: EngineConfig(distill=DistillConfig(), in_flight_rounds=0), "in_flight_rounds"),
        (lambda: DistillConfig(betas=None), "betas"),
        (lambda: DistillConfig(betas=0.9), "betas"),
        (lambda: AdaptiveConfig(k_min=True), "k_min"),
        (lambda: AdaptiveConfig(blocks=True), "blocks"),
        (lambda: EngineConfig(num_draft_tokens=True), "num_draft_tokens"),
        (lambda: EngineConfig(ngram_capacity=True), "ngram_capacity"),
        (lambda: EngineConfig(max_spelling=True), "max_spelling"),
        (lambda: EngineConfig(ngram_preseed="no"), "ngram_preseed"),
        # counts past what holds them: a deque's maxlen, a list's length
        (lambda: AdaptiveConfig(replay=2**63), r"`replay` must be at most \d+ \(the most rows a Python list"),
        (lambda: AdaptiveConfig(interval=sys.maxsize + 1), r"`interval` must be at most"),
        (lambda: DistillConfig(interval=2**63), r"`interval` must be at most \d+ \(the most rows"),
        (lambda: DistillConfig(lora_alpha=0), "`lora_alpha` must be a number > 0 or None, got 0"),
        (lambda: DistillConfig(weight_decay=-0.1), "`weight_decay` must be a number >= 0"),
        (lambda: DistillConfig(ngram_weight=float("nan")), "`ngram_weight` must be a number >= 0"),
        (lambda: DistillConfig(max_grad_norm=0.0), "`max_grad_norm` must be a number > 0 or None"),
        (lambda: AdaptiveConfig(lr=0.0), "`lr` must be a number > 0"),
        (lambda: AdaptiveConfig(weight_decay="0.1"), "`weight_decay` must be a number >= 0"),
        (lambda: AdaptiveConfig(reject_weight=-1.0), "`reject_weight` must be a number > 0"),
        (
            lambda: EngineConfig(adaptive=DistillConfig()),
            "`adaptive` must be an AdaptiveConfig or None, got DistillConfig",
        ),
        (lambda: EngineConfig(ngram_max_len=1), "`ngram_max_len` must be an int >= 2, got 1"),
    ],
)
def test_bad_configs_name_the_argument(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_large_workable_configs_are_accepted():
    """Up to the limits above, large values are taken: the config does not know the device."""
    AdaptiveConfig(replay=sys.maxsize, interval=sys.maxsize, head_steps=10**12, blocks=10**12)
    DistillConfig(interval=sys.maxsize)


@pytest.mark.parametrize("distill", [None, DistillConfig(rank=8, interval=1)])
def test_an_acceptance_head_larger_than_the_device_is_refused_before_anything_is_built(shared_pair, distill):
    """`blocks` whose weights alone outgrow the device's memory: refused at once by name (they were built one
    by one, for hours), before the drafter gets an adapter; a head that fits with a long replay serves."""
    target, drafter = shared_pair
    drafter = copy.deepcopy(drafter)
    modules = [type(m) for m in drafter.modules()]
    with pytest.raises(
        ValueError, match=r"`AdaptiveConfig.blocks`=1000000000000 needs [\d,]+ bytes for the acc"
    ):
        SpeculativeEngine(
            target, drafter, config=EngineConfig(distill=distill, adaptive=AdaptiveConfig(blocks=10**12))
        )
    assert [type(m) for m in drafter.modules()] == modules and not getattr(drafter, "peft_config", None)
    engine = SpeculativeEngine(target, drafter, config=EngineConfig(
        distill=distill, adaptive=AdaptiveConfig(blocks=3, replay=sys.maxsize, interval=1)))  # fmt: skip
    ids, mask = left_padded_prompts(VOCAB, [5, 8], seed=2)
    engine.generate(ids, attention_mask=mask, max_new_tokens=6)
    assert engine.learner.stats.head_steps > 0


# ------------------------------------------------------------------------------------------ recording
def test_recorded_rows_are_what_was_served(shared_pair):
    """Shared vocabulary, greedy: a row's context is prompt + output, its KL labels are the target's
    logits at each emitted token, and its head labels say whether the drafter's greedy choice held."""
    target, drafter = shared_pair
    engine = _engine(target, drafter, num_draft_tokens=3, distill=DistillConfig(interval=NO_STEP, rank=8))
    ids, mask = left_padded_prompts(VOCAB, [5, 9], seed=3)
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=12)
    examples = engine.learner.pending
    assert len(examples) == 2
    drafter_model = engine.drafter.model
    for row, example in enumerate(examples):
        prompt = ids[row][mask[row].bool()]
        sequence = torch.cat([prompt, out[row, ids.shape[1] :]])
        n = sequence.numel()
        assert torch.equal(example.ids[:n], sequence)
        assert (example.kl[: prompt.numel()] == -1).all() and not example.ce.any()
        assert example.kl[prompt.numel() : n].tolist() == list(range(12))
        with torch.no_grad():
            target_logits = target(sequence[None]).logits[0]
            drafter_choice = drafter_model(sequence[None]).logits[0].argmax(-1)
        torch.testing.assert_close(
            example.logits, target_logits[prompt.numel() - 1 : n - 1], atol=1e-4, rtol=1e-4
        )
        labelled = (~example.head.isnan()).nonzero()[:, 0]
        assert labelled.numel() > 0 and (labelled >= prompt.numel()).all()
        for slot in labelled.tolist():
            held = bool(drafter_choice[slot - 1] == example.ids[slot])
            assert example.head[slot].item() == float(held), slot
        # the token each label is about: the one drafted there (the committed one where it was not rejected)
        assert torch.equal(example.drafted[labelled], drafter_choice[labelled - 1])
        others = torch.ones(example.ids.numel(), dtype=torch.bool).index_fill(0, labelled, False)
        assert torch.equal(example.drafted[others], example.ids[others])


def test_cross_vocabulary_rows(cross_pair):
    """Across vocabularies every emitted target token leaves one KL label (it has a drafter twin) or
    cross-entropy labels on its drafter sub-tokens (an n-gram token), and the drafter context spells the
    output's bytes (a padding id of the target's vocabulary, past its tokenizer's ids, spells nothing and
    leaves no label)."""
    target, drafter, target_tokenizer, drafter_tokenizer = cross_pair
    engine = SpeculativeEngine(
        target, copy.deepcopy(drafter), target_tokenizer=target_tokenizer, drafter_tokenizer=drafter_tokenizer,
        config=EngineConfig(distill=DistillConfig(interval=NO_STEP, rank=8)),
    )  # fmt: skip
    prompts = ["def fibonacci(n):\n    return", "The café on the corner"]
    batch = target_tokenizer(prompts, return_tensors="pt", padding=True)
    out = engine.generate(**batch, max_new_tokens=16, eos_token_id=[])
    bridge = engine.bridge
    target_pieces, drafter_pieces = (
        token_bytes(target_tokenizer, target.config.vocab_size).pieces,
        token_bytes(drafter_tokenizer).pieces,
    )
    for row, example in enumerate(engine.learner.pending):
        emitted = out[row, batch.input_ids.shape[1] :]
        kl_rows = example.kl[example.kl >= 0]  # rows of example.logits, from the new token first_logit on
        first = example.first_logit
        direct = bridge.t2d[emitted] >= 0
        assert (kl_rows + first).tolist() == direct.nonzero()[:, 0].tolist()
        has_bytes = torch.tensor([target_pieces[i] is not None for i in emitted.tolist()])
        assert example.ce.sum() >= (~direct & has_bytes).sum()  # each n-gram token spans 2+ drafter tokens
        assert not (example.ce & (example.kl >= 0)).any()
        prompt = batch.input_ids[row][batch.attention_mask[row].bool()]
        spelled = b"".join(drafter_pieces[i] for i in example.ids.tolist())
        assert spelled.startswith(
            b"".join(target_pieces[i] or b"" for i in torch.cat([prompt, emitted]).tolist())
        )
        with torch.no_grad():
            sequence = torch.cat([prompt, emitted])
            logits = target(sequence[None]).logits[0, -emitted.numel() - 1 : -1]
        labels = logits[:, bridge.d2t.clamp_min(0).long()]
        # the rows the KL labels read, from the first to the last (a token before or after them without a twin,
        # an n-gram token or a padding id, has none)
        rows = example.logits.shape[0]
        assert kl_rows.numel() > 0, "a row of this batch has no token with a drafter twin: pick other prompts"
        assert int(kl_rows.min()) == 0 and rows == int(kl_rows.max()) + 1
        torch.testing.assert_close(example.logits, labels[first : first + rows], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- learning
def test_greedy_output_stays_exact_while_learning(shared_pair, cross_pair):
    target, drafter = shared_pair
    config = dict(
        num_draft_tokens=4,
        distill=DistillConfig(interval=2, rank=8, lr=1e-2),
        adaptive=AdaptiveConfig(interval=2, gamma=0.5),
    )
    engine = _engine(target, drafter, **config)
    for seed in range(4):
        ids, mask = left_padded_prompts(VOCAB, [4, 7], seed=seed)
        expected = target.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
        assert torch.equal(engine.generate(ids, attention_mask=mask, max_new_tokens=10), expected)
    assert engine.learner.stats.distill_steps == 4 and engine.learner.stats.head_steps > 0

    target, drafter, target_tokenizer, drafter_tokenizer = cross_pair
    engine = SpeculativeEngine(
        target, copy.deepcopy(drafter), target_tokenizer=target_tokenizer, drafter_tokenizer=drafter_tokenizer,
        config=EngineConfig(**config),
    )  # fmt: skip
    for prompt in ["def fibonacci(n):\n    return", "The café on the corner", "    x = [i for i in range("]:
        batch = target_tokenizer([prompt], return_tensors="pt")
        expected = target.generate(**batch, max_new_tokens=12, do_sample=False)
        assert torch.equal(engine.generate(**batch, max_new_tokens=12), expected)
    assert engine.learner.stats.distill_steps == 1


def test_distillation_moves_the_drafter_towards_the_target():
    """Served with sampling, the adapter learns: lower loss on the first rows, higher greedy acceptance."""
    target = tiny_model("llama", VOCAB, seed=5)
    with torch.no_grad():
        target.lm_head.weight.mul_(20)  # peaked next-token distributions, as trained models have
    drafter = perturbed_copy(target, 0.6, seed=6)
    engine = _engine(target, drafter, distill=DistillConfig(interval=8, rank=8, lr=1e-2))
    ids, mask = left_padded_prompts(VOCAB, [6, 6, 8, 8], seed=12)

    def loss_on(rows) -> float:
        with engine.learner.adapter.active(), torch.no_grad():
            part = engine.learner._run(rows, grad=False)
        return hybrid_distillation_loss(
            part.kl_logits, part.kl_targets, part.ce_logits, part.ce_tokens,
            engine.learner.support, engine.learner.twins, 0.2,
        ).item()  # fmt: skip

    engine.generate(ids, attention_mask=mask, max_new_tokens=16)
    greedy_before = engine.last_stats.acceptance_rate
    rows = list(engine.learner.pending)  # 4 rows: no step yet
    before = loss_on(rows)
    for _ in range(15):
        engine.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=True, temperature=1.0, top_k=0)
    assert engine.learner.stats.distill_steps == 8
    assert loss_on(rows) < 0.8 * before
    engine.generate(ids, attention_mask=mask, max_new_tokens=16)
    assert engine.last_stats.acceptance_rate > greedy_before + 0.1


def test_the_adapter_stays_on_its_engine(shared_pair):
    """The base drafter's weights never change; outside its engine the drafter is the base model; one
    drafter serving two targets carries one adapter for each."""
    target, drafter = shared_pair
    drafter = copy.deepcopy(drafter)
    base = {name: p.detach().clone() for name, p in drafter.named_parameters()}
    probe = torch.randint(3, VOCAB, (1, 9))
    with torch.no_grad():
        reference = drafter(probe).logits
    other_target = tiny_model("llama", VOCAB, seed=9)
    first = SpeculativeEngine(
        target, drafter, config=EngineConfig(distill=DistillConfig(interval=1, rank=8, lr=1e-2))
    )
    second = SpeculativeEngine(
        other_target, drafter, config=EngineConfig(distill=DistillConfig(interval=1, rank=8))
    )
    assert first.learner.adapter.name != second.learner.adapter.name
    ids, mask = left_padded_prompts(VOCAB, [5], seed=2)
    for _ in range(3):
        first.generate(ids, attention_mask=mask, max_new_tokens=8)
    with torch.no_grad():
        assert torch.equal(drafter(probe).logits, reference)
        with first.learner.adapter.active():
            unmerged = drafter(probe).logits
        with first.learner.adapter.serving():  # served merged: the same model
            torch.testing.assert_close(drafter(probe).logits, unmerged, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(unmerged, reference)
        with second.learner.adapter.active():
            assert torch.equal(drafter(probe).logits, reference)  # untrained: B = 0
    for name, p in drafter.named_parameters():
        if name in base:
            assert torch.equal(p, base[name]) and p.requires_grad, name
    with pytest.raises(ValueError, match="adapter_name"):
        SpeculativeEngine(target, drafter, config=EngineConfig(distill=DistillConfig(adapter_name=first.learner.adapter.name)))  # fmt: skip


# ------------------------------------------------------------------------------------------ in flight
class _Windows:
    """Spies on a request's in-flight windows (``Recorder.window``): the recorder, and each window."""

    def __init__(self, monkeypatch, transform=None):
        from omnidraft_fast.experience import Recorder

        self.recorder, self.windows = None, []
        original = Recorder.window

        def window(recorder, d_tokens, d_start, d_lengths, *args, **kwargs):
            handed = recorder.handed.clone()
            out = original(recorder, d_tokens, d_start, d_lengths, *args, **kwargs)
            self.recorder, self.d_tokens, self.d_start = recorder, d_tokens, d_start
            self.windows.append((handed, d_lengths.clone(), out))
            return out if transform is None else transform(out)

        monkeypatch.setattr(Recorder, "window", window)


@pytest.mark.parametrize("vocabulary", ["shared", "cross"])
def test_in_flight_windows_hand_each_label_over_once(shared_pair, cross_pair, monkeypatch, vocabulary):
    """Every few rounds a fixed-shape window of each row's new labels goes to the learners. Over a
    request, the windows and the rows handed over at its end carry every label the rounds recorded,
    each once, with the values recorded (also across vocabularies, where one round can commit many
    drafter slots per row: the window's width must hold them all). A row's first slot is predicted by
    nothing: a label there (a prompt with no drafter spelling) is left out, as in a whole-context pass."""
    spy = _Windows(monkeypatch)
    tail = []  # the rows handed over at the request's end, as the recorder cut them (one per row)
    original = OnlineLearner.observe
    monkeypatch.setattr(
        OnlineLearner, "observe", lambda learner, rows: (tail.extend(rows), original(learner, rows))
    )
    config = dict(num_draft_tokens=3, distill=DistillConfig(interval=NO_STEP, rank=8, lr=1e-3),
                  adaptive=AdaptiveConfig(interval=NO_STEP), in_flight_rounds=2)  # fmt: skip
    if vocabulary == "shared":
        target, drafter = shared_pair
        engine = _engine(target, drafter, **config)
        ids, mask = left_padded_prompts(VOCAB, [5, 8], seed=10)
        engine.generate(ids, attention_mask=mask, max_new_tokens=20)
    else:
        target, drafter, target_tokenizer, drafter_tokenizer = cross_pair
        engine = SpeculativeEngine(target, copy.deepcopy(drafter), target_tokenizer=target_tokenizer,
                                   drafter_tokenizer=drafter_tokenizer, config=EngineConfig(**config))  # fmt: skip
        batch = target_tokenizer(
            ["def fibonacci(n):\n    return", "The café on"], return_tensors="pt", padding=True
        )
        # A third row whose prompt has no drafter spelling: a target id the tokenizer has no bytes for.
        ids = torch.cat(
            [batch.input_ids, torch.full_like(batch.input_ids[:1], target_tokenizer.pad_token_id)]
        )
        mask = torch.cat([batch.attention_mask, torch.zeros_like(batch.attention_mask[:1])])
        ids[-1, -1], mask[-1, -1] = target.config.vocab_size - 1, 1
        assert not engine.bridge.spell_for_drafter(ids[-1, -1:]).numel()
        engine.generate(ids, attention_mask=mask, max_new_tokens=24)
    recorder = spy.recorder
    assert len(spy.windows) >= 3 and len(tail) == (2 if vocabulary == "shared" else 3)
    ends = recorder.handed  # where the rows ended: the hand-over at the end moved it there
    for row, example in enumerate(tail):
        slots, first = recorder.kl.shape[1] - 1, int(spy.d_start[row])
        seen = {"kl": torch.zeros(slots, dtype=torch.long), "ce": torch.zeros(slots, dtype=torch.long),
                "head": torch.zeros(slots, dtype=torch.long)}  # fmt: skip
        for handed, lengths, window in spy.windows:
            slot = window.slots[row] + 1  # the labelled slots, padding included
            valid = (slot < lengths[row]) & (slot > first)
            new = lengths[row] - max(int(handed[row]), first + 1)
            assert bool(valid.sum() == new)  # the whole new context, nothing cut
            for name, has in (("kl", window.kl[row]), ("ce", window.ce[row]), ("head", window.has_head[row])):
                seen[name].index_add_(0, slot[has], torch.ones(int(has.sum()), dtype=torch.long))
            assert torch.equal(window.tokens[row][valid], spy.d_tokens[row, slot[valid]])
            at = slot[window.kl[row]]
            expected = recorder.logits[row, recorder.kl[row, at]].float()
            assert torch.equal(window.targets[row][window.kl[row]].float(), expected)
            assert torch.equal(
                window.head[row][window.has_head[row]], recorder.head[row, slot[window.has_head[row]]]
            )
        assert all(not seen[name][first] for name in seen)  # no window trains on a row's first slot
        assert int(ends[row]) - example.ids.numel() == first  # the example starts there too
        for name, has in (("kl", example.kl >= 0), ("ce", example.ce), ("head", ~example.head.isnan())):
            seen[name][first + 1 :][: has.numel() - 1] += has[1:].long()  # its first slot: no prediction
        recorded = {"kl": recorder.kl[row, :slots] >= 0, "ce": recorder.ce[row, :slots],
                    "head": ~recorder.head[row, :slots].isnan()}  # fmt: skip
        for name in recorded:
            recorded[name][first] = False
        for name in seen:
            assert seen[name].max() <= 1, name  # never twice
            assert torch.equal(seen[name].bool(), recorded[name]), name  # every label once
        assert recorded["kl"].any() and recorded["head"].any()


def test_rows_with_no_label_left_are_not_trained_on_again(shared_pair, monkeypatch):
    """With a window every round, the in-flight steps take every label: the request's rows, handed over at
    its end with none left, cost no training pass and stay out of the head's replay (where they would push
    labelled rows out). Without in-flight steps the same rows are trained on, then replayed."""
    target, drafter = shared_pair
    ids, mask = left_padded_prompts(VOCAB, [5, 8], seed=10)
    passes = []
    original = OnlineLearner._run
    monkeypatch.setattr(
        OnlineLearner, "_run", lambda learner, *a, **k: passes.append(1) or original(learner, *a, **k)
    )
    for in_flight_rounds, trained in ((1, False), (None, True)):
        passes.clear()
        engine = _engine(target, drafter, num_draft_tokens=3, distill=DistillConfig(interval=1, rank=8, lr=1e-2),
                         adaptive=AdaptiveConfig(interval=1), in_flight_rounds=in_flight_rounds)  # fmt: skip
        out = engine.generate(ids, attention_mask=mask, max_new_tokens=20)
        assert torch.equal(out, target.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False))
        learner = engine.learner
        assert learner.stats.rows == 2 and not learner.pending
        assert bool(passes) == trained and len(learner.replay) == (2 if trained else 0)
        assert learner.stats.distill_steps >= 1 and learner.stats.head_steps >= 1


def test_handed_rows_keep_only_the_target_logits_their_labels_read(shared_pair, monkeypatch):
    """A row handed over at a request's end holds the target's logits at the emitted tokens its KL labels
    read, not at every token: after in-flight hand-overs, at those of the last few rounds only."""
    target, drafter = shared_pair
    ids, mask = left_padded_prompts(VOCAB, [5, 8], seed=11)
    handed = []
    original = OnlineLearner.observe
    monkeypatch.setattr(
        OnlineLearner, "observe", lambda learner, rows: handed.append(rows) or original(learner, rows)
    )
    for in_flight_rounds in (3, None):
        handed.clear()
        engine = _engine(target, drafter, num_draft_tokens=3, distill=DistillConfig(interval=NO_STEP, rank=8),
                         in_flight_rounds=in_flight_rounds)  # fmt: skip
        engine.generate(ids, attention_mask=mask, max_new_tokens=30)
        (rows,) = handed
        for row in rows:
            read = row.kl[row.kl >= 0]
            assert row.logits.shape[0] == (int(read.max()) + 1 if len(read) else 0)
            assert len(read) == 0 or int(read.min()) == 0  # from the first row a label reads
        kept = sum(row.logits.shape[0] for row in rows)
        if in_flight_rounds is None:
            assert kept >= 2 * 30 - 2  # every emitted token's (each row's KL labels read nearly all)
        else:
            assert kept <= 2 * 3 * 4  # the rounds since the last in-flight hand-over, at most


def test_an_in_flight_window_scores_like_the_whole_context(shared_pair, monkeypatch):
    """The window's loss, from the drafter attending to its serving cache for the context, equals the
    loss of a teacher-forced pass over each row's whole context on the same labels (untrained adapter)."""
    target, drafter = shared_pair
    engine = _engine(target, drafter, num_draft_tokens=3, in_flight_rounds=3,
                     distill=DistillConfig(interval=NO_STEP, rank=8))  # fmt: skip
    learner = engine.learner
    compared = []
    original = learner.step_in_flight

    def step_in_flight(window):
        if not compared:  # the first window: compare before the adapter moves
            rows = []
            for row in range(window.inputs.shape[0]):
                slot = window.slots[row] + 1
                valid = window.kl[row] | window.ce[row]
                first = int(slot[0]) - 1  # the window's first input slot
                start = int(engine.drafter.start[row])
                ids = spy.d_tokens[row, start : int(slot[valid].max()) + 1]
                kl = torch.full_like(ids, -1)
                ce = torch.zeros_like(ids, dtype=torch.bool)
                kl[slot[window.kl[row]] - start] = torch.arange(int(window.kl[row].sum()))
                ce[slot[window.ce[row]] - start] = True
                rows.append(Example(ids=ids, kl=kl, ce=ce, head=torch.full(ids.shape, torch.nan),
                                    logits=window.targets[row][window.kl[row]], drafted=ids,
                                    sampling=SamplingParams()))  # fmt: skip
                assert first > start  # the window starts after the context it reads from the cache
            with learner.adapter.active(), torch.no_grad():
                part = learner._run(rows, grad=False)
            whole = hybrid_distillation_loss(part.kl_logits, part.kl_targets, part.ce_logits, part.ce_tokens,
                                             learner.support, learner.twins, 0.2)  # fmt: skip
            cache = [t.clone() for t in engine.drafter.cache.keys + engine.drafter.cache.values]
            original(window)
            compared.append((float(learner.losses[0]), float(whole)))
            # scoring read the serving cache and wrote nothing into it
            assert all(torch.equal(a, b) for a, b in zip(cache, engine.drafter.cache.keys + engine.drafter.cache.values, strict=True))  # fmt: skip
            return
        original(window)

    spy = _Windows(monkeypatch)
    learner.step_in_flight = step_in_flight
    ids, mask = left_padded_prompts(VOCAB, [5, 8], seed=13)
    engine.generate(ids, attention_mask=mask, max_new_tokens=20)
    ((window_loss, whole_loss),) = compared
    assert window_loss == pytest.approx(whole_loss, rel=1e-5) and whole_loss > 0
    assert engine.learner.stats.distill_steps >= 2


def _no_labels(window):
    off = torch.zeros_like(window.kl)
    return dataclasses.replace(window, kl=off, ce=off, has_head=off)


def _not_finite(window):  # every label there, but the target's logits and the head's labels are NaN
    nan = torch.full_like(window.targets, torch.nan)
    return dataclasses.replace(window, targets=nan, head=torch.full_like(window.head, torch.nan))


@pytest.mark.parametrize(("transform", "mode"), [(_no_labels, "alternating"), (_not_finite, "joint")])
def test_an_in_flight_step_without_usable_labels_changes_nothing(shared_pair, monkeypatch, transform, mode):
    """A window with no labels (say, every row done) or with non-finite ones (the gradient is not
    finite) leaves the adapter, the head and their optimisers as they were, without the host having
    looked: the steps are gated on the device. The request's output stays exact."""
    spy = _Windows(monkeypatch, transform=transform)
    target, drafter = shared_pair
    engine = _engine(target, drafter, num_draft_tokens=3, in_flight_rounds=1,
                     distill=DistillConfig(interval=NO_STEP, rank=8, lr=1e-2),
                     adaptive=AdaptiveConfig(interval=NO_STEP, mode=mode))  # fmt: skip
    adapter = [p.detach().clone() for p in engine.learner.adapter.parameters]
    head = [p.detach().clone() for p in engine.learner.head.parameters()]
    ids, mask = left_padded_prompts(VOCAB, [5, 8], seed=14)
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=12)
    assert torch.equal(out, target.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False))
    assert len(spy.windows) >= 3
    stats = engine.learner.stats
    assert stats.distill_steps == 0 and stats.head_steps == 0 and math.isnan(stats.distill_loss)
    assert all(torch.equal(a, b) for a, b in zip(adapter, engine.learner.adapter.parameters, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(head, engine.learner.head.parameters(), strict=True))
    assert all(not m.any() for m in engine.learner.optimizer.exp_avg + engine.learner.head_optimizer.exp_avg)


def test_a_step_on_non_finite_labels_between_requests_is_skipped(shared_pair):
    """Rows whose target logits are not finite make a non-finite gradient: the learner skips the step
    (adapter, moments untouched; the head, with no labels, is not stepped either) and the engine serves
    on, exactly. Rows with no labels at all make no step."""
    target, drafter = shared_pair
    engine = _engine(target, drafter, num_draft_tokens=3, distill=DistillConfig(interval=2, rank=8, lr=1e-2),
                     adaptive=AdaptiveConfig(interval=2, mode="joint"))  # fmt: skip
    learner = engine.learner
    learner.enabled = False  # the request below teaches nothing by itself
    ids, mask = left_padded_prompts(VOCAB, [5, 8], seed=15)
    engine.generate(ids, attention_mask=mask, max_new_tokens=8)
    learner.enabled = True
    before = [p.detach().clone() for p in [*learner.adapter.parameters, *learner.head.parameters()]]
    rows = []
    for _ in range(2):
        ids_row = torch.randint(VOCAB, (12,))
        labels = torch.arange(12) >= 6
        rows.append(Example(ids=ids_row, kl=torch.where(labels, torch.arange(12) - 6, -1), ce=torch.zeros(12, dtype=torch.bool),
                            head=torch.full((12,), torch.nan), logits=torch.full((6, VOCAB), torch.nan), drafted=ids_row,
                            sampling=SamplingParams()))  # fmt: skip
    learner.observe(rows)
    stats = learner.stats
    assert stats.rows == 2 and stats.distill_steps == 0 and stats.head_steps == 0
    unlabelled = [dataclasses.replace(row, kl=torch.full_like(row.kl, -1)) for row in rows]
    learner.observe(unlabelled)  # rows with no label at all: no step either (no decay, no momentum)
    assert learner.stats.rows == 4 and learner.stats.distill_steps == 0
    after = [*learner.adapter.parameters, *learner.head.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert not any(m.isnan().any() for m in learner.optimizer.exp_avg + learner.head_optimizer.exp_avg)
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=8)
    assert torch.equal(out, target.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False))


def test_in_flight_updates_reach_the_running_request(shared_pair):
    """With an update every 2 rounds, the drafter's merged weights change in the middle of one request
    (in place), and the target's greedy output does not."""
    target, drafter = shared_pair
    engine = _engine(target, drafter, distill=DistillConfig(interval=1, rank=8, lr=1e-2), in_flight_rounds=2)
    layer = engine.learner.adapter.layers[0].get_base_layer()  # the drafter's own module, serving
    seen = []
    handle = layer.register_forward_pre_hook(
        lambda module, args: seen.append((layer.weight.data_ptr(), float(layer.weight.sum())))
    )
    ids, mask = left_padded_prompts(VOCAB, [5, 8], seed=11)
    try:
        out = engine.generate(ids, attention_mask=mask, max_new_tokens=24)
    finally:
        handle.remove()
    assert torch.equal(out, target.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False))
    steps = engine.learner.stats.distill_steps
    assert steps >= 3  # mid-request steps, and the one at the end
    serving = [s for s in seen if s[0] != layer.weight.data_ptr()]  # drafting reads the merged copy
    assert len({ptr for ptr, _ in serving}) == 1  # one tensor, rewritten in place
    assert len({round(total, 5) for _, total in serving}) >= steps - 1


def test_paused_learning_records_nothing(shared_pair):
    target, drafter = shared_pair
    engine = _engine(
        target, drafter, distill=DistillConfig(interval=1, rank=8), adaptive=AdaptiveConfig(interval=1)
    )
    engine.learner.enabled = False
    ids, mask = left_padded_prompts(VOCAB, [5, 7], seed=9)
    engine.generate(ids, attention_mask=mask, max_new_tokens=8)
    assert engine.learner.stats.rows == 0 and engine.learner.stats.distill_steps == 0
    engine.learner.enabled = True
    engine.generate(ids, attention_mask=mask, max_new_tokens=8)
    assert engine.learner.stats.rows == 2 and engine.learner.stats.distill_steps == 1


def test_adapter_on_no_layer_is_refused(shared_pair):
    """Modules LoRA cannot adapt are refused, and the drafter is left as it was: also where peft had put
    its layers into earlier matches (q_proj) before failing on a later one (an RMSNorm)."""
    target, drafter = shared_pair
    drafter = copy.deepcopy(drafter)
    keys = list(drafter.state_dict())
    for modules in (("no_such_proj",), ("q_proj", "input_layernorm"), ("q_proj", "embed_tokens")):
        with pytest.raises(ValueError, match="target_modules"):
            SpeculativeEngine(
                target, drafter, config=EngineConfig(distill=DistillConfig(target_modules=modules))
            )
        assert list(drafter.state_dict()) == keys
        assert type(drafter.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    SpeculativeEngine(
        target, drafter, config=EngineConfig(distill=DistillConfig(rank=8))
    )  # nothing left over
    with pytest.raises(ValueError, match="adapter_name"):
        DistillConfig(adapter_name="a.b")  # peft would fail on it as a module name
    assert torch.equal(SpeculativeEngine(target, drafter).generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4),
                       target.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False))  # fmt: skip


@pytest.mark.parametrize("prior, per_round", [(0.05, 1.0), (0.999, 5.0)])
def test_draft_length_follows_the_head(shared_pair, prior, per_round):
    target, drafter = shared_pair
    engine = _engine(
        target, drafter, num_draft_tokens=5,
        adaptive=AdaptiveConfig(interval=NO_STEP, prior=prior, gamma=0.7, k_min=1),
    )  # fmt: skip
    ids, mask = left_padded_prompts(VOCAB, [4, 6], seed=4)
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=14)
    assert torch.equal(out, target.generate(ids, attention_mask=mask, max_new_tokens=14, do_sample=False))
    stats = engine.last_stats
    assert stats.drafted_per_round == pytest.approx(per_round)


@pytest.mark.parametrize("mode", ["alternating", "joint"])
def test_the_head_learns_the_acceptance_rate(shared_pair, mode):
    """A head that starts at 0.95 learns that this drafter is accepted far less often, and drafts less."""
    target, drafter = shared_pair
    engine = _engine(
        target, drafter, num_draft_tokens=6,
        distill=DistillConfig(interval=2, rank=8, lr=1e-4),
        adaptive=AdaptiveConfig(interval=2, prior=0.95, mode=mode, lr=1e-2, head_steps=8),
    )  # fmt: skip
    adapter_before = [p.detach().clone() for p in engine.learner.adapter.parameters]
    ids, mask = left_padded_prompts(VOCAB, [5, 7], seed=8)
    engine.generate(ids, attention_mask=mask, max_new_tokens=12)
    first = engine.last_stats
    rate = first.acceptance_rate
    for _ in range(10):
        engine.generate(ids, attention_mask=mask, max_new_tokens=12)
    last = engine.last_stats
    hidden = torch.randn(64, engine.learner.head.out.in_features)
    assert rate < 0.7
    assert engine.learner.head(hidden).mean().item() < 0.9
    assert last.drafted_per_round < first.drafted_per_round
    moved = any(
        not torch.equal(a, b) for a, b in zip(adapter_before, engine.learner.adapter.parameters, strict=True)
    )
    assert moved


def test_learned_state_survives_a_restart(shared_pair, tmp_path):
    target, drafter = shared_pair
    config = dict(distill=DistillConfig(interval=1, rank=8, lr=1e-2), adaptive=AdaptiveConfig(interval=1))
    engine = _engine(target, drafter, **config)
    ids, mask = left_padded_prompts(VOCAB, [6], seed=1)
    for _ in range(2):
        engine.generate(ids, attention_mask=mask, max_new_tokens=8)
    engine.save_state(tmp_path / "state.safetensors")

    restored = _engine(target, drafter, **config)
    restored.load_state(tmp_path / "state.safetensors")
    for ours, theirs in zip(
        engine.learner.adapter.parameters, restored.learner.adapter.parameters, strict=True
    ):
        assert torch.equal(ours, theirs)
    for ours, theirs in zip(
        engine.learner.head.parameters(), restored.learner.head.parameters(), strict=True
    ):
        assert torch.equal(ours, theirs)
    # The optimisers' moments and step counts came back too: both engines go on training the adapter alike
    # (the head's replay buffer, served rows, is not part of the state).
    assert restored.learner.stats.distill_steps == engine.learner.stats.distill_steps >= 2
    for twin in (engine, restored):
        torch.manual_seed(3)
        twin.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True)
    pairs = zip(engine.learner.adapter.parameters, restored.learner.adapter.parameters, strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)

    plain = _engine(target, drafter)
    with pytest.raises(ValueError, match="LoRA adapter"):
        plain.load_state(tmp_path / "state.safetensors")
    other_rank = _engine(target, drafter, distill=DistillConfig(rank=16), adaptive=AdaptiveConfig())
    with pytest.raises(ValueError, match="rank"):
        other_rank.load_state(tmp_path / "state.safetensors")
    other_alpha = _engine(
        target, drafter, distill=DistillConfig(rank=8, lora_alpha=32), adaptive=AdaptiveConfig()
    )
    with pytest.raises(ValueError, match=r"lora_alpha / rank = 1\.0, this engine's is 4\.0"):
        other_alpha.load_state(tmp_path / "state.safetensors")  # the same tensors at 4x their saved effect
    other_head = _engine(target, drafter, distill=DistillConfig(rank=8), adaptive=AdaptiveConfig(blocks=1))
    fresh = [p.clone() for p in other_head.learner.adapter.parameters]
    with pytest.raises(ValueError, match=r"acceptance head .* does not fit"):
        other_head.load_state(tmp_path / "state.safetensors")
    # a state that does not fit is not loaded in part: the adapter, which would fit, is untouched
    assert all(torch.equal(a, b) for a, b in zip(fresh, other_head.learner.adapter.parameters, strict=True))
    # paths that hold no state are named, with the fix; nothing is loaded from them either
    from safetensors.torch import save_file

    (tmp_path / "text.safetensors").write_text("not a state")
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "weights.safetensors"))  # a model's file, say
    for path, error, match in (
        (tmp_path / "text.safetensors", ValueError, "is not a safetensors file"),
        (
            tmp_path / "weights.safetensors",
            ValueError,
            "holds no engine state .*give the file save_state wrote",
        ),
        (tmp_path, FileNotFoundError, "is not a file: give the file save_state wrote"),
        (tmp_path / "missing.safetensors", FileNotFoundError, "is not a file"),
    ):
        with pytest.raises(error, match=match):
            other_head.load_state(path)
    assert all(torch.equal(a, b) for a, b in zip(fresh, other_head.learner.adapter.parameters, strict=True))
    with pytest.raises(IsADirectoryError, match=r"is a folder: give a file name, e.g. .*state.safetensors"):
        engine.save_state(tmp_path)
    assert torch.equal(
        other_rank.generate(ids, attention_mask=mask, max_new_tokens=6),
        target.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False),
    )  # still usable


# ------------------------------------------------------------------------------ head with confidence input
def test_untrained_head_with_confidence_input_predicts_the_confidence():
    from omnidraft_fast.adaptive import DraftLength, confidence_logit

    head = AcceptanceHead(16, blocks=2, confidence_input=True)
    logits = torch.randn(5, 30) * 3
    ids = torch.tensor([0, 4, 9, 29, 17])
    confidence = logits.softmax(-1)[torch.arange(5), ids]
    torch.testing.assert_close(head(torch.randn(5, 16), confidence_logit(logits, ids)), confidence)
    # The stopping rule then stops a row once the product of its confidences falls below 1 - gamma.
    length = DraftLength(head, 2, gamma=0.5, k_min=1, device=torch.device("cpu"))
    length.reset(torch.tensor([False, False]))
    for step, c in enumerate(([0.9, 0.6], [0.9, 0.8], [0.5, 0.9]), start=1):
        c = torch.tensor(c)
        length.step(step, torch.zeros(2, 16), None, torch.log(c) - torch.log1p(-c))
    # products: row 0 0.9, 0.81, 0.405 (stops at 3); row 1 0.6, 0.48 (stops at 2)
    assert length.stopped.tolist() == [True, True] and length.drafted.tolist() == [3, 2]


@pytest.mark.parametrize(
    "config",
    [{"mode": "alternating"}, {"mode": "joint"}, {"mode": "alternating", "in_flight": True}],
)
def test_a_head_with_confidence_input_learns_in_every_mode(shared_pair, config, tmp_path):
    """Every learner path feeds the head its confidence input: the head steps, its weight on the
    confidence moves, the output stays the target's, and the state round-trips."""
    target, drafter = shared_pair
    adaptive = AdaptiveConfig(interval=1, mode=config["mode"], confidence_input=True, lr=1e-2, head_steps=2)
    extra = {"in_flight_rounds": 2} if config.get("in_flight") else {}
    engine = _engine(target, drafter, num_draft_tokens=4, distill=DistillConfig(interval=1, rank=8),
                     adaptive=adaptive, **extra)  # fmt: skip
    ids, mask = left_padded_prompts(VOCAB, [5, 7], seed=8)
    for _ in range(3):
        out = engine.generate(ids, attention_mask=mask, max_new_tokens=12)
        assert torch.equal(out, target.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False))
    stats = engine.learner.stats
    assert stats.head_steps > 0 and math.isfinite(stats.head_loss)
    assert engine.learner.head.confidence_weight.item() != 1.0
    engine.save_state(tmp_path / "state.safetensors")
    restored = _engine(target, drafter, num_draft_tokens=4, distill=DistillConfig(interval=1, rank=8),
                       adaptive=adaptive, **extra)  # fmt: skip
    restored.load_state(tmp_path / "state.safetensors")
    assert restored.learner.head.confidence_weight.item() == engine.learner.head.confidence_weight.item()
    without = _engine(target, drafter, distill=DistillConfig(rank=8), adaptive=AdaptiveConfig())
    with pytest.raises(ValueError, match=r"acceptance head .* does not fit"):
        without.load_state(tmp_path / "state.safetensors")


# ------------------------------------------------------------------- the caller's drafter, left as it was
def test_the_drafter_stays_the_callers_model(shared_pair, tmp_path):
    """While an engine learns on it and after, the drafter is the caller's model: its own modules and
    state_dict keys (save_pretrained / from_pretrained / load_state_dict round-trip), no peft config, and
    no adapter left behind by engines that are gone."""
    import gc

    from transformers import AutoModelForCausalLM

    target, drafter = shared_pair
    drafter = copy.deepcopy(drafter)
    keys = list(drafter.state_dict())
    modules = [type(m) for m in drafter.modules()]
    checkpoint = {name: t.clone() for name, t in drafter.state_dict().items()}
    probe = torch.randint(3, VOCAB, (1, 9))
    with torch.no_grad():
        reference = drafter(probe).logits
    ids, mask = left_padded_prompts(VOCAB, [5, 8], seed=2)
    for cuda_graphs in (False, True):
        engine = SpeculativeEngine(target, drafter, config=EngineConfig(
            distill=DistillConfig(interval=1, rank=8, lr=1e-2), in_flight_rounds=2, cuda_graphs=cuda_graphs))  # fmt: skip
        for _ in range(2):
            engine.generate(ids, attention_mask=mask, max_new_tokens=12)
        assert engine.learner.stats.distill_steps > 0
        assert list(drafter.state_dict()) == keys and [type(m) for m in drafter.modules()] == modules
        assert not getattr(drafter, "peft_config", None)
        drafter.save_pretrained(tmp_path / "drafter")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "drafter", use_kernels=False).eval()
        drafter.load_state_dict(checkpoint)
        with torch.no_grad():
            assert torch.equal(reloaded(probe).logits, reference)
            assert torch.equal(drafter(probe).logits, reference)
        del engine
        gc.collect()
    assert drafter.num_parameters() == sum(t.numel() for t in checkpoint.values() if t.dim())  # nothing added


def test_a_drafter_with_lora_layers_of_its_own_is_refused(shared_pair):
    """Online distillation would switch the caller's own adapter off: refused, the drafter untouched."""
    from peft import LoraConfig, inject_adapter_in_model

    target, drafter = shared_pair
    drafter = copy.deepcopy(drafter)
    inject_adapter_in_model(
        LoraConfig(r=8, target_modules=["q_proj"], init_lora_weights=False), drafter, adapter_name="mine"
    )
    probe = torch.randint(3, VOCAB, (1, 9))
    with torch.no_grad():
        reference = drafter(probe).logits
    with pytest.raises(ValueError, match=r"LoRA layers of its own.*merge_and_unload"):
        SpeculativeEngine(target, drafter, config=EngineConfig(distill=DistillConfig(rank=8)))
    with torch.no_grad():
        assert torch.equal(drafter(probe).logits, reference)
    SpeculativeEngine(target, drafter, config=EngineConfig(adaptive=AdaptiveConfig()))  # no adapter: fine


def test_a_drafters_own_peft_config_is_left_as_it_was(shared_pair):
    """peft leaves its config on a model it puts an adapter in; the engine's adapter takes its own out again
    and leaves a config the drafter held before (an adapter it has since unloaded) in place."""
    from peft import LoraConfig

    target, drafter = shared_pair
    drafter = copy.deepcopy(drafter)
    theirs = {"old": LoraConfig(r=4, target_modules=["k_proj"])}
    drafter.peft_config = theirs
    ids, mask = left_padded_prompts(VOCAB, [5, 8], seed=2)
    engine = SpeculativeEngine(
        target, drafter, config=EngineConfig(distill=DistillConfig(rank=8, interval=1))
    )
    assert drafter.peft_config is theirs and list(theirs) == ["old"]
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert torch.equal(out, target.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False))
    assert (
        engine.learner.stats.distill_steps == 1 and drafter.peft_config is theirs and list(theirs) == ["old"]
    )


def test_an_adapter_on_the_targets_weights_is_refused(shared_pair):
    """A drafter that is the target, or shares a layer with it, would serve its merged LoRA weights to the
    target too (the target's law would change): refused; without distillation it drafts as before."""
    target, drafter = shared_pair
    sharing = copy.deepcopy(drafter)
    sharing.model.layers[0] = target.model.layers[0]
    ids, mask = left_padded_prompts(VOCAB, [5, 8], seed=2)
    expected = target.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    for model in (target, sharing):
        keys = list(model.state_dict())
        with pytest.raises(ValueError, match="shares its weight with the target"):
            SpeculativeEngine(target, model, config=EngineConfig(distill=DistillConfig(rank=8)))
        assert list(model.state_dict()) == keys
        engine = SpeculativeEngine(target, model, config=EngineConfig(adaptive=AdaptiveConfig(interval=1)))
        for _ in range(2):
            assert torch.equal(engine.generate(ids, attention_mask=mask, max_new_tokens=10), expected)


def test_an_adapter_on_a_tied_weight_is_refused():
    """GPT-2's LM head is its embedding: a merged LoRA head served would change the embedding too."""
    target = tiny_model("llama", VOCAB, seed=5)
    drafter = tiny_model("gpt2", VOCAB, seed=6, tied=True)
    assert drafter.lm_head.weight is drafter.transformer.wte.weight
    keys = list(drafter.state_dict())
    for modules in (("lm_head", "c_attn"), ("wte",)):
        with pytest.raises(ValueError, match="shares its weight with another of its modules"):
            SpeculativeEngine(target, drafter, config=EngineConfig(distill=DistillConfig(rank=8, target_modules=modules)))  # fmt: skip
        assert list(drafter.state_dict()) == keys


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_a_drafter_cast_after_learning_serves_on(shared_pair, cuda_graphs):
    """The caller casts the drafter of a trained engine (and releases, as documented): it serves and
    learns on, the adapter in fp32, the merged copies rebuilt in the new dtype."""
    target, drafter = shared_pair
    drafter = copy.deepcopy(drafter)
    engine = SpeculativeEngine(target, drafter, config=EngineConfig(
        distill=DistillConfig(interval=1, rank=8, lr=1e-2), cuda_graphs=cuda_graphs))  # fmt: skip
    ids, mask = left_padded_prompts(VOCAB, [5, 8], seed=2)
    expected = target.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    engine.generate(ids, attention_mask=mask, max_new_tokens=10)
    drafter.to(torch.bfloat16)
    engine.release()
    for _ in range(2):
        assert torch.equal(engine.generate(ids, attention_mask=mask, max_new_tokens=10), expected)
    assert engine.learner.stats.distill_steps == 3
    assert all(p.dtype == torch.float32 for p in engine.learner.adapter.parameters)


@pytest.mark.parametrize("arch", ["gpt_neox", "opt", "falcon", "gpt_bigcode", "phi3", "qwen3"])
def test_learning_on_drafters_of_other_architectures(arch):
    """Distillation, the head and in-flight steps on a drafter of another family: the adapter finds its
    projections, the output is the target's, the drafter's weights and modules are as they were."""
    from test_model_support import model

    target = tiny_model("llama", VOCAB, seed=5)
    drafter = model(arch, seed=4)
    state = {name: t.clone() for name, t in drafter.state_dict().items()}
    ids, mask = left_padded_prompts(VOCAB, [5, 8], seed=2)
    expected = target.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    engine = SpeculativeEngine(target, drafter, config=EngineConfig(
        distill=DistillConfig(interval=1, rank=8, lr=1e-2), adaptive=AdaptiveConfig(interval=1),
        in_flight_rounds=2))  # fmt: skip
    assert len(engine.learner.adapter.layers) >= 4
    for _ in range(2):
        assert torch.equal(engine.generate(ids, attention_mask=mask, max_new_tokens=10), expected)
    assert engine.learner.stats.distill_steps > 2
    after = drafter.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], v) for k, v in state.items())


def test_learning_from_requests_that_reach_the_drafters_position_limit():
    """Requests up to the position limit of a drafter with a table of absolute positions (GPT-2): the
    learner's teacher-forced pass positions a row's context as the rounds do, clamped to the limit (a
    finished row's context also holds the drafts its last round accepted past its end), instead of indexing
    past the table (an IndexError after the request, its output lost)."""
    target = tiny_model("gpt2", VOCAB, seed=31, max_positions=48)
    drafter = perturbed_copy(target, 0.3, seed=32)
    engine = _engine(target, drafter, num_draft_tokens=3,
                     distill=DistillConfig(interval=1, rank=8), adaptive=AdaptiveConfig(interval=1))  # fmt: skip
    ids, mask = left_padded_prompts(VOCAB, [10, 7], seed=0)
    for new in (38, 37):
        expected = target.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
        assert torch.equal(engine.generate(ids, attention_mask=mask, max_new_tokens=new), expected)
    assert engine.learner.stats.distill_steps == 2 and engine.learner.stats.head_steps > 0


def test_a_drafted_token_with_no_target_token_is_labelled_rejected():
    """A round drafts y0 y1 y2; y0 maps to target 5 and is accepted, y1 has no target token, so the draft
    stops there (proposal -1, span_end = source + 1) and verification rejects that position and emits the
    recovered token 6. The head drafted y1 from the committed context at slot 5: its label there is 0
    (always rejected), not missing. Verification's accept_probs at the stop may be anything (the kernel
    leaves positions it does not score unwritten)."""
    vocab_d, vocab_t, k = 12, 10, 3
    recorder = Recorder(
        batch=1,
        drafter_slots=16,
        spelling_width=2,
        emitted=8,
        label_map=torch.arange(vocab_d) % vocab_t,
        direct=torch.ones(vocab_t, dtype=torch.bool),
        dtype=torch.float32,
        handed=torch.tensor([4]),
    )
    recorder.record(
        target_logits=torch.randn(1, k + 1, vocab_t),
        draft_ids=torch.tensor([[7, 9, 4]]),
        proposal=torch.tensor([[5, -1, -1]]),
        output_tokens=torch.tensor([[5, 6, -1, -1]]),
        num_accepted=torch.tensor([1]),
        accept_probs=torch.tensor([[1.0, 0.7, 0.3]]),
        source=torch.tensor([[0, 1, 1]]),
        span_end=torch.tensor([[1, 2, 1]]),
        slots=torch.tensor([[1, 1, 0, 0]]),  # y0 kept in slot 4, the recovered token spelled into slot 5
        split=torch.zeros(1, k, dtype=torch.bool),
        kept=torch.tensor([2]),
        generated=torch.tensor([0]),
        d_lengths=torch.tensor([4]),
    )
    assert recorder.head[0, 4].item() == 1.0  # y0: accepted
    assert recorder.head[0, 5].item() == 0.0  # y1: the stop, always rejected
    assert recorder.drafted[0, 5].item() == 9  # the label is about the drafted y1
    assert recorder.head[0, 6:16].isnan().all()  # nothing past the round's committed slots
