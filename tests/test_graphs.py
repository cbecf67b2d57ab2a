"""Captured round stages (graphs.py): replay semantics, host-read detection, and rounds that give exactly
what eager rounds give, on every device (CUDA graphs on CUDA, the replay recorder elsewhere)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import left_padded_prompts, perturbed_copy, tiny_model
from transformers import GPTNeoConfig, GPTNeoForCausalLM

from omnidraft_fast import AdaptiveConfig, CascadeConfig, DistillConfig, EngineConfig, SpeculativeEngine
from omnidraft_fast.graphs import CaptureError, ReplayGraph, StageGraphs
from omnidraft_fast.stats import StageTimer

VOCAB = 96
CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------- the recorder
def test_replay_reads_inputs_in_place_and_runs_no_python():
    x, y = torch.ones(3), torch.zeros(3)
    calls = []

    def stage():
        calls.append(1)
        y.copy_(x * 2 + 1)

    graph = ReplayGraph()
    with graph:
        stage()
    assert y.tolist() == [3.0] * 3 and len(calls) == 1
    x.fill_(5.0)
    graph.replay()
    assert y.tolist() == [11.0] * 3 and len(calls) == 1  # the op reran on the new input, Python did not


def test_replay_keeps_the_storage_an_input_had_at_capture():
    # As a CUDA graph keeps addresses: swapping a tensor's `.data` after the capture is invisible to replays.
    weight, out = torch.nn.Parameter(torch.ones(3), requires_grad=False), torch.zeros(3)
    graph = ReplayGraph()
    with graph:
        out.copy_(weight * 2)
    captured = weight.data
    weight.data = torch.full((3,), 5.0)
    graph.replay()
    assert out.tolist() == [2.0] * 3
    captured.fill_(4.0)
    graph.replay()
    assert out.tolist() == [8.0] * 3


def test_replay_keeps_fresh_intermediates_and_views_consistent():
    x, out = torch.arange(6.0).reshape(2, 3), torch.zeros(2)
    graph = ReplayGraph()
    with graph:
        t = x.t().contiguous()  # a view, then a fresh tensor
        scratch = torch.zeros(3, 2)
        scratch.scatter_(0, torch.tensor([[2, 0]]), 1.0)
        out.copy_((t * scratch).sum(0) + t.max(0).values)
    expected = out.clone()
    x.mul_(-1)
    graph.replay()
    t = x.t()
    scratch = torch.zeros(3, 2)
    scratch[2, 0] = scratch[0, 1] = 1.0
    assert torch.equal(out, (t * scratch).sum(0) + t.max(0).values)
    assert not torch.equal(out, expected)


def test_replay_draws_fresh_random_numbers_in_the_eager_sequence():
    generator = torch.Generator().manual_seed(7)
    out = torch.zeros(4)
    graph = ReplayGraph()
    with graph:
        out.copy_(torch.rand(4, generator=generator) + torch.empty(4).exponential_(generator=generator))
    draws = [out.clone()]
    for _ in range(2):
        graph.replay()
        draws.append(out.clone())
    generator.manual_seed(7)
    eager = [
        torch.rand(4, generator=generator) + torch.empty(4).exponential_(generator=generator)
        for _ in range(3)
    ]
    assert all(torch.equal(a, b) for a, b in zip(draws, eager, strict=True))


@pytest.mark.parametrize(
    "stage, match",
    [
        (lambda x: bool(x.sum() > 0), "reads a value back to the host"),
        (lambda x: x.max().item(), "reads a value back to the host"),
        (lambda x: x[x > 0], "data-dependent output shape"),
        (lambda x: torch.nonzero(x), "data-dependent output shape"),
        (lambda x: x.index_put_((x > 0,), torch.tensor(0.0)), "data-dependent output shape"),
        (lambda x: (x * 2).tolist(), r"`\.tolist\(\)` reads a tensor back"),  # no aten op on a CPU tensor
        (lambda x: x.numpy(), r"`\.numpy\(\)` reads a tensor back"),
    ],
)
def test_host_reads_inside_a_capture_are_refused(stage, match):
    with pytest.raises(CaptureError, match=match), ReplayGraph():
        stage(torch.randn(5))
    assert torch.ones(2).tolist() == [1.0, 1.0]  # the recording over, reads work again


def test_a_masked_scalar_assignment_is_refused_or_replays_as_a_masked_fill():
    """``x[mask] = 0.0`` is a boolean ``index_put_`` before torch 2.15 (a ``nonzero`` inside: refused) and a
    ``masked_fill_`` from 2.15 on (fixed shapes, as a CUDA graph captures it): recorded as that, it replays
    on the mask's new values."""
    x, mask = torch.arange(4.0), torch.tensor([True, False, True, False])
    graph = ReplayGraph()
    try:
        with graph:
            x[mask] = -1.0
    except CaptureError as error:
        assert "`index_put_` has a data-dependent output shape" in str(error)
        return
    assert [func.overloadpacket.__name__ for func, *_ in graph.ops] == ["masked_fill_"]
    assert x.tolist() == [-1.0, 1.0, -1.0, 3.0]
    x.copy_(torch.arange(4.0))
    mask.copy_(torch.tensor([False, True, False, True]))
    graph.replay()
    assert x.tolist() == [0.0, -1.0, 2.0, -1.0]


def test_other_threads_read_as_they_like_while_a_stage_records():
    """Only the recording thread's reads are refused: a streamer's consumer thread is not recording."""
    import threading

    read = []
    with ReplayGraph():
        thread = threading.Thread(target=lambda: read.append(torch.arange(3).tolist()))
        thread.start()
        thread.join()
    assert read == [[0, 1, 2]]


