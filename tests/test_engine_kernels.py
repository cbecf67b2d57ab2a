"""The engine with its Triton kernels instead of the torch references, on CPU tensors under the Triton
interpreter: every kernel the rounds launch gets the engine's real arguments (shared and cross
vocabularies, n-gram merges, cascade rules, sampling filters, prompt lookup), and the outputs equal the references'.
On a GPU the kernels run anyway; this catches plumbing mistakes before a GPU session does."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import left_padded_prompts, perturbed_copy, tiny_model

from omnidraft_fast import CascadeConfig, EngineConfig, SpeculativeEngine, ops

pytestmark = [
    pytest.mark.kernels,
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1",
        reason="runs the kernels on CPU tensors: needs TRITON_INTERPRET=1",
    ),
]
VOCAB = 96


LAUNCHERS = (
    "sample_triton",
    "verify_triton",
    "match_triton",
    "translate_triton",
    "ngram_insert_triton",
    "ngram_lookup_triton",
    "lookup_triton",
)


def _with_and_without_kernels(monkeypatch, make_engine, requests):
    """Outputs of ``requests`` on a fresh engine with the references, then with the kernels; returns both
    lists and how often each kernel launcher ran."""
    outputs, launches = [], dict.fromkeys(LAUNCHERS, 0)
    for kernels in (False, True):
        with monkeypatch.context() as patch:
            if kernels:
                patch.setattr(ops, "runs_kernels", lambda tensor: True)
                for name in LAUNCHERS:
                    launcher = getattr(ops, name)

                    def counted(*args, _name=name, _launcher=launcher, **kwargs):
                        launches[_name] += 1
                        return _launcher(*args, **kwargs)

                    patch.setattr(ops, name, counted)
            engine = make_engine()
            runs = []
            for seed, request in enumerate(requests):
                torch.manual_seed(seed)
                runs.append(engine.generate(**request, return_dict_in_generate=True))
            outputs.append(runs)
    for reference, kernel in zip(*outputs, strict=True):
        assert torch.equal(reference.sequences, kernel.sequences)
        assert reference.stats.accepted == kernel.stats.accepted
        assert reference.stats.deferred == kernel.stats.deferred
    return outputs, launches


def test_shared_vocabulary(monkeypatch):
    target = tiny_model("llama", VOCAB, seed=31, eos_token_id=4)
    drafter = perturbed_copy(target, 0.3, seed=32)
    ids, mask = left_padded_prompts(VOCAB, [5, 3], seed=6)
    request = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 6, "eos_token_id": 4}
    # One round (3 drafts, a rejection in one row) for top-k/top-p: interpreted, their threshold searches
    # cost ~1.7 s a sample and ~7 s a verification (about half that since tests/triton_interpreter.py), and 6
    # tokens' later rounds took 33 s of the test's 50.
    one_round = {**request, "max_new_tokens": 3}
    _, launches = _with_and_without_kernels(
        monkeypatch,
        lambda: SpeculativeEngine(target, drafter),
        [
            request,
            {**request, "do_sample": True, "top_k": 0},
            {**one_round, "do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.9},
            {**request, "do_sample": True, "top_k": 0, "cascade": CascadeConfig("token_v2", (0.2, 0.6))},
        ],
    )
    assert launches["sample_triton"] > 0 and launches["verify_triton"] > 0
    assert launches["match_triton"] > 0  # greedy verifies by exact match


@pytest.mark.parametrize("translation", ["omnidraft", "tli", "exact"])
def test_cross_vocabulary(monkeypatch, cross_pair, translation):
    target, drafter, target_tokenizer, drafter_tokenizer = cross_pair
    prompts = target_tokenizer(["def parse(text):\n    return", "x = [i"], return_tensors="pt", padding=True)
    request = {**prompts, "max_new_tokens": 8}
    # a cascade under logits processing reads q' only where the processed target logits are finite
    processing = {"suppress_tokens": list(range(10, 40)), "repetition_penalty": 1.3}
    cascade = [] if translation == "exact" else [
        {**request, "max_new_tokens": 4, "do_sample": True, "top_k": 0, "cascade": CascadeConfig("chow", 0.9), **processing}
    ]  # fmt: skip
    _, launches = _with_and_without_kernels(
        monkeypatch,
        lambda: SpeculativeEngine(
            target, drafter, target_tokenizer=target_tokenizer, drafter_tokenizer=drafter_tokenizer,
            config=EngineConfig(translation=translation, ngram_capacity=1 << 12),
        ),
        [request, {**request, "do_sample": True, "top_k": 0}, *cascade],
    )  # fmt: skip
    assert launches["sample_triton"] > 0 and launches["translate_triton"] > 0
    if translation != "exact":
        assert launches["verify_triton"] > 0
    if translation == "omnidraft":  # the n-gram table: seeded, read by translation, written by the rounds
        assert launches["ngram_insert_triton"] > 0
        assert launches["match_triton"] > 0  # greedy verifies by exact match
    if translation == "exact":  # every request, sampled too, verifies by exact match
        assert launches["match_triton"] >= 2 and launches["verify_triton"] == 0


def test_prompt_lookup(monkeypatch):
    """No drafter: the lookup kernel drafts from the rows' contexts (repeating prompts, so drafts occur),
    verified by exact match."""
    target = tiny_model("llama", VOCAB, seed=33, eos_token_id=4)
    ids = torch.tensor([[9, 10, 11, 12, 9, 10, 11, 12, 9, 10], [0, 0, 21, 22, 23, 21, 22, 23, 21, 22]])
    mask = (torch.arange(10) >= torch.tensor([[0], [2]])).long()
    request = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 8, "prompt_lookup_num_tokens": 3}
    outputs, launches = _with_and_without_kernels(
        monkeypatch,
        lambda: SpeculativeEngine(target, None),
        [request, {**request, "do_sample": True, "top_k": 0}],
    )
    assert launches["lookup_triton"] > 0 and launches["match_triton"] > 0
    assert outputs[1][0].stats.proposed > 0  # the kernel's drafts reached verification
