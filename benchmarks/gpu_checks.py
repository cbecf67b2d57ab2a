"""GPU checks that are not unit tests (run by ``benchmarks/gpu_suite.sh``; CUDA only).

    python benchmarks/gpu_checks.py kernels   # every Triton kernel once on a small case (for compute-sanitizer)
    python benchmarks/gpu_checks.py syncs     # engine rounds under torch.cuda.set_sync_debug_mode("error")

``syncs`` runs whole requests on the embedded zoo (shared and cross vocabulary, greedy and sampled, a
cascade rule) with every round inside sync-debug "error" mode: a host synchronisation inside a round
raises. The one allowed read per round (done / invalid / table size / longest row) happens between rounds,
outside it; with an adaptive draft length (an acceptance head, a confidence threshold) each draft step and
the rest of the round are checked, the stop-flag read between them allowed, and so is prompt lookup's read
of the round's longest draft between the lookup and the rest. Engines that learn in flight
(``EngineConfig(in_flight_rounds=...)``) have their learning step checked too.
"""

from __future__ import annotations

import copy
import sys

import torch
from omnidraft_fast.kernels.cascade import RULES
from omnidraft_fast.kernels.proposal import CrossProposal

from omnidraft_fast import AdaptiveConfig, CascadeConfig, DistillConfig, EngineConfig, SpeculativeEngine, ops
from omnidraft_fast.ngram import NGramTable


def kernels() -> None:
    device = torch.device("cuda")
    generator = torch.Generator(device).manual_seed(0)
    batch, k, vocab, vocab_d = 3, 4, 1000, 700
    logits = torch.randn(batch, vocab, device=device, generator=generator)
    noise = torch.empty_like(logits).exponential_(generator=generator)
    for temperature, top_k, top_p in ((0.0, 0, 1.0), (1.0, 0, 1.0), (0.8, 50, 0.9)):
        for probs in (True, False):  # the distribution written, or the ids alone
            ops.sample(logits, noise, temperature=temperature, top_k=top_k, top_p=top_p, probs=probs)
    table = NGramTable(256, 4, device=device)
    keys = torch.randint(0, vocab_d, (300, 4), device=device, generator=generator)
    keys[:, 3] = -1
    table.insert(keys, torch.randint(0, vocab, (300,), device=device, generator=generator))
    table.lookup(keys)
    d2t = torch.randint(-1, vocab, (vocab_d,), device=device, generator=generator, dtype=torch.int32)
    draft = torch.randint(0, vocab_d, (batch, k), device=device, generator=generator)
    target_ids, _, source, span_end = ops.translate(draft, d2t, table=table.tensors)
    t2d = torch.full((vocab,), -1, dtype=torch.int32, device=device)
    t2d[d2t[d2t >= 0].long()] = (d2t >= 0).nonzero()[:, 0].int()
    q = torch.rand(batch, k, vocab_d, device=device, generator=generator).softmax(-1)
    target_logits = torch.randn(batch, k + 1, vocab, device=device, generator=generator, dtype=torch.bfloat16)
    for rule in RULES:
        ops.verify(
            target_logits, target_ids, q, torch.rand(batch, k, device=device, generator=generator),
            noise, temperature=1.0, rule=torch.full((batch,), RULES.index(rule), device=device),
            alpha=torch.full((batch,), 0.3, device=device), cross=CrossProposal(draft, source, span_end, d2t, t2d),
        )  # fmt: skip
    uniforms = torch.rand(batch, k, device=device, generator=generator)
    # Verification by exact match.
    for temperature, top_k, top_p in ((0.0, 0, 1.0), (1.0, 0, 1.0), (0.8, 50, 0.9)):
        match_noise = torch.empty_like(target_logits, dtype=torch.float32).exponential_(generator=generator)
        ops.verify(target_logits, target_ids, None, uniforms, None if temperature == 0 else match_noise,
                   temperature=temperature, top_k=top_k, top_p=top_p, exact_match=True)  # fmt: skip
    # Prompt lookup's draft: rows of a few ids (matches of every length), left padding, one empty row.
    tokens = torch.randint(0, 3, (batch, 64), device=device, generator=generator)
    start = torch.tensor([0, 5, 9], device=device)
    ops.lookup(tokens, start, torch.tensor([64, 40, 9], device=device), k, 3)
    torch.cuda.synchronize()
    print("kernels: all ran")


