"""The slot KV cache: writing, rolling back and rewriting gives the logits of a fresh forward, per row."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from conftest import ARCHITECTURES, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

import omnidraft_fast
from omnidraft_fast import models
from omnidraft_fast.models import CausalLM

VOCAB = 64


@pytest.mark.parametrize("lean", [True, False])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_rollback_then_rewrite_matches_a_fresh_forward(arch, lean):
    """Both forwards (lean.py's and transformers')."""
    model = tiny_model(arch, VOCAB, seed=5, dtype=torch.float64)
    if arch == "mistral":
        model.config.sliding_window = 6  # shorter than the sequence: the window is in the mask
    runner = CausalLM(model, "model", lean=lean)
    assert runner.lean == lean
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_mask_is_one_where_over_constants_the_cache_keeps(monkeypatch, dtype):
    """A forward's additive mask (0 where a query sees a slot: from its row's start, or from itself for a
    padding query, up to itself; the dtype's lowest elsewhere) costs 9 ops with the positions: the slots
    viewed once, and one ``where`` over two 0-d constants that the cache keeps, so that a kept cache's
    captured stages read the same tensors in a later request."""
    model = tiny_model("llama", VOCAB, seed=5, dtype=dtype)
    runner = CausalLM(model, "model", lean=True)
    start = torch.tensor([1, 4])
    runner.begin(start, max_slots=8)
    seen = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    def lean_forward(model, ids, positions, mask, cache, last_only):
        seen.append(("forward", mask, positions))
        raise StopIteration

    monkeypatch.setattr(models._lean, "forward", lean_forward)
    slots = torch.tensor([[2, 3], [2, 5]])  # row 1's slot 2 is padding: it sees only itself
    ids = torch.zeros(2, 2, dtype=torch.int64)
    with Ops(), pytest.raises(StopIteration):
        runner.forward(ids, slots)
    *ops, (_, mask, positions) = seen
    assert ops == ["unsqueeze", "sub", "clamp", "view", "le", "bitwise_and", "eq", "bitwise_or", "where"]
    keys = torch.arange(8)
    visible = ((keys >= start[:, None, None]) | (keys == slots[..., None])) & (keys <= slots[..., None])
    expected = torch.full((2, 2, 8), torch.finfo(dtype).min, dtype=dtype).masked_fill(visible, 0.0)
    assert mask.dtype == dtype and torch.equal(mask[:, 0], expected)
    assert positions.tolist() == [[1, 2], [0, 1]]
    values = runner.cache.mask_values
    runner.begin(start, max_slots=8, cache=runner.cache)  # a kept cache: the same constants
    assert all(a is b for a, b in zip(runner.cache.mask_values, values, strict=True))


def test_engines_do_not_travel_with_copies_of_the_model():
    target = tiny_model("llama", VOCAB, seed=0)
    ids = torch.randint(0, VOCAB, (1, 4))
    omnidraft_fast.generate(target, ids, drafter=target, max_new_tokens=3)
    assert len(target._omnidraft_engines) == 1
    assert len(copy.deepcopy(target)._omnidraft_engines) == 0
    assert len(pickle.loads(pickle.dumps(target))._omnidraft_engines) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lean_forward_is_transformers_forward(arch, dtype):
    """lean.py's forward gives transformers' logits and hidden states, step by step with rollbacks, with a
    LoRA adapter injected into the projections, and in the teacher-forced read-only pass under autograd."""
    from peft import LoraConfig, inject_adapter_in_model

    model = tiny_model(arch, VOCAB, seed=7, dtype=dtype)
    modules = ["c_attn", "c_fc"] if arch == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    inject_adapter_in_model(LoraConfig(r=4, target_modules=modules, fan_in_fan_out=arch == "gpt2"), model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)  # peft starts B at zero: make the adapter count
    runners = {lean: CausalLM(model, "model", lean=lean) for lean in (True, False)}
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 12), generator=generator)
    steps = [
        (ids[:, :6], torch.arange(6).expand(2, 6), False),  # prefill
        (ids[:, 6:9], torch.arange(6, 9).expand(2, 3), True),  # a block
        (ids[:, 7:8], torch.tensor([[7], [7]]), True),  # a rollback
        (ids[:, 8:12], torch.tensor([[8, 9, 10, 11], [8, 9, 10, 11]]), False),
    ]
    for runner in runners.values():
        runner.begin(torch.tensor([1, 3]), max_slots=16)
    for tokens, slots, last_only in steps:
        (lean_logits, lean_hidden), (logits, hidden) = (
            runners[lean].forward(tokens, slots, last_only=last_only, hidden=True) for lean in (True, False)
        )
        torch.testing.assert_close(lean_logits, logits, **tolerance)
        torch.testing.assert_close(lean_hidden, hidden, **tolerance)
    with torch.enable_grad():
        scored = [
            runners[lean].score(ids[:, 10:12], torch.tensor([[10, 11], [10, 11]])) for lean in (True, False)
        ]
        torch.testing.assert_close(scored[0][0], scored[1][0], **tolerance)
        lora = next(p for name, p in model.named_parameters() if "lora_A" in name)
        grads = [torch.autograd.grad(logits.float().square().sum(), lora)[0] for logits, _ in scored]
    if dtype == torch.float32:
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-4)
    else:  # bf16 rounds both paths: each lies about 2% (in norm) from the float64 gradient
        assert (grads[0] - grads[1]).norm() <= 0.05 * grads[1].norm()


def test_forward_hooks_run_transformers_forward():
    """A model with forward hooks on it runs transformers' forward, which runs them; a model with
    accelerate's hooks never runs the lean forward."""
    model = tiny_model("llama", VOCAB, seed=3)
    runner = CausalLM(model, "model")
    calls = []
    handle = model.register_forward_hook(lambda module, args, out: calls.append(out.logits.shape))
    runner.begin(torch.tensor([1]), max_slots=8)
    runner.forward(torch.tensor([[5, 6]]), torch.tensor([[1, 2]]))
    assert calls == [(1, 2, VOCAB)]
    handle.remove()
    runner.forward(torch.tensor([[7]]), torch.tensor([[3]]))
    assert len(calls) == 1
    model.model.layers[0]._hf_hook = object()  # what accelerate leaves on a module it dispatched
    assert not CausalLM(model, "model").lean


