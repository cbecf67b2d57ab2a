"""Architectures beyond the Llama family: exact where the engine supports them, refused by name where not.

Each refusal is a model whose forward the engine's slot cache cannot reproduce (a recurrent state, an ALiBi
bias built from a 2-D mask, attention right only within a width, long RoPE switching factors mid-request,
a forward that cannot be captured): without it the output would silently differ from ``model.generate()``
or fail deep inside transformers.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import left_padded_prompts, perturbed_copy, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

import omnidraft_fast
from omnidraft_fast import EngineConfig, SpeculativeEngine
from omnidraft_fast.graphs import CaptureError

VOCAB = 96


def model(arch: str, seed: int = 0, **fields) -> torch.nn.Module:
    """A tiny randomly initialised ``arch`` model (hidden 32, 2 layers) in float32 eval mode."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    gpt = dict(n_embd=32, n_layer=2, n_head=4, n_positions=128)
    sizes = {
        "bloom": dict(hidden_size=32, n_layer=2, n_head=4),
        "gpt_neo": dict(hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=128),
        "mpt": dict(d_model=32, n_layers=2, n_heads=4),
        "mamba": dict(hidden_size=32, num_hidden_layers=2, state_size=4),
        "opt": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32,
                    max_position_embeddings=128),
        "gpt_neox": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         max_position_embeddings=128),
        "falcon": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128),
        "gpt_bigcode": gpt,
        "gptj": dict(gpt, rotary_dim=4),
        "codegen": dict(gpt, rotary_dim=4, n_ctx=128),
    }.get(
        arch,
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128),
    )  # fmt: skip
    config = AutoConfig.for_model(arch, **{**common, **sizes, **fields})
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def greedy_pair(target, drafter, lengths, new, **kwargs):
    ids, mask = left_padded_prompts(VOCAB, lengths, seed=2)
    expected = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new)
    out = omnidraft_fast.generate(
        target, ids, attention_mask=mask, drafter=drafter, max_new_tokens=new, **kwargs
    )
    return out, expected


SUPPORTED = ("qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt_neox", "opt", "falcon", "olmo2", "starcoder2",
             "stablelm", "granite", "cohere", "gpt_bigcode", "gptj", "codegen", "mpt", "mistral", "phi")  # fmt: skip


@pytest.mark.parametrize("arch", SUPPORTED)
def test_greedy_is_transformers_across_architectures(arch):
    """Batched, eager and captured (two requests replaying one set of stages): model.generate()'s tokens."""
    fields = {"head_dim": 8} if arch.startswith("gemma") else {}
    target = model(arch, **fields)
    drafter = perturbed_copy(target, 0.2, seed=1)
    engines = [SpeculativeEngine(target, drafter, config=EngineConfig(cuda_graphs=g)) for g in (False, True)]
    for seed, lengths in ((2, [7, 3, 5]), (3, [4, 6, 2])):
        ids, mask = left_padded_prompts(VOCAB, lengths, seed=seed)
        expected = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=16)
        for engine in engines:
            assert torch.equal(engine.generate(ids, attention_mask=mask, max_new_tokens=16), expected)
    assert engines[1].stats.acceptance_rate > 0  # drafts were accepted, not only corrected


@pytest.mark.parametrize("lean", [True, False])
@pytest.mark.parametrize("arch", ["qwen2", "gemma2", "gemma3_text"])
def test_layers_mixing_sliding_and_full_attention_beyond_the_window(arch, lean):
    """One mask per layer type (transformers' mask mapping): exact far past the window, eager and captured."""
    fields = {"head_dim": 8} if arch.startswith("gemma") else {}
    target = model(arch, sliding_window=6, layer_types=["sliding_attention", "full_attention"],
                   use_sliding_window=True, **fields)  # fmt: skip
    drafter = perturbed_copy(target, 0.2, seed=1)
    for graphs in (False, True):
        engine = SpeculativeEngine(
            target, drafter, config=EngineConfig(cuda_graphs=graphs, lean_forward=lean)
        )
        assert engine.target.layer_window == 6 and engine.target.width_limit is None
        for seed, lengths in ((2, [9, 4, 6]), (3, [5, 8])):
            ids, mask = left_padded_prompts(VOCAB, lengths, seed=seed)
            expected = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=24)
            assert torch.equal(engine.generate(ids, attention_mask=mask, max_new_tokens=24), expected)