def test_stage_graphs_warm_up_then_capture_then_replay():
    x, y = torch.ones(2), torch.zeros(2)
    runs = []

    def stage(timer):
        runs.append(timer.enabled)
        with timer("inner"):
            y.add_(x)

    timer = StageTimer(True, CPU)
    graphs = StageGraphs(CPU, torch.Generator(), enabled=True)
    for _ in range(4):
        graphs.run("key", stage, timer, "outer")
    assert y.tolist() == [4.0, 4.0]
    assert runs == [True, False]  # Python ran eagerly (timed inside), then once more to be captured
    assert len(graphs.graphs) == 1 and set(timer.seconds) == {"inner", "capture:outer", "outer"}
    graphs.close()
    off = StageGraphs(CPU, torch.Generator(), enabled=False)
    for _ in range(3):
        off.run("key", stage, timer, "outer")
    assert runs == [True, False, True, True, True] and y.tolist() == [7.0, 7.0]


def test_an_error_in_a_stage_being_captured_that_is_no_capture_failure_reaches_the_caller_as_itself():
    def failing(timer):
        raise ValueError("a hook of the caller's")

    graphs = StageGraphs(CPU, torch.Generator(), enabled=True)
    graphs.warm.add("key")  # its next run captures
    with pytest.raises(ValueError, match="a hook of the caller's"):
        graphs.run("key", failing, StageTimer(False, CPU), "round")
    with pytest.raises(CaptureError, match=r"could not be captured.*reads a value back to the host"):
        graphs.run("key", lambda timer: torch.ones(1).item(), StageTimer(False, CPU), "round")
    assert torch.ones(2).tolist() == [1.0, 1.0]


# ------------------------------------------------------------------------------------------ the engine
@pytest.fixture(scope="module")
def shared_pair():
    target = tiny_model("llama", VOCAB, seed=11, eos_token_id=5)
    return target, perturbed_copy(target, 0.3, seed=12)


def _serve(makers, requests):
    """Build an engine with each of ``makers`` and run ``requests`` (generate() keyword dicts) on it, from
    the same seeds; returns (engine, outputs) per engine."""
    results = []
    for make_engine in makers:
        torch.manual_seed(1234)  # a LoRA adapter's initialisation draws from the global RNG
        engine = make_engine()
        outs = []
        for seed, kwargs in enumerate(requests):
            torch.manual_seed(seed)
            outs.append(engine.generate(**kwargs, return_dict_in_generate=True))
        results.append((engine, outs))
    return results


def _both_modes(make_engine, requests):
    """``requests`` on an eager engine and on a captured one (``make_engine(graphs)``)."""
    return _serve([lambda: make_engine(False), lambda: make_engine(True)], requests)


def _assert_same(results, replayed_stage="round"):
    (_, eager), (_, captured) = results
    for a, b in zip(eager, captured, strict=True):
        assert torch.equal(a.sequences, b.sequences)
        for name in ("rounds", "proposed", "accepted", "drafter_proposed", "merged_accepted", "deferred"):
            assert getattr(a.stats, name) == getattr(b.stats, name), name
    # the captured engine did replay (a replay is timed as one stage)
    assert replayed_stage in captured[-1].stats.stage_seconds


def _learning_in_both_modes(pair, config, request, requests):
    """``_both_modes`` for engines that learn online, each on its own copy of the drafter."""
    target, drafter = pair
    return _both_modes(
        lambda graphs: SpeculativeEngine(
            target, copy.deepcopy(drafter), config=EngineConfig(**config, cuda_graphs=graphs)
        ),
        [request] * requests,
    )


def _assert_learned_alike(eager, captured):
    """The two learners' adapters and heads hold the same weights, after as many steps, with the same
    last losses (counted on the device)."""
    for name in ("distill_steps", "head_steps", "distill_loss", "head_loss"):
        a, b = getattr(eager.stats, name), getattr(captured.stats, name)
        assert a == b or (math.isnan(a) and math.isnan(b)), name
    if eager.adapter is not None:
        assert all(
            torch.equal(a, b)
            for a, b in zip(eager.adapter.parameters, captured.adapter.parameters, strict=True)
        )
    if eager.head is not None:
        assert all(
            torch.equal(a, b)
            for a, b in zip(eager.head.parameters(), captured.head.parameters(), strict=True)
        )


def _cross_engine(cross_pair, **config) -> SpeculativeEngine:
    """An engine on the cross-vocabulary pair, with its own copy of the drafter (learners change it)."""
    target, drafter, target_tokenizer, drafter_tokenizer = cross_pair
    return SpeculativeEngine(target, copy.deepcopy(drafter), target_tokenizer=target_tokenizer,
                             drafter_tokenizer=drafter_tokenizer, config=EngineConfig(**config))  # fmt: skip


def _cross_request(cross_pair, prompts: list[str], **kwargs) -> dict:
    """generate() arguments for ``prompts`` in the cross pair's target tokenizer (left-padded)."""
    return {**cross_pair[2](prompts, return_tensors="pt", padding=True), **kwargs}


