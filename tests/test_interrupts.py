"""A Ctrl-C (any exception) landing anywhere in a request reaches the caller as itself and leaves the caller's
models, torch and the engine as they were: a distilling engine's swap of the drafter's weights, its LoRA
layers put in for a training step, and on the CPU (``cuda_graphs``: ``ReplayGraph``) the recorder's dispatch
mode and torch.Tensor's host reads."""

from __future__ import annotations

import pytest
import torch
from conftest import left_padded_prompts, tiny_model

from omnidraft_fast import DistillConfig, EngineConfig, SpeculativeEngine, distill, graphs

GREEDY = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
HOST_READS = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy", "__array__")}


def _pair():
    return tiny_model("llama", 96, seed=0), tiny_model("llama", 96, seed=1, hidden=16, layers=1)


def _interrupting(monkeypatch, when):
    """LoraAdapter._serve raises KeyboardInterrupt at the call for which ``when(on, n)`` holds (n counts calls)."""
    original = distill.LoraAdapter._serve
    calls = []

    def serve(self, on):
        calls.append(on)
        if when(on, len(calls)):
            raise KeyboardInterrupt("Ctrl-C")
        return original(self, on)

    monkeypatch.setattr(distill.LoraAdapter, "_serve", serve)
    return lambda: monkeypatch.setattr(distill.LoraAdapter, "_serve", original)


def _distilling(**config):
    """A distilling engine on a fresh pair: (engine, the drafter, its own weights, prompt ids, mask)."""
    target, drafter = _pair()
    own = {name: p.detach().clone() for name, p in drafter.named_parameters()}
    torch.manual_seed(0)
    engine = SpeculativeEngine(target, drafter, config=EngineConfig(**config))
    return engine, drafter, own, *left_padded_prompts(96, [7, 5])


def test_an_interrupted_restore_does_not_leave_merged_weights_in_the_drafter(monkeypatch):
    engine, drafter, own, ids, mask = _distilling(distill=DistillConfig(interval=1, rank=8, lr=1e-2))
    for _ in range(3):  # the adapter learns: its merge differs from the drafter's own weights
        expected = engine.generate(ids, attention_mask=mask, **GREEDY)
    restore = _interrupting(monkeypatch, lambda on, n: not on)  # as the request ends
    with pytest.raises(KeyboardInterrupt):
        engine.generate(ids, attention_mask=mask, **GREEDY)
    restore()
    for _ in range(2):
        assert torch.equal(engine.generate(ids, attention_mask=mask, **GREEDY), expected)
        changed = [n for n, p in drafter.named_parameters() if not torch.equal(p, own[n])]
        assert not changed, f"the drafter's own weights were replaced: {changed}"


def test_an_interrupt_in_the_in_flight_re_merge_reaches_the_caller_as_itself(monkeypatch):
    engine, drafter, own, ids, mask = _distilling(
        distill=DistillConfig(interval=1, rank=8), in_flight_rounds=2
    )
    expected = engine.generate(ids, attention_mask=mask, **GREEDY)
    # calls: serving (True), the first in-flight step's pause (False) and re-merge (True): interrupt the latter
    restore = _interrupting(monkeypatch, lambda on, n: on and n == 3)
    with pytest.raises(KeyboardInterrupt):
        engine.generate(ids, attention_mask=mask, **GREEDY)
    restore()
    assert all(torch.equal(p, own[n]) for n, p in drafter.named_parameters())
    assert torch.equal(engine.generate(ids, attention_mask=mask, **GREEDY), expected)


