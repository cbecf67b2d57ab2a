"""Several threads on shared engines and models (``locks.py``): as transformers' generate() allows."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import perturbed_copy, tiny_model

import omnidraft_fast
from omnidraft_fast import DistillConfig, EngineConfig, SpeculativeEngine
from omnidraft_fast.graphs import CaptureError, ReplayGraph

VOCAB = 96


def _in_threads(work, count: int) -> list:
    """Run ``work(i)`` for i < count in threads started together; return their results (or raise the first
    error)."""
    start = threading.Barrier(count)
    results, errors = [None] * count, []

    def run(i):
        start.wait()
        try:
            results[i] = work(i)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def _prompts(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(1, VOCAB, (1, 5 + 3 * i), generator=generator) for i in range(count)]


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager", "captured"])
def test_threads_share_one_engine(cuda_graphs):
    target = tiny_model("llama", VOCAB)
    engine = SpeculativeEngine(
        target, perturbed_copy(target, 0.3), config=EngineConfig(num_draft_tokens=3, cuda_graphs=cuda_graphs)
    )
    prompts = _prompts(4)
    expected = [target.generate(ids, max_new_tokens=20, do_sample=False) for ids in prompts]
    outputs = _in_threads(lambda i: [engine.generate(prompts[i], max_new_tokens=20) for _ in range(3)], 4)
    for i, runs in enumerate(outputs):
        for out in runs:
            assert torch.equal(out, expected[i])
    assert engine.stats.requests == 12


def test_engines_sharing_a_distilling_drafter_leave_it_as_it_was():
    """One drafter serving two targets from two threads: each engine swaps its merged adapter into the
    drafter's weights while it serves, so without a lock one engine restored the other's merged weights."""
    drafter = tiny_model("llama", VOCAB, seed=9)
    before = {name: tensor.clone() for name, tensor in drafter.state_dict().items()}
    targets = [perturbed_copy(drafter, 0.3, seed=seed) for seed in (1, 2)]
    config = EngineConfig(num_draft_tokens=3, distill=DistillConfig(interval=1))
    engines = [SpeculativeEngine(target, drafter, config=config) for target in targets]
    prompts = _prompts(2)
    expected = [
        target.generate(prompts[i], max_new_tokens=16, do_sample=False) for i, target in enumerate(targets)
    ]
    outputs = _in_threads(lambda i: [engines[i].generate(prompts[i], max_new_tokens=16) for _ in range(4)], 2)
    for i, runs in enumerate(outputs):
        assert all(torch.equal(out, expected[i]) for out in runs)
    assert all(engine.learner.adapter.version > 0 for engine in engines)  # both trained and served merged
    after = drafter.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)


def test_a_request_calling_generate_on_its_own_models_is_refused():
    """A streamer (or stopping criterion, logits processor) calling generate() on a model of the request
    it serves would wait for that request: refused by name, and the engine serves exactly afterwards."""
    target = tiny_model("llama", VOCAB)
    engine = SpeculativeEngine(target, perturbed_copy(target, 0.3))
    ids = _prompts(1)[0]

    class Nested:
        def put(self, value):
            engine.generate(ids, max_new_tokens=2)

        def end(self):
            pass

    with pytest.raises(RuntimeError, match="in the thread of a request in progress"):
        engine.generate(ids, max_new_tokens=8, streamer=Nested())
    other = SpeculativeEngine(target, perturbed_copy(target, 0.3, seed=5))  # shares the target
    Nested.put = lambda self, value: other.generate(ids, max_new_tokens=2)
    with pytest.raises(RuntimeError, match="in the thread of a request in progress"):
        engine.generate(ids, max_new_tokens=8, streamer=Nested())
    assert torch.equal(
        engine.generate(ids, max_new_tokens=12), target.generate(ids, max_new_tokens=12, do_sample=False)
    )


def test_a_request_may_serve_another_model_pair_from_its_streamer():
    target = tiny_model("llama", VOCAB)
    engine = SpeculativeEngine(target, perturbed_copy(target, 0.3))
    other_target = tiny_model("llama", VOCAB, seed=4)
    other = SpeculativeEngine(other_target, perturbed_copy(other_target, 0.3))
    ids = _prompts(1)[0]
    nested = []

    class Nested:
        def put(self, value):
            nested.append(other.generate(ids, max_new_tokens=3))

        def end(self):
            pass

    out = engine.generate(ids, max_new_tokens=6, streamer=Nested())
    assert torch.equal(out, target.generate(ids, max_new_tokens=6, do_sample=False))
    assert nested and all(
        torch.equal(n, other_target.generate(ids, max_new_tokens=3, do_sample=False)) for n in nested
    )


def test_threads_calling_generate_share_the_models_engine():
    target = tiny_model("llama", VOCAB)
    drafter = perturbed_copy(target, 0.3)
    prompts = _prompts(4)
    expected = [target.generate(ids, max_new_tokens=12, do_sample=False) for ids in prompts]
    outputs = _in_threads(
        lambda i: omnidraft_fast.generate(target, prompts[i], drafter=drafter, max_new_tokens=12), 4
    )
    assert all(torch.equal(out, expected[i]) for i, out in enumerate(outputs))
    assert len(target._omnidraft_engines) == 1


def test_recordings_in_two_threads_restore_the_tensor_methods():
    """The host-read refusal replaces torch.Tensor's methods for every thread: two recordings that overlap
    (two engines' captures) leave them as they were, whichever ends first, and refuse in their threads only."""
    original = torch.Tensor.tolist
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    refused = []

    def first():
        with ReplayGraph():
            first_in.set()
            second_in.wait()
        first_out.set()

    def second():
        first_in.wait()
        with ReplayGraph():
            second_in.set()
            first_out.wait()  # the first recording ends while this one is under way
            try:
                torch.arange(2).tolist()
            except CaptureError:
                refused.append(True)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert refused == [True]
    assert torch.Tensor.tolist is original
    assert torch.arange(3).tolist() == [0, 1, 2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_captured_while_another_thread_runs_on_the_device():
    """Two engines on other models capture their rounds while the other thread launches, allocates and
    synchronises (``time_stages`` syncs at every stage boundary) on the device: thread_local capture mode,
    both exact."""
    pairs = []
    for seed in (0, 7):
        target = tiny_model("llama", VOCAB, seed=seed, hidden=64).cuda()
        pairs.append((target, perturbed_copy(target, 0.3, seed=seed + 1).cuda()))
    config = EngineConfig(num_draft_tokens=3, cuda_graphs=True, time_stages=True)
    engines = [SpeculativeEngine(target, drafter, config=config) for target, drafter in pairs]
    prompts = [ids.cuda() for ids in _prompts(2)]
    expected = [pairs[i][0].generate(prompts[i], max_new_tokens=24, do_sample=False) for i in range(2)]

    def serve(i):
        outs = [
            engines[i].generate(prompts[i], max_new_tokens=24, return_dict_in_generate=True) for _ in range(4)
        ]
        return [(out.sequences, set(out.stats.stage_seconds)) for out in outs]

    for i, runs in enumerate(_in_threads(serve, 2)):
        assert all(torch.equal(sequences, expected[i]) for sequences, _ in runs)
        assert any("capture:round" in stages for _, stages in runs)


def test_crossed_nested_calls_are_refused_instead_of_waiting_for_each_other():
    """Two requests whose streamers call each other's engines (no model shared) would each wait for the
    other for good: a thread already holding models waits for none, and says why."""
    from omnidraft_fast.locks import ModelsBusy

    models = [tiny_model("llama", VOCAB, seed=seed) for seed in (0, 4)]
    engines = [SpeculativeEngine(target, perturbed_copy(target, 0.3)) for target in models]
    ids = _prompts(1)[0]
    inside = threading.Barrier(2)
    refused = []

    def serve(i):
        other = engines[1 - i]
        first = [True]

        class Crossing:
            def put(self, value):
                if first[0]:
                    first[0] = False
                    inside.wait(timeout=30)  # both requests are in progress
                    try:
                        other.generate(ids, max_new_tokens=2)
                    except ModelsBusy as error:
                        refused.append(str(error))

            def end(self):
                pass

        return engines[i].generate(ids, max_new_tokens=6, streamer=Crossing())

    outputs = _in_threads(serve, 2)
    for i, out in enumerate(outputs):
        assert torch.equal(out, models[i].generate(ids, max_new_tokens=6, do_sample=False))
    assert len(refused) >= 1 and all("may not wait" in message for message in refused)


def test_an_engine_evicted_from_inside_a_request_on_its_drafter():
    """generate() from a streamer, on another target whose engine list is full, drops the oldest engine,
    whose drafter this thread's request holds: dropped unreleased (its memory goes with it), not refused."""
    drafter = tiny_model("llama", VOCAB, seed=9)
    target = perturbed_copy(drafter, 0.3, seed=1)
    other = perturbed_copy(drafter, 0.3, seed=2)
    ids = _prompts(1)[0]
    omnidraft_fast.generate(other, ids, drafter=drafter, max_new_tokens=2)  # the oldest: drafter `drafter`
    for seed in range(3, 6):
        omnidraft_fast.generate(other, ids, drafter=perturbed_copy(drafter, 0.3, seed=seed), max_new_tokens=2)
    nested = []

    class Evicting:
        def put(self, value):
            if not nested:
                extra = perturbed_copy(drafter, 0.3, seed=8)
                nested.append(omnidraft_fast.generate(other, ids, drafter=extra, max_new_tokens=4))

        def end(self):
            pass

    out = omnidraft_fast.generate(target, ids, drafter=drafter, max_new_tokens=6, streamer=Evicting())
    assert torch.equal(out, target.generate(ids, max_new_tokens=6, do_sample=False))
    assert torch.equal(nested[0], other.generate(ids, max_new_tokens=4, do_sample=False))
    assert all(engine.drafter.model is not drafter for engine in other._omnidraft_engines)


def test_building_a_learning_engine_leaves_torch_rng_alone():
    """The adapter's and the head's initial weights come from torch's RNG without moving it: a seeded
    sampled request is the same whether or not generate() built the engine first."""
    from omnidraft_fast import AdaptiveConfig

    target = tiny_model("llama", VOCAB)
    drafter = perturbed_copy(target, 0.3)
    ids = _prompts(1)[0]
    config = EngineConfig(distill=DistillConfig(interval=10**6), adaptive=AdaptiveConfig(interval=10**6))
    outs = []
    for _ in range(2):  # the first call builds the engine, the second reuses it
        torch.manual_seed(7)
        outs.append(omnidraft_fast.generate(target, ids, drafter=drafter, engine_config=config, max_new_tokens=12,
                                            do_sample=True))  # fmt: skip
    assert torch.equal(outs[0], outs[1])


def test_the_learners_hidden_state_hook_keeps_its_own_threads_forwards():
    """The learner reads the drafter's last hidden states through a hook on its head: a forward another
    thread runs meanwhile (the caller's own drafter.generate()) is not collected."""
    from omnidraft_fast.models import head_inputs

    model = tiny_model("llama", VOCAB)
    ids = _prompts(1)[0]
    with torch.no_grad(), head_inputs(model) as captured:
        other = threading.Thread(target=lambda: model(ids))
        other.start()
        other.join()
        model(ids[:, :3])
    assert len(captured) == 1 and captured[0].shape[1] == 3


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_a_forward_hook_calling_generate_on_its_models_is_refused_as_nested(cuda_graphs):
    """A drafter's forward hook that calls generate() on the engine serving the request gets ModelsBusy
    before that call does anything, also while the round is being captured (it came out as a CaptureError
    there, about the nested call's host reads); the engine then serves the request exactly."""
    from omnidraft_fast import graphs
    from omnidraft_fast.locks import ModelsBusy

    target = tiny_model("llama", VOCAB, seed=0)
    drafter = perturbed_copy(target, 0.3)
    engine = SpeculativeEngine(target, drafter, config=EngineConfig(cuda_graphs=cuda_graphs))
    ids = _prompts(1)[0]
    calls = []

    def nested(module, args, out):
        capturing = threading.get_ident() in graphs._RECORDING
        if (capturing or not cuda_graphs) and not calls:  # once: in the capture, or in an eager round
            calls.append(capturing)
            engine.generate(ids, max_new_tokens=2)

    handle = drafter.register_forward_hook(nested)
    try:
        with pytest.raises(ModelsBusy, match="in the thread of a request in progress"):
            engine.generate(ids, max_new_tokens=8)
    finally:
        handle.remove()
    assert calls == [cuda_graphs]
    assert torch.equal(
        engine.generate(ids, max_new_tokens=8), target.generate(ids, max_new_tokens=8, do_sample=False)
    )