@pytest.mark.parametrize(
    "sampling", [{}, {"do_sample": True}, {"do_sample": True, "temperature": 0.7, "top_k": 20}]
)
def test_shared_vocabulary_rounds_replay_exactly(shared_pair, sampling):
    target, drafter = shared_pair
    ids, mask = left_padded_prompts(VOCAB, [6, 3, 5], seed=1)
    request = {
        "input_ids": ids,
        "attention_mask": mask,
        "max_new_tokens": 20,
        "eos_token_id": 5,
        "pad_token_id": 0,
    }
    results = _both_modes(
        lambda graphs: SpeculativeEngine(target, drafter, config=EngineConfig(cuda_graphs=graphs)),
        [{**request, **sampling}] * 2,
    )
    _assert_same(results)


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "gpt2"])
def test_every_architecture_replays_exactly(arch):
    target = tiny_model(arch, VOCAB, seed=13)
    drafter = perturbed_copy(target, 0.3, seed=14)
    ids, mask = left_padded_prompts(VOCAB, [3, 6], seed=4)
    request = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 12, "do_sample": True}
    results = _both_modes(
        lambda graphs: SpeculativeEngine(target, drafter, config=EngineConfig(cuda_graphs=graphs)), [request]
    )
    _assert_same(results)


def test_short_requests_and_failures_leave_the_engine_usable(shared_pair):
    """A request too short to reach a capture, and one that fails inside a captured round (NaN logits from
    the third round on), leave nothing behind: the next request matches an eager engine's."""
    target, drafter = shared_pair
    engine = SpeculativeEngine(target, drafter, config=EngineConfig(cuda_graphs=True))
    eager = SpeculativeEngine(target, drafter)
    ids = torch.tensor([[7, 8, 9, 10]])
    for max_new_tokens in (1, 3):
        assert torch.equal(
            engine.generate(ids, max_new_tokens=max_new_tokens),
            eager.generate(ids, max_new_tokens=max_new_tokens),
        )
    from transformers.generation.streamers import BaseStreamer

    weight = target.lm_head.weight
    pristine = weight.detach().clone()

    class Poison(BaseStreamer):  # after the prompt and two rounds, the target's head turns to NaN in place
        puts = 0

        def put(self, value):
            self.puts += 1
            if self.puts == 3:
                with torch.no_grad():
                    weight.fill_(float("nan"))

        def end(self):
            pass

    try:
        with pytest.raises(ValueError, match="NaN"):
            engine.generate(ids, max_new_tokens=40, streamer=Poison())  # round 3 is a replay
    finally:
        with torch.no_grad():
            weight.copy_(pristine)
    assert torch.equal(engine.generate(ids, max_new_tokens=20), eager.generate(ids, max_new_tokens=20))


def _replayed_from_the_start(out) -> bool:
    """Whether a request ran every round as a replay: no capture, no eager stage (the target's forward is
    timed on its own only in eager rounds)."""
    stages = set(out.stats.stage_seconds)
    captured = any(stage.startswith("capture:") for stage in stages)
    return bool({"round", "rounds", "finish"} & stages) and not captured and "target" not in stages


def test_later_requests_replay_the_kept_graphs_from_their_first_round(shared_pair):
    """Requests of the same batch size, prompt bucket and settings reuse the last one's state, caches and
    graphs (other prompts, other lengths within the bucket); any other request, or ``release()``, captures
    afresh. Every output equals an eager engine's."""
    target, drafter = shared_pair
    base = {"max_new_tokens": 16, "eos_token_id": 5, "pad_token_id": 0}

    def prompts(lengths, seed):
        ids, mask = left_padded_prompts(VOCAB, lengths, seed=seed)
        return {"input_ids": ids, "attention_mask": mask, **base}

    requests = [
        prompts([6, 3, 5], 1),
        prompts([2, 7, 4], 2),  # other prompts, wider, in the same bucket of 64: replayed
        prompts([3, 3, 3], 3),  # narrower: replayed
        {**prompts([3, 3, 3], 3), "do_sample": True},  # other settings: captured
        {**prompts([5, 2, 6], 4), "do_sample": True},  # replayed
        prompts([70, 4, 9], 5),  # the next bucket: captured
        {**prompts([4, 6, 2], 6), "repetition_penalty": 1.3},  # target-side processing: a key of its own
        prompts([4, 6], 7),  # another batch size: captured
        prompts([5, 1], 8),  # replayed
        {**prompts([3, 6], 9), "assistant_confidence_threshold": 0.4},  # adaptive draft length: captured
        {**prompts([6, 2], 10), "assistant_confidence_threshold": 0.4},  # replayed
        prompts([1, 4, 6], 11),  # the first request's key: still kept (one of 8), replayed
    ]
    results = _both_modes(
        lambda graphs: SpeculativeEngine(
            target, drafter, config=EngineConfig(cuda_graphs=graphs, kept_graphs=8)
        ),
        requests,
    )
    for a, b in zip(results[0][1], results[1][1], strict=True):
        assert torch.equal(a.sequences, b.sequences)
        assert a.stats.accepted == b.stats.accepted and a.stats.rounds == b.stats.rounds
    replayed = [_replayed_from_the_start(out) for out in results[1][1]]
    assert replayed == [False, True, True, False, True, False, False, False, True, False, True, True]

    engine = results[1][0]
    engine.release()
    torch.manual_seed(len(requests) - 1)
    again = engine.generate(**requests[-1], return_dict_in_generate=True)
    assert torch.equal(again.sequences, results[1][1][-1].sequences)
    assert not _replayed_from_the_start(again)  # captured afresh