def test_an_interrupt_as_a_training_step_ends_leaves_no_lora_layer_in_the_drafter(monkeypatch):
    from peft.tuners.lora import LoraLayer

    engine, drafter, _, ids, mask = _distilling(distill=DistillConfig(interval=1, rank=8))
    expected = engine.generate(ids, attention_mask=mask, **GREEDY)
    original = distill.LoraAdapter._detach
    fired = []

    def detach(self):  # the first call is interrupted as it begins (a Ctrl-C landing there)
        if not fired:
            fired.append(True)
            raise KeyboardInterrupt("Ctrl-C")
        return original(self)

    monkeypatch.setattr(distill.LoraAdapter, "_detach", detach)
    with pytest.raises(KeyboardInterrupt):
        engine.generate(ids, attention_mask=mask, **GREEDY)  # its training step, after the rounds
    assert not any(isinstance(m, LoraLayer) for m in drafter.modules())
    assert torch.equal(engine.generate(ids, attention_mask=mask, **GREEDY), expected)


def _interrupt_once(monkeypatch, owner, name):
    original = getattr(owner, name)

    def interrupted(*args, **kwargs):
        monkeypatch.setattr(owner, name, original)
        raise KeyboardInterrupt("Ctrl-C")

    monkeypatch.setattr(owner, name, interrupted)


@pytest.mark.parametrize("where", ["exit", "install"])
def test_an_interrupted_recording_leaves_the_thread_as_it_was(monkeypatch, where):
    target = tiny_model("llama", 96, seed=0)
    engine = SpeculativeEngine(target, tiny_model("llama", 96, seed=1, hidden=16, layers=1),
                               config=EngineConfig(cuda_graphs=True))  # fmt: skip
    ids, mask = left_padded_prompts(96, [7, 5])
    expected = target.generate(ids, attention_mask=mask, **GREEDY)
    if where == "exit":  # as the recording of the round ends
        _interrupt_once(monkeypatch, graphs.ReplayGraph, "__exit__")
    else:  # while the host reads are being replaced, the first replaced already
        calls = []
        original = graphs._refusing

        def refusing(name, method):
            calls.append(name)
            if len(calls) == 2:
                raise KeyboardInterrupt("Ctrl-C")
            return original(name, method)

        monkeypatch.setattr(graphs, "_refusing", refusing)
    with pytest.raises(KeyboardInterrupt):
        engine.generate(ids, attention_mask=mask, **GREEDY)
    monkeypatch.undo()
    assert torch._C._len_torch_dispatch_stack() == 0
    assert all(getattr(torch.Tensor, name) is method for name, method in HOST_READS.items())
    assert not graphs._RECORDING
    assert torch.equal(engine.generate(ids, attention_mask=mask, **GREEDY), expected)
    assert all(getattr(torch.Tensor, name) is method for name, method in HOST_READS.items())


class _GoneStreamer:
    """A streamer whose consumer goes away: after the prompt (``puts=1``) or at the end; every call then
    fails."""

    def __init__(self, puts: int | None = 1):
        self.puts, self.ended = puts, 0

    def put(self, value):
        if self.puts is not None and self.puts == 0:
            raise ConnectionError("put: the consumer went away")
        self.puts = None if self.puts is None else self.puts - 1

    def end(self):
        self.ended += 1
        raise ConnectionError("end: the consumer went away")


def test_a_failed_request_raises_its_own_error_when_the_streamers_end_fails_too():
    """end() is called after a failed request too (a TextIteratorStreamer's consumer is let go); an error
    of its own then is a warning, not the caller's exception (it replaced the request's)."""
    target, drafter = _pair()
    engine = SpeculativeEngine(target, drafter)
    ids, mask = left_padded_prompts(96, [7])
    streamer = _GoneStreamer()
    with (
        pytest.warns(RuntimeWarning, match=r"streamer's end\(\) raised ConnectionError: end: the consumer"),
        pytest.raises(ConnectionError, match=r"^put: the consumer went away$"),
    ):
        engine.generate(ids, attention_mask=mask, streamer=streamer, **GREEDY)
    assert streamer.ended == 1
    # after a request that ran, an error of end() is the caller's
    with pytest.raises(ConnectionError, match=r"^end: the consumer"):
        engine.generate(ids, attention_mask=mask, streamer=_GoneStreamer(puts=None), **GREEDY)
    assert torch.equal(engine.generate(ids, attention_mask=mask, **GREEDY),
                       target.generate(ids, attention_mask=mask, **GREEDY))  # fmt: skip