@pytest.mark.parametrize("where", ["layer", "attention", "global"])
def test_hooks_inside_the_model_run_as_in_transformers(where):
    """A hook on a decoder layer or an attention module (activation steering, say), or a global module hook,
    is run as transformers runs it: the lean forward calls those modules as plain code, so such a request
    takes transformers' forward, and the output is the steered model's own."""
    target = tiny_model("llama", VOCAB, seed=3)
    drafter = tiny_model("llama", VOCAB, seed=4, layers=1)
    ids = torch.tensor([[5, 9, 17, 33, 2, 8]])
    plain = target.generate(ids, max_new_tokens=16, do_sample=False)

    def steer(module, args, out):
        if where == "global" and module is not target.model.layers[1]:
            return None
        if isinstance(out, tuple):
            return (out[0] + 0.8, *out[1:])
        return out + 0.8

    if where == "global":
        handle = torch.nn.modules.module.register_module_forward_hook(steer)
    else:
        layer = target.model.layers[1]
        handle = (layer if where == "layer" else layer.self_attn).register_forward_hook(steer)
    try:
        steered = target.generate(ids, max_new_tokens=16, do_sample=False)
        out = omnidraft_fast.SpeculativeEngine(target, drafter).generate(ids, max_new_tokens=16)
    finally:
        handle.remove()
    assert not torch.equal(steered, plain)  # the hook matters
    assert torch.equal(out, steered)
    # without the hook the next request runs the lean forward again
    runner = CausalLM(target, "model")
    runner.begin(torch.tensor([1]), max_slots=8)
    assert runner.lean and runner._lean_now