def test_running_out_of_device_memory_releases_the_kept_graphs(shared_pair, monkeypatch):
    """A request that runs out of device memory releases every kept set (the caller may retry)."""
    target, drafter = shared_pair
    engine = SpeculativeEngine(target, drafter, config=EngineConfig(cuda_graphs=True))
    ids = torch.tensor([[7, 8, 9]])
    first = engine.generate(ids, max_new_tokens=12)
    prefill = engine.rounds.prefill

    def out_of_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(engine.rounds, "prefill", out_of_memory)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        engine.generate(torch.tensor([[1, 2, 3, 4, 5]]), max_new_tokens=10)  # a key of its own
    monkeypatch.setattr(engine.rounds, "prefill", prefill)
    again = engine.generate(ids, max_new_tokens=12, return_dict_in_generate=True)
    assert torch.equal(again.sequences, first) and not _replayed_from_the_start(again)  # captured afresh


def test_kept_graphs_follow_models_cast_or_reloaded_between_requests(shared_pair):
    """Kept stages read the weights where they were at capture: casting the models or loading other weights
    with ``assign=True`` between requests releases what was kept (a cast's replay failed on the kept
    caches' dtype; a reload replayed the weights of before). Weights written in place are followed as they
    are (the same storage)."""
    target, drafter = (copy.deepcopy(model) for model in shared_pair)
    engine = SpeculativeEngine(target, drafter, config=EngineConfig(cuda_graphs=True))
    ids = torch.tensor([[7, 8, 9]])

    def expected():  # an engine built on the models as they are now
        fresh = SpeculativeEngine(target, drafter, config=EngineConfig(cuda_graphs=True))
        return fresh.generate(ids, max_new_tokens=12)

    engine.generate(ids, max_new_tokens=12)
    target.to(torch.float16), drafter.to(torch.float16)
    out = engine.generate(ids, max_new_tokens=12, return_dict_in_generate=True)
    assert torch.equal(out.sequences, expected()) and not _replayed_from_the_start(out)
    again = engine.generate(ids, max_new_tokens=12, return_dict_in_generate=True)
    assert torch.equal(again.sequences, out.sequences) and _replayed_from_the_start(again)  # kept once more

    other = perturbed_copy(target, 2.0, seed=5)
    target.load_state_dict(other.state_dict(), assign=True)
    out = engine.generate(ids, max_new_tokens=12, return_dict_in_generate=True)
    assert torch.equal(out.sequences, expected()) and not _replayed_from_the_start(out)
    assert not torch.equal(out.sequences, again.sequences)  # the reload changed what the target generates


def _rebind_parameter(model):  # a new Parameter object for one weight in the middle of the model
    mlp = model.model.layers[0].mlp
    mlp.down_proj.weight = torch.nn.Parameter(torch.randn_like(mlp.down_proj.weight))


def _swap_data(model):  # the same Parameter object, other storage
    attention = model.model.layers[1].self_attn
    attention.o_proj.weight.data = torch.randn_like(attention.o_proj.weight)


def _rebind_buffer(model):  # the rotary frequencies, read through the lean forward's rotation table
    rotary = model.model.rotary_emb
    rotary.inv_freq = torch.rand_like(rotary.inv_freq) * 3


@pytest.mark.parametrize("rebind", [_rebind_parameter, _swap_data, _rebind_buffer])
def test_kept_graphs_follow_tensors_rebound_one_by_one(shared_pair, rebind):
    """A parameter or buffer rebound, or its ``.data`` swapped, anywhere in a model between requests
    releases what was kept (the replay read the tensor of before: the target's logits were the old ones)."""
    target, drafter = (copy.deepcopy(model) for model in shared_pair)
    engine = SpeculativeEngine(target, drafter, config=EngineConfig(cuda_graphs=True))
    ids, options = torch.tensor([[7, 8, 9]]), {"max_new_tokens": 12, "output_logits": True}
    torch.manual_seed(0)
    before = engine.generate(ids, return_dict_in_generate=True, **options)
    rebind(target)
    out = engine.generate(ids, return_dict_in_generate=True, **options)
    fresh = SpeculativeEngine(target, drafter, config=EngineConfig(cuda_graphs=True))
    expected = fresh.generate(ids, return_dict_in_generate=True, **options)
    assert all(map(torch.equal, out.logits, expected.logits))
    assert torch.equal(out.sequences, expected.sequences) and not _replayed_from_the_start(out)
    assert not torch.equal(out.logits[0], before.logits[0])  # the rebound tensor changed the target's logits
    again = engine.generate(ids, return_dict_in_generate=True, **options)
    assert torch.equal(again.sequences, out.sequences) and _replayed_from_the_start(again)


@pytest.mark.parametrize(
    "config, replayed",
    [
        ({"prompt_bucket": 1}, [False, True, False, True, True]),  # widths 3 and 4 are two keys
        ({"prompt_bucket": 1, "kept_graphs": 1}, [False, True, False, False, False]),  # one kept: they evict
        ({"kept_graphs": 0}, [False] * 5),  # nothing kept
        ({}, [False, True, True, True, True]),  # one bucket
    ],
)
def test_prompt_buckets_and_the_number_of_kept_graphs(shared_pair, config, replayed):
    target, drafter = shared_pair
    engine = SpeculativeEngine(target, drafter, config=EngineConfig(cuda_graphs=True, **config))
    prompts = ([[7, 8, 9]], [[10, 11, 12]], [[7, 8, 9, 10]], [[3, 4, 5]], [[4, 5, 6, 7]])
    outs = [
        engine.generate(torch.tensor(ids), max_new_tokens=12, return_dict_in_generate=True) for ids in prompts
    ]
    assert [_replayed_from_the_start(out) for out in outs] == replayed