@pytest.mark.parametrize("layer_types", [["sliding_attention"] * 2, ["sliding_attention", "full_attention"]])
def test_a_multimodal_models_text_settings(layer_types):
    """A multimodal model (Gemma 3's image-text-to-text) keeps its language settings in its text config: its
    sliding window is read there, so that prompts served text-only are exact far past the window, eager and
    captured (the window went unseen before, and the outputs differed)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=128, sliding_window=6,
                layer_types=layer_types, bos_token_id=None, eos_token_id=None, pad_token_id=None)  # fmt: skip
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)  # fmt: skip
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=95,
                          boi_token_index=94, eoi_token_index=93)  # fmt: skip
    torch.manual_seed(0)
    target = Gemma3ForConditionalGeneration(config).eval()
    ids, mask = left_padded_prompts(90, [9, 4, 6], seed=2)  # below the image token ids
    expected = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20)
    for graphs in (False, True):
        engine = SpeculativeEngine(target, target, config=EngineConfig(cuda_graphs=graphs))
        assert (engine.target.sliding_window or engine.target.layer_window) == 6
        assert torch.equal(engine.generate(ids, attention_mask=mask, max_new_tokens=20), expected)


@pytest.mark.parametrize(
    ("arch", "fields", "match"),
    [
        ("bloom", {}, "ALiBi"),
        ("falcon", {"alibi": True, "hidden_size": 32, "num_attention_heads": 4}, "ALiBi"),
        ("mamba", {}, "rolled back"),
        ("cpmant", {}, "no `position_ids`"),
        ("roberta", {}, r"bidirectional .* load it with is_decoder=True"),
        ("megatron-bert", {}, "bidirectional"),
        ("rwkv", {}, "recurrent"),  # 5.17 marks it stateful; 5.2x: its forward takes a `state`, no cache
        ("openai-gpt", {"n_embd": 32, "n_layer": 2, "n_head": 4}, "no key/value cache"),
        (
            "roformer",
            {"is_decoder": True},
            r"no `position_ids` \(it numbers positions from its cache's length\)",
        ),
        ("trocr", {"d_model": 32, "decoder_layers": 2, "decoder_attention_heads": 4}, "no `position_ids`"),
        ("lfm2", {"layer_types": ["conv", "full_attention"]}, r"layers of type \['conv'\]"),
    ],
)
@pytest.mark.parametrize("role", ["model", "drafter"])
def test_unsupported_models_refused_by_name(arch, fields, match, role):
    odd, llama = model(arch, **fields), tiny_model("llama", VOCAB, seed=1)
    target, drafter = (odd, llama) if role == "model" else (llama, odd)
    with pytest.raises(ValueError, match=rf"`{role}` \(\w+\) is not supported by omnidraft_fast: .*{match}"):
        SpeculativeEngine(target, drafter)


@pytest.mark.parametrize(
    ("arch", "fields", "limit", "why"),
    [
        ("gpt_neo", {"attention_types": [[["global", "local"], 1]], "window_size": 24}, 24, "local attention"),
        ("gpt_neo", {"attention_types": [[["global"], 2]], "max_position_embeddings": 40}, 40, "causal-mask buffer"),
        ("mpt", {"max_seq_len": 40}, 40, "ALiBi buffer"),
        ("llama4_text", {"attention_chunk_size": 24, "intermediate_size_mlp": 64, "num_local_experts": 1,
                         "no_rope_layers": [1, 1]}, 24, "chunked attention"),
    ],
)  # fmt: skip
def test_attention_right_within_a_width(arch, fields, limit, why):
    """Exact up to the width (no prompt padding takes it past), refused with the reason beyond it."""
    target = model(arch, **fields)
    drafter = copy.deepcopy(target)
    assert SpeculativeEngine(target, drafter).target.width_limit == limit
    # the drafter's cache is the widest: prompt, new tokens, one slot and the draft's overrun (k = 4)
    out, expected = greedy_pair(target, drafter, [9, 4, 6], limit - 9 - 9)
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match=rf"`model` [a-z ]*{why}.*supported within {limit} slots only"):
        omnidraft_fast.generate(target, torch.tensor([[5] * 9]), drafter=drafter, max_new_tokens=limit - 9)
    out, expected = greedy_pair(target, drafter, [5], 8)  # the engine is still usable
    assert torch.equal(out, expected)


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_a_request_too_wide_for_the_drafter_is_refused_before_any_cache_is_made(cuda_graphs):
    """The drafter's cache is the widest: a request within the target's width but past a local-attention
    drafter's is refused before the target's cache for it is made (it was left held by the engine until
    the next request), before a sampled one draws its seed from torch's RNG, and the engine then serves as a
    fresh one."""
    target = tiny_model("llama", VOCAB, seed=1)
    drafter = model("gpt_neo", attention_types=[[["global", "local"], 1]], window_size=24)
    engine = SpeculativeEngine(target, drafter, config=EngineConfig(cuda_graphs=cuda_graphs))
    ids = torch.tensor([[5] * 9])
    expected = engine.generate(ids, max_new_tokens=4)  # kept for reuse with cuda_graphs
    with pytest.raises(ValueError, match=r"`drafter` has local attention .* needs 28 cache slots"):
        engine.generate(ids, max_new_tokens=10)  # target: 24 slots, the drafter's window; drafter: 28
    assert engine.target.cache is None and engine.drafter.cache is None
    rng = torch.random.get_rng_state()  # a refused sampled request draws nothing, as in transformers
    with pytest.raises(ValueError, match=r"`drafter` has local attention .* needs 28 cache slots"):
        engine.generate(ids, max_new_tokens=10, do_sample=True)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert len(engine.rounds._kept._entries) == int(cuda_graphs)
    fresh = SpeculativeEngine(target, drafter, config=EngineConfig(cuda_graphs=cuda_graphs))
    assert torch.equal(engine.generate(ids, max_new_tokens=4), expected)
    assert torch.equal(fresh.generate(ids, max_new_tokens=4), expected)


def test_long_rope_switch_refused_when_crossed():
    """Phi-3 long RoPE: transformers recomputes the cache with the long factors once past the switch."""
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
            "long_factor": [3.0**i for i in range(8)], "original_max_position_embeddings": 16}  # fmt: skip
    target = model("phi3", rope_parameters=rope, original_max_position_embeddings=16, num_attention_heads=2)
    drafter = copy.deepcopy(target)
    assert SpeculativeEngine(target, drafter).target.rope_switch == 16
    with pytest.raises(ValueError, match=r"long RoPE switches .* past position 16.*9-token prompt \+ 10 new"):
        greedy_pair(target, drafter, [9, 4], 10)
    for lengths, new in (([9, 4], 7), ([20, 17], 10)):  # within the switch, and started past it
        out, expected = greedy_pair(target, drafter, lengths, new)
        assert torch.equal(out, expected)


def test_a_forward_that_cannot_be_captured_names_the_fix():
    """Mixture-of-experts routing sizes tensors by values: eager is exact, capture names both fixes, and the
    fixed-shape experts implementation it names captures."""
    target = model("mixtral", num_local_experts=4, num_experts_per_tok=2)
    drafter = tiny_model("llama", VOCAB, seed=1)
    ids, mask = left_padded_prompts(VOCAB, [6, 3], seed=2)
    expected = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12)
    engine = SpeculativeEngine(target, drafter, config=EngineConfig(cuda_graphs=True))
    with pytest.raises(CaptureError, match=r"could not be captured.*cuda_graphs=False.*'batched_mm'"):
        engine.generate(ids, attention_mask=mask, max_new_tokens=12)
    assert torch.equal(SpeculativeEngine(target, drafter).generate(ids, attention_mask=mask, max_new_tokens=12),
                       expected)  # fmt: skip
    target.set_experts_implementation("batched_mm")
    engine = SpeculativeEngine(target, drafter, config=EngineConfig(cuda_graphs=True))
    for _ in range(2):  # captured, then replayed
        out = engine.generate(ids, attention_mask=mask, max_new_tokens=12, return_dict_in_generate=True)
        assert torch.equal(out.sequences, expected)
    stages = set(out.stats.stage_seconds)  # the second request replays every stage: none runs eagerly
    assert "target" not in stages and not any(stage.startswith("capture:") for stage in stages)


def test_a_host_read_outside_the_dispatcher_is_refused_when_captured():
    """JetMoE's router sizes its expert splits with ``.tolist()``, which on a CPU tensor reaches no
    dispatcher: the recorder refuses it (a replay would reuse the first round's sizes: wrong tokens)."""
    target = model("jetmoe", kv_channels=8)
    drafter = perturbed_copy(target, 0.2, seed=1)
    ids, mask = left_padded_prompts(VOCAB, [7, 3, 5], seed=2)
    expected = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=16)
    assert torch.equal(SpeculativeEngine(target, drafter).generate(ids, attention_mask=mask, max_new_tokens=16),
                       expected)  # fmt: skip
    engine = SpeculativeEngine(target, drafter, config=EngineConfig(cuda_graphs=True))
    with pytest.raises(CaptureError, match=r"could not be captured.*`\.tolist\(\)` reads a tensor back"):
        engine.generate(ids, attention_mask=mask, max_new_tokens=16)


def test_mixed_windows_without_a_mask_mapping_serve_within_the_window(monkeypatch):
    """A decoder that takes no per-layer-type masks gets one mask for every layer: right within the window."""
    import omnidraft_fast.models as models

    monkeypatch.setattr(models, "_takes_layer_masks", lambda model: False)
    target = model("qwen2", sliding_window=24, layer_types=["sliding_attention", "full_attention"],
                   use_sliding_window=True)  # fmt: skip
    drafter = perturbed_copy(target, 0.2, seed=1)
    engine = SpeculativeEngine(target, drafter)
    assert engine.target.layer_window is None and engine.target.width_limit == 24
    out, expected = greedy_pair(target, drafter, [9, 4, 6], 24 - 9 - 9)
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match=r"`model` mixes sliding-window \(window 24\).*within 24 slots only"):
        omnidraft_fast.generate(target, torch.tensor([[5] * 9]), drafter=drafter, max_new_tokens=15)