def syncs() -> None:
    from omnidraft_fast.zoo import load

    zoo = load("code-pair", device="cuda")
    ids = zoo.target_tokenizer(["def parse(text):\n", "Question: Tom has 3 apples"], return_tensors="pt",
                               padding=True).to("cuda")  # fmt: skip
    cross = {"target_tokenizer": zoo.target_tokenizer, "drafter_tokenizer": zoo.drafter_tokenizer}
    learning = {"in_flight_rounds": 2, "distill": DistillConfig(interval=1)}
    # (engine, the methods checked, the requests' extra arguments)
    cases = {
        "shared": (
            SpeculativeEngine(zoo.target, zoo.drafter_shared),
            ["rounds.run"],
            [*_REQUESTS, _PROCESSED_CASCADE],
        ),
        "cross omnidraft": (
            SpeculativeEngine(zoo.target, zoo.drafter_cross, **cross),
            ["rounds.run"],
            _REQUESTS,
        ),
        "cross tli": (
            SpeculativeEngine(zoo.target, zoo.drafter_cross, config=EngineConfig(translation="tli"), **cross),
            ["rounds.run"],
            _REQUESTS,
        ),
        # The in-flight learning step (LoRA forward, backward, clipping, AdamW, merge) is sync-free too.
        "shared, learning in flight": (
            SpeculativeEngine(zoo.target, copy.deepcopy(zoo.drafter_shared), config=EngineConfig(**learning)),
            ["rounds.run", "_learn_in_flight"],
            _REQUESTS[:2],
        ),
        "cross, learning in flight": (
            SpeculativeEngine(
                zoo.target, copy.deepcopy(zoo.drafter_cross), config=EngineConfig(**learning), **cross
            ),
            ["rounds.run", "_learn_in_flight"],
            _REQUESTS[:2],
        ),
        # With an adaptive draft length a round reads the stop flags between draft steps (SPEC §5): each
        # draft step and the rest of the round are checked instead of the whole round.
        "shared, adaptive + learning in flight": (
            SpeculativeEngine(
                zoo.target,
                copy.deepcopy(zoo.drafter_shared),
                config=EngineConfig(**learning, adaptive=AdaptiveConfig(interval=1)),
            ),
            ["rounds._draft_step", "rounds._finish", "_learn_in_flight"],
            _REQUESTS[:2],
        ),
        "cross, confidence threshold": (
            SpeculativeEngine(
                zoo.target, zoo.drafter_cross, config=EngineConfig(confidence_threshold=0.4), **cross
            ),
            ["rounds._draft_step", "rounds._finish"],
            _REQUESTS,
        ),
        # Prompt lookup reads the round's longest draft between the lookup and the rest (its width).
        "prompt lookup": (
            SpeculativeEngine(zoo.target, None, config=EngineConfig(num_draft_tokens=8)),
            ["rounds._lookup", "rounds._finish"],
            [kwargs for kwargs in _REQUESTS if "cascade" not in kwargs],
        ),
    }
    for name, (engine, methods, requests) in cases.items():
        for method in methods:
            owner, attribute = (
                (engine.rounds, method[7:]) if method.startswith("rounds.") else (engine, method)
            )
            setattr(owner, attribute, _sync_checked(getattr(owner, attribute)))
        for kwargs in requests:
            engine.generate(**ids, max_new_tokens=24, **kwargs)
            print(f"syncs: {name} {kwargs or 'greedy'}: no host sync inside {' or '.join(methods)}")


_REQUESTS = (
    {},
    {"do_sample": True, "top_k": 20},
    {"cascade": CascadeConfig("token_v3", 0.3)},
    {"repetition_penalty": 1.2, "min_new_tokens": 8, "output_scores": True, "return_dict_in_generate": True},
    {"do_sample": True, "top_p": 0.9, "min_p": 0.05, "typical_p": 0.95, "bad_words_ids": [[5, 6], [7]],
     "sequence_bias": {(9,): 1.5}, "exponential_decay_length_penalty": (4, 1.2), "num_return_sequences": 2},
)  # fmt: skip


# One vocabulary only: a cascade over both models' processed laws (the drafter's logits processed per draft step).
_PROCESSED_CASCADE = {"do_sample": True, "cascade": CascadeConfig("chow", 0.5), "repetition_penalty": 1.2,
                      "suppress_tokens": [3], "min_new_tokens": 8}  # fmt: skip


def _sync_checked(function):
    """``function`` run under ``torch.cuda.set_sync_debug_mode("error")``: a host sync inside raises."""

    def checked(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return function(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    return checked


if __name__ == "__main__":
    checks = {"kernels": kernels, "syncs": syncs}
    if len(sys.argv) != 2 or sys.argv[1] not in checks:
        sys.exit(
            f"usage: python {sys.argv[0]} {{{'|'.join(checks)}}}  (each check's docstring says what it runs)"
        )
    checks[sys.argv[1]]()