def test_models_right_within_a_width_reuse_graphs_without_padding():
    """A model whose attention is right only within a width (here GPT-Neo's local window) serves within it,
    which padding could overrun: its engine keeps graphs for prompts of equal width only."""
    torch.manual_seed(15)
    config = GPTNeoConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, window_size=40,
                          attention_types=[[["global", "local"], 1]], max_position_embeddings=128)  # fmt: skip
    target = GPTNeoForCausalLM(config).eval()
    drafter = perturbed_copy(target, 0.3, seed=16)
    prompts = ([[7, 8, 9]], [[10, 11, 12]], [[7, 8, 9, 10]])
    outs = {}
    for graphs in (False, True):
        engine = SpeculativeEngine(target, drafter, config=EngineConfig(cuda_graphs=graphs))
        assert engine.target.width_limit == 40
        outs[graphs] = [
            engine.generate(torch.tensor(ids), max_new_tokens=12, return_dict_in_generate=True)
            for ids in prompts
        ]
    for eager, captured in zip(outs[False], outs[True], strict=True):
        assert torch.equal(eager.sequences, captured.sequences)
        assert torch.equal(eager.sequences, target.generate(eager.sequences[:, :-12], do_sample=False,
                                                            max_new_tokens=12))  # fmt: skip
    assert [_replayed_from_the_start(out) for out in outs[True]] == [False, True, False]


@pytest.mark.parametrize("name, value", [("prompt_bucket", 0), ("kept_graphs", -1), ("kept_graphs", 1.5)])
def test_graph_reuse_settings_are_checked(name, value):
    with pytest.raises(ValueError, match=name):
        EngineConfig(**{name: value})


def test_kept_graphs_return_each_request_its_own_logits(shared_pair):
    """The target's logits kept for output_logits / output_scores are refilled (NaN) for each request on
    the kept graphs: a shorter second request returns its own, as an eager engine does."""
    target, drafter = shared_pair
    requests = []
    for lengths, seed in (([6, 3], 21), ([2, 5], 22)):  # the second's row 0 ends early, at EOS 22
        ids, mask = left_padded_prompts(VOCAB, lengths, seed=seed)
        requests.append({"input_ids": ids, "attention_mask": mask, "max_new_tokens": 10, "eos_token_id": 22,
                         "pad_token_id": 0, "output_logits": True, "output_scores": True})  # fmt: skip
    results = _both_modes(
        lambda graphs: SpeculativeEngine(target, drafter, config=EngineConfig(cuda_graphs=graphs)), requests
    )
    _assert_same(results)
    first, second = results[0][1]
    assert not torch.stack(first.logits).isnan().any() and torch.stack(second.logits)[-1, 0].isnan().all()
    for eager, captured in zip(results[0][1], results[1][1], strict=True):
        for name in ("logits", "scores"):
            a, b = torch.stack(getattr(eager, name)), torch.stack(getattr(captured, name))
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), name
    assert _replayed_from_the_start(results[1][1][1])


def test_kept_graphs_across_vocabularies(cross_pair):
    """The drafter's spelled prompt is bucketed too: other prompts replay the kept graphs."""
    prompts = (["def parse(text):\n    return", "x = [i for"], ["import os\n", "while True:\n    y ="])
    requests = [_cross_request(cross_pair, p, max_new_tokens=12, do_sample=True) for p in prompts]
    results = _both_modes(lambda graphs: _cross_engine(cross_pair, cuda_graphs=graphs), requests)
    _assert_same(results)
    assert [_replayed_from_the_start(out) for out in results[1][1]] == [False, True]


def test_cascade_rounds_replay_exactly(shared_pair):
    target, drafter = shared_pair
    ids, mask = left_padded_prompts(VOCAB, [4, 6], seed=2)
    request = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 16, "do_sample": True,
               "temperature": 0.8, "cascade": CascadeConfig("opt", (0.2, 0.5))}  # fmt: skip
    results = _both_modes(
        lambda graphs: SpeculativeEngine(target, drafter, config=EngineConfig(cuda_graphs=graphs)), [request]
    )
    _assert_same(results)


@pytest.mark.parametrize("translation", ["omnidraft", "tli", "exact"])
def test_cross_vocabulary_rounds_replay_exactly(cross_pair, translation):
    request = _cross_request(cross_pair, ["def parse(text):\n    return", "x = [i for"], max_new_tokens=12,
                             do_sample=True)  # fmt: skip
    results = _both_modes(
        lambda graphs: _cross_engine(cross_pair, translation=translation, cuda_graphs=graphs),
        [request, {**request, "do_sample": False}],
    )
    _assert_same(results)
    (eager, _), (captured, _) = results
    if translation != "tli":  # the n-gram table learned the same entries
        assert torch.equal(eager.ngram.key_ids, captured.ngram.key_ids)
        assert torch.equal(eager.ngram.counts, captured.ngram.counts)


