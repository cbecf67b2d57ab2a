"""The slot KV cache: writing, rolling back and rewriting gives the logits of a fresh forward, per row."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from conftest import ARCHITECTURES, tiny_model

import omnidraft_fast
from omnidraft_fast.models import CausalLM

VOCAB = 64


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_rollback_then_rewrite_matches_a_fresh_forward(arch):
    model = tiny_model(arch, VOCAB, seed=5, dtype=torch.float64)
    if arch == "mistral":
        model.config.sliding_window = 6  # shorter than the sequence: the window is in the mask
    runner = CausalLM(model, "model")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 14), generator=generator)
    start = torch.tensor([1, 4])  # row 1 has three slots of left padding
    runner.begin(start, max_slots=20)
    runner.forward(ids[:, :10], torch.arange(10).expand(2, 10))
    rejected = torch.randint(0, VOCAB, (2, 4), generator=generator)
    runner.forward(rejected, torch.arange(10, 14).expand(2, 4))  # a drafted block, mostly rejected
    ids[1, 10] = rejected[1, 0]  # row 1 keeps its first drafted token; row 0 keeps none
    slots = torch.tensor([[10, 11, 12], [11, 12, 13]])  # ragged rollback: each row rewrites from its length
    logits = runner.forward(ids.gather(1, slots), slots)
    runner.end()
    for row in range(2):
        fresh = model(ids[row : row + 1, start[row] : slots[row, -1] + 1]).logits[0, -3:]
        torch.testing.assert_close(logits[row], fresh, rtol=0, atol=1e-10)


def test_engines_do_not_travel_with_copies_of_the_model():
    target = tiny_model("llama", VOCAB, seed=0)
    ids = torch.randint(0, VOCAB, (1, 4))
    omnidraft_fast.generate(target, ids, drafter=target, max_new_tokens=3)
    assert len(target._omnidraft_engines) == 1
    assert len(copy.deepcopy(target)._omnidraft_engines) == 0
    assert len(pickle.loads(pickle.dumps(target))._omnidraft_engines) == 0