@pytest.mark.parametrize(
    ("mode", "distill"), [("alternating", True), ("joint", False), ("alternating", False)]
)
def test_adaptive_rounds_and_recording_replay_exactly(shared_pair, mode, distill):
    """With an acceptance head each draft step is its own stage, and the rest of the round one stage per
    draft length; the online learners receive the same rows (also a head that learns alone)."""
    ids, mask = left_padded_prompts(VOCAB, [5, 7], seed=3)
    request = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 24, "do_sample": True}
    config = {"num_draft_tokens": 5, "distill": DistillConfig(rank=8, interval=2, lr=1e-2) if distill else None,
              "adaptive": AdaptiveConfig(gamma=0.5, interval=2, prior=0.7, mode=mode)}  # fmt: skip
    results = _learning_in_both_modes(shared_pair, config, request, 3)
    _assert_same(results, replayed_stage="draft")
    (eager, outs), (captured, _) = results
    # the learners trained between requests, identically
    assert eager.learner.stats.distill_steps >= 1 if distill else eager.learner.stats.distill_steps == 0
    assert eager.learner.stats.head_steps >= 1
    _assert_learned_alike(eager.learner, captured.learner)
    assert outs[-1].stats.drafter_proposed < outs[-1].stats.row_rounds * 5  # rows did stop early


@pytest.mark.parametrize(
    ("mode", "confidence_input", "distill"),
    [("alternating", False, True), ("joint", False, True), ("alternating", True, True), ("joint", False, False),
     ("alternating", False, False)],
)  # fmt: skip
def test_in_flight_updates_replay_exactly(shared_pair, mode, confidence_input, distill):
    """The learning step in the middle of a request is a captured stage too (forward, backward, clipping,
    AdamW, the merge), and its updates reach the rounds captured before it (the merged LoRA weights and the
    head are rewritten in place): outputs and what was learned equal eager mode's; also for a head that
    learns alone (no distillation), in either mode."""
    ids, mask = left_padded_prompts(VOCAB, [5, 7], seed=8)
    request = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 30, "do_sample": True}
    config = {"num_draft_tokens": 4, "in_flight_rounds": 2,
              "distill": DistillConfig(rank=8, interval=1, lr=1e-2) if distill else None,
              "adaptive": AdaptiveConfig(gamma=0.5, interval=1, prior=0.7, mode=mode,
                                         confidence_input=confidence_input)}  # fmt: skip
    results = _learning_in_both_modes(shared_pair, config, request, 2)
    _assert_same(results, replayed_stage="draft")
    (eager, _), (captured, outs) = results
    _assert_learning_replayed(outs)
    assert eager.learner.stats.distill_steps >= 6 if distill else eager.learner.stats.distill_steps == 0
    assert eager.learner.stats.head_steps >= 6
    _assert_learned_alike(eager.learner, captured.learner)


def test_in_flight_updates_replay_exactly_across_vocabularies(cross_pair):
    request = _cross_request(cross_pair, ["def fibonacci(n):\n    return", "The café on"], max_new_tokens=24,
                             do_sample=True)  # fmt: skip
    config = {
        "num_draft_tokens": 4,
        "in_flight_rounds": 2,
        "distill": DistillConfig(rank=8, interval=1, lr=1e-2),
    }
    results = _both_modes(
        lambda graphs: _cross_engine(cross_pair, **config, cuda_graphs=graphs), [request] * 2
    )
    _assert_same(results)
    (eager, _), (captured, outs) = results
    _assert_learning_replayed(outs)
    _assert_learned_alike(eager.learner, captured.learner)


def _assert_learning_replayed(outs):
    """The in-flight learning stage was captured in some request and replayed (timed as "update")."""
    stages = [out.stats.stage_seconds for out in outs]
    assert any("capture:update" in s for s in stages) and all("update" in s for s in stages)


def test_distillation_alone_trains_the_same_adapter(shared_pair):
    """Without a head the round is one stage; what it records trains the same adapter as eager rounds, and
    later requests replay the graphs kept from the first across the steps between requests."""
    ids, mask = left_padded_prompts(VOCAB, [6, 4], seed=5)
    request = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 16, "do_sample": True}
    config = {"distill": DistillConfig(rank=8, interval=2, lr=1e-2)}
    results = _learning_in_both_modes(shared_pair, config, request, 3)
    _assert_same(results)
    (eager, _), (captured, outs) = results
    assert eager.learner.stats.distill_steps >= 2
    _assert_learned_alike(eager.learner, captured.learner)
    # The adapter serves merged tensors rewritten in place after each step between requests: the later
    # requests replay the graphs kept from the first.
    assert [_replayed_from_the_start(out) for out in outs] == [False, True, True]


def test_learning_in_flight_replays_kept_graphs(shared_pair):
    """An engine that learns in flight keeps its graphs too (the merged LoRA weights it serves are the same
    tensors at every request): later requests of the same bucket replay from their first round, learning
    step included. Both modes pad prompts alike, so outputs and the learned adapter equal eager mode's."""
    target, drafter = shared_pair
    config = {
        "num_draft_tokens": 3,
        "in_flight_rounds": 2,
        "distill": DistillConfig(rank=8, interval=1, lr=1e-2),
    }
    requests = []
    for lengths, seed in (([5, 7], 8), ([7, 3], 9), ([6, 7], 10), ([8, 2], 11)):
        ids, mask = left_padded_prompts(VOCAB, lengths, seed=seed)
        requests.append({"input_ids": ids, "attention_mask": mask, "max_new_tokens": 24, "do_sample": True})
    results = _both_modes(
        lambda graphs: SpeculativeEngine(
            target, copy.deepcopy(drafter), config=EngineConfig(**config, cuda_graphs=graphs)
        ),
        requests,
    )
    _assert_same(results)
    (eager, _), (captured, outs) = results
    assert [_replayed_from_the_start(out) for out in outs] == [False, True, True, True]
    assert "update" in outs[1].stats.stage_seconds  # the kept learning step replayed
    assert eager.learner.stats.distill_steps >= 8
    _assert_learned_alike(eager.learner, captured.learner)


# ------------------------------------------------------------------------- several rounds per host read
def _per_sync(make_engine, requests, per_sync):
    """``requests`` on engines reading the host once per round (eager) and once per ``per_sync`` rounds
    (eager and captured): ``make_engine(graphs, rounds_per_sync)``."""
    modes = ((False, 1), (False, per_sync), (True, per_sync))
    return _serve(
        [lambda graphs=graphs, sync=sync: make_engine(graphs, sync) for graphs, sync in modes], requests
    )


def _assert_per_sync_same(results):
    """Same outputs and counters (rounds counted only while a row is active) as one read per round."""
    (_, reference), *others = results
    for _, outs in others:
        for a, b in zip(reference, outs, strict=True):
            assert torch.equal(a.sequences, b.sequences)
            for name in ("rounds", "row_rounds", "proposed", "accepted", "drafter_proposed", "merged_accepted",
                         "deferred", "new_tokens"):  # fmt: skip
                assert getattr(a.stats, name) == getattr(b.stats, name), name
    assert any("rounds" in out.stats.stage_seconds for out in results[-1][1])  # captured units replayed


@pytest.mark.parametrize("per_sync", [2, 5])
@pytest.mark.parametrize(
    "request_kwargs",
    [{"eos_token_id": 5, "pad_token_id": 0}, {"do_sample": True, "temperature": 0.7, "top_k": 20},
     {"do_sample": True, "cascade": CascadeConfig("token_v3", (0.2, 0.4, 0.3))}],
)  # fmt: skip
def test_several_rounds_per_host_read_change_nothing(shared_pair, per_sync, request_kwargs):
    """Rows that are done idle through the rounds past the end: outputs, sampled ones included (the extra
    rounds draw their noise after the output is final), and counters equal one read per round."""
    target, drafter = shared_pair
    ids, mask = left_padded_prompts(VOCAB, [6, 3, 5], seed=1)
    request = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 9 * per_sync, **request_kwargs}
    results = _per_sync(
        lambda graphs, sync: SpeculativeEngine(
            target, drafter, config=EngineConfig(rounds_per_sync=sync, cuda_graphs=graphs)
        ),
        [request, {**request, "max_new_tokens": 4}],
        per_sync,
    )
    _assert_per_sync_same(results)


def test_several_rounds_per_host_read_with_learning_in_flight(shared_pair):
    """In-flight learning steps inside the captured unit of rounds: what is learned, step counts and
    losses equal one read per round's."""
    ids, mask = left_padded_prompts(VOCAB, [5, 7], seed=8)
    request = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 60, "do_sample": True}
    target, drafter = shared_pair
    results = _per_sync(
        lambda graphs, sync: SpeculativeEngine(
            target, copy.deepcopy(drafter),
            config=EngineConfig(num_draft_tokens=3, in_flight_rounds=2, rounds_per_sync=sync, cuda_graphs=graphs,
                                distill=DistillConfig(rank=8, interval=1, lr=1e-2)),
        ),
        [request] * 2,
        3,  # the steps fall at different places in successive units: two captured units
    )  # fmt: skip
    _assert_per_sync_same(results)
    (reference, _), *others = results
    assert reference.learner.stats.distill_steps >= 6
    for engine, _ in others:
        _assert_learned_alike(reference.learner, engine.learner)


def test_several_rounds_per_host_read_across_vocabularies(cross_pair):
    request = _cross_request(cross_pair, ["def parse(text):\n    return", "x = [i for"], max_new_tokens=24,
                             do_sample=True)  # fmt: skip
    results = _per_sync(
        lambda graphs, sync: _cross_engine(cross_pair, rounds_per_sync=sync, cuda_graphs=graphs),
        [request, {**request, "do_sample": False}],
        4,
    )
    _assert_per_sync_same(results)
    engines = [engine for engine, _ in results]
    assert all(torch.equal(engines[0].ngram.key_ids, e.ngram.key_ids) for e in engines[1:])


def test_several_rounds_per_host_read_with_an_acceptance_head(shared_pair):
    """With an acceptance head a unit runs every draft step (no stop read), and rows still propose only
    what they drafted before stopping: greedy output stays the target's, and rows do stop early."""
    target, drafter = shared_pair
    ids, mask = left_padded_prompts(VOCAB, [5, 7], seed=3)
    for graphs in (False, True):
        engine = SpeculativeEngine(target, copy.deepcopy(drafter), config=EngineConfig(
            num_draft_tokens=5, rounds_per_sync=3, cuda_graphs=graphs,
            adaptive=AdaptiveConfig(gamma=0.5, interval=1, prior=0.7)))  # fmt: skip
        for _ in range(2):
            out = engine.generate(ids, attention_mask=mask, max_new_tokens=20, return_dict_in_generate=True)
            expected = target.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
            assert torch.equal(out.sequences, expected)
        assert out.stats.drafter_proposed < out.stats.row_rounds * 5


@pytest.mark.parametrize("rounds_per_sync", [1, 4])
def test_a_streamer_sees_every_round_when_captured(shared_pair, rounds_per_sync):
    """Captured rounds stream what they commit, one round (or unit of rounds) at a time, nothing twice."""
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.flatten().tolist())

        def end(self):
            self.chunks.append(None)

    target, drafter = shared_pair
    config = EngineConfig(cuda_graphs=True, rounds_per_sync=rounds_per_sync)
    engine = SpeculativeEngine(target, drafter, config=config)
    streamer = Collect()
    ids = torch.tensor([[7, 8, 9, 10]])
    out = engine.generate(ids, max_new_tokens=15, streamer=streamer)
    streamed = [t for chunk in streamer.chunks[1:-1] for t in chunk]
    assert streamed == out[0, 4:].tolist() and streamer.chunks[-1] is None


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_rounds_per_sync_past_what_a_request_can_use(shared_pair, cuda_graphs):
    """No request needs more rounds than max_new_tokens (each emits a token or more per running row): a
    larger rounds_per_sync runs that many (it hung at 2**63, and staged logits for every round it named)."""
    target, drafter = shared_pair
    ids, mask = left_padded_prompts(VOCAB, [5, 3], seed=4)
    expected = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=6, output_logits=True,
                               return_dict_in_generate=True)  # fmt: skip
    engine = SpeculativeEngine(
        target, drafter, config=EngineConfig(rounds_per_sync=2**63, cuda_graphs=cuda_graphs)
    )
    for _ in range(2):  # captured, then replayed
        out = engine.generate(ids, attention_mask=mask, max_new_tokens=6, output_logits=True,
                              return_dict_in_generate=True)  # fmt: skip
        assert torch.equal(out.sequences, expected.sequences)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(out.logits, expected.logits, strict=True))
    assert out.stats.rounds <= 6


def test_graph_mode_is_checked():
    with pytest.raises(TypeError, match="cuda_graphs"):
        EngineConfig(cuda_graphs="yes")
    with pytest.raises(ValueError, match="rounds_per_sync"):
        EngineConfig(rounds_per_sync=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_on_the_zoo_pair():
    """Real CUDA graphs: greedy and sampled outputs, and the target's logits kept for ``output_logits``
    (staged inside the captured rounds), equal eager mode's on the embedded pair, every configuration of
    the round (shared, cross, cascade, adaptive, several rounds per host read); the second request, on
    other prompts, replays the graphs kept from the first (reseeded generator included)."""
    from omnidraft_fast.zoo import load

    zoo = load("code-pair", device="cuda")
    prompts, others = (
        zoo.target_tokenizer(texts, return_tensors="pt", padding=True).to("cuda")
        for texts in (["def parse(text):\n", "Question: Tom has 3 apples"], ["import os\n", "The river"])
    )
    cross = {"target_tokenizer": zoo.target_tokenizer, "drafter_tokenizer": zoo.drafter_tokenizer}
    cases = [
        (zoo.drafter_shared, {}, {}),
        (zoo.drafter_cross, cross, {}),
        (zoo.drafter_shared, {}, {"cascade": CascadeConfig("token_v3", 0.3)}),
        (zoo.drafter_shared, {}, {"adaptive": AdaptiveConfig()}),
        (zoo.drafter_cross, cross, {"rounds_per_sync": 4}),  # graph-safe RNG across units of rounds
    ]
    for drafter, tokenizers, config in cases:
        for sampling in ({}, {"do_sample": True, "top_k": 20}):
            request = {"max_new_tokens": 48, "output_logits": True, **sampling}
            results = _both_modes(
                lambda graphs, d=drafter, t=tokenizers, c=config: SpeculativeEngine(
                    zoo.target,
                    copy.deepcopy(d),
                    **t,
                    config=EngineConfig(**c, cuda_graphs=graphs, time_stages=True),
                ),
                [{**prompts, **request}, {**others, **request}],
            )
            replayed = (
                "draft" if "adaptive" in config else "rounds" if "rounds_per_sync" in config else "round"
            )
            _assert_same(results, replayed_stage=replayed)
            for eager, captured in zip(results[0][1], results[1][1], strict=True):
                a, b = torch.stack(eager.logits), torch.stack(captured.logits)
                assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
            if "adaptive" not in config:  # a learner's engine keeps no graphs
                assert _replayed_from_the_start(results[1][1][1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_with_in_flight_learning():
    """Real CUDA graphs replayed across LoRA and head updates made in the middle of the request, the
    updates themselves a captured stage (backward and AdamW included): the target's greedy output is
    unchanged, the learners stepped, the draft and learning stages were captured, and the next request
    replays the kept ones."""
    from omnidraft_fast.zoo import load

    zoo = load("code-pair", device="cuda")
    prompts = zoo.target_tokenizer(["def parse(text):\n", "Question: Tom has 3 apples"], return_tensors="pt",
                                   padding=True).to("cuda")  # fmt: skip
    config = EngineConfig(cuda_graphs=True, time_stages=True, in_flight_rounds=2,
                          distill=DistillConfig(interval=1, lr=1e-3), adaptive=AdaptiveConfig(interval=1))  # fmt: skip
    engine = SpeculativeEngine(zoo.target, copy.deepcopy(zoo.drafter_shared), config=config)
    out = engine.generate(**prompts, max_new_tokens=48, return_dict_in_generate=True)
    assert torch.equal(out.sequences, zoo.target.generate(**prompts, max_new_tokens=48, do_sample=False))
    assert engine.learner.stats.distill_steps >= 3 and "draft" in out.stats.stage_seconds
    assert "capture:update" in out.stats.stage_seconds  # the learning step itself was captured
    # A second request of the same width replays the kept graphs, the learning step's among them.
    again = engine.generate(**prompts, max_new_tokens=48, return_dict_in_generate=True)
    assert torch.equal(again.sequences, out.sequences)
    assert "update" in again.stats.stage_seconds and "capture:update" not in again.stats.stage_seconds
