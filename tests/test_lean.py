"""lean.py's forward: transformers' logits bit for bit where both attend alike, in fewer ops."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHITECTURES, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

from omnidraft_fast.models import CausalLM

VOCAB = 64
STEPS = (  # (first token, n, last_only): prefill, a block, a rollback to one token, a verification
    (0, 6, False),
    (6, 3, True),
    (7, 1, True),
    (8, 1, False),
    (8, 4, False),
)


def _adapted(arch: str, dtype: torch.dtype, mode: str) -> torch.nn.Module:
    """A tiny ``arch`` model without grouped queries (``kv_heads=4``: the lean forward then calls SDPA as
    transformers does), with a LoRA adapter (``mode`` "lora", "training") and in training mode with every
    dropout on ("training")."""
    from peft import LoraConfig, inject_adapter_in_model

    model = tiny_model(arch, VOCAB, seed=7, dtype=dtype, kv_heads=4)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or "ln_" in name:
                parameter.normal_(1, 0.2)  # norms start at 1, which rounds alike in any order
    if mode != "eval":
        modules = ["c_attn", "c_fc"] if arch == "gpt2" else ["q_proj", "v_proj", "down_proj"]
        config = LoraConfig(r=4, lora_dropout=0.2, target_modules=modules, fan_in_fan_out=arch == "gpt2")
        inject_adapter_in_model(config, model)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.1)  # peft starts B at zero: make the adapter count
    model.train(mode == "training")  # GPT-2's dropouts (0.1) and LoRA's (its layers start in training mode)
    if mode == "training" and arch != "gpt2":
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = 0.3
    return model


def _same_steps(model: torch.nn.Module) -> None:
    """Both forwards, step by step from the same RNG state, give the same logits and hidden states, bit for
    bit, and leave the RNG in the same state."""
    runners = {lean: CausalLM(model, "model", lean=lean) for lean in (True, False)}
    assert runners[True].lean
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    for runner in runners.values():
        runner.begin(torch.tensor([1, 3]), max_slots=16)  # row 1: two slots of left padding
    for first, n, last_only in STEPS:
        tokens, slots = ids[:, first : first + n], torch.arange(first, first + n).expand(2, n)
        outputs = {}
        for lean, runner in runners.items():
            torch.manual_seed(11)
            outputs[lean] = (*runner.forward(tokens, slots, last_only=last_only, hidden=True), torch.rand(1))
        step = (first, n, last_only)
        (logits, hidden, draw), (expected_logits, expected_hidden, expected_draw) = outputs.values()
        assert torch.equal(hidden, expected_hidden) and torch.equal(draw, expected_draw), step
        if last_only and n > 1:  # transformers' head reads a strided slice of its states: another gemm path
            expected_logits = model.get_output_embeddings()(expected_hidden.contiguous())
        assert torch.equal(logits, expected_logits), step


@pytest.mark.parametrize("mode", ["eval", "lora", "training"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lean_forward_is_transformers_forward_bit_for_bit(arch, dtype, mode):
    """Without grouped queries to fold, the lean forward's 2-D hidden states, written-out modules
    (linears, RMS norms, MLPs, Conv1D, layer norms, dropouts) and sign-folded rotation compute exactly
    transformers' ops: the same bits, with LoRA layers, and in training mode the same dropout draws."""
    _same_steps(_adapted(arch, dtype, mode))


@pytest.mark.parametrize(("by_layer", "by_head_dim"), [(True, True), (True, False), (False, False)])
def test_gpt2_attention_scaled_as_its_config_says(by_layer, by_head_dim):
    """GPT-2's two scaling options (``scale_attn_by_inverse_layer_idx``, ``scale_attn_weights``), which its
    attention folds into ``scaling``: the lean forward scales each layer alike, bit for bit."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(7)
    config = GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=64, vocab_size=VOCAB, bos_token_id=None,
                        eos_token_id=None, pad_token_id=None, scale_attn_by_inverse_layer_idx=by_layer,
                        scale_attn_weights=by_head_dim)  # fmt: skip
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # attention logits large enough that a scale left out changes the output
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(4)
    _same_steps(model)


class _OffsetLinear(torch.nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 0.25


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_modules_of_other_types_run_their_own_forward(arch):
    """Only modules of exactly the written-out types (and with no forward set on the instance) are written
    out: a subclass of ``nn.Linear`` and a module whose ``forward`` was replaced run their forward; a
    written-out module reads a weight held as a buffer where its forward would."""
    model = tiny_model(arch, VOCAB, seed=7, kv_heads=4)
    if arch == "gpt2":
        block = model.transformer.h[0]
        layer_norm, mlp = block.ln_2, block.mlp
    else:
        layer = model.model.layers[0]
        layer_norm, mlp = layer.post_attention_layernorm, layer.mlp
        projection = layer.self_attn.q_proj
        offset = _OffsetLinear(projection.in_features, projection.out_features, bias=False)
        offset.weight = projection.weight
        layer.self_attn.q_proj = offset
    last = model.transformer.h[-1].mlp.c_fc if arch == "gpt2" else model.model.layers[-1].mlp.up_proj
    weight = last.weight.detach().clone()
    del last.weight
    last.register_buffer("weight", weight)
    mlp_forward = mlp.forward
    mlp.forward = lambda x: mlp_forward(x) * 1.5
    layer_norm.forward = lambda x: torch.nn.LayerNorm.forward(layer_norm, x) - 0.5 if arch == "gpt2" else x
    _same_steps(model)


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _step_ops(arch: str, layers: int) -> list[str]:
    """The aten ops of a one-token step (two rows, the last position's logits) of a tiny fp16 ``arch``."""
    runner = CausalLM(tiny_model(arch, VOCAB, layers=layers, dtype=torch.float16), "model")
    runner.begin(torch.tensor([0, 1]), max_slots=8)
    ids, slots = torch.zeros(2, 1, dtype=torch.int64), torch.tensor([[3], [3]])
    runner.forward(ids, slots)
    with _Ops() as ops:
        runner.forward(ids, slots, last_only=True)
    return ops.names


# A Llama layer's one-token step: RMS norm; q, k, v each t + mm + a view to heads (no 3-D linear's views); a
# rotation in mul, roll, mul, add (no rotate_half's slices, neg and cat); k and v transposed to heads-major
# for the cache (q, one token's, is viewed so: no transpose); attention; o_proj; RMS norm; MLP.
_RMS_NORM = ["_to_copy", "pow", "mean", "add", "rsqrt", "mul", "_to_copy", "mul"]
_ROTATION = ["mul", "roll", "mul", "add"]
_LLAMA_LAYER = [
    *_RMS_NORM, "t", "mm", "view", "t", "mm", "view", *_ROTATION, *_ROTATION, "transpose", "t", "mm", "view",
    "transpose",
    "scatter_", "scatter_", "view", "_scaled_dot_product_flash_attention_for_cpu", "view", "t", "mm", "add",
    *_RMS_NORM, "t", "mm", "silu", "t", "mm", "mul", "t", "mm", "add",
]  # fmt: skip
# A GPT-2 block's: layer norm, Conv1D (addmm on the 2-D states), heads, attention, Conv1D, MLP (gelu_new)
_GPT2_LAYER = [
    "native_layer_norm", "addmm", "split", "view", "view", "view", "transpose", "transpose", "scatter_",
    "scatter_", "view",
    "_scaled_dot_product_flash_attention_for_cpu", "view", "addmm", "add", "native_layer_norm", "addmm",
    "mul", "pow", "mul", "add", "mul", "tanh", "add", "mul", "addmm", "add",
]  # fmt: skip


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_decode_step_layer_costs_these_ops(arch):
    """What a second decoder layer adds to a one-token step: 52 ops for a Llama layer (75 with 3-D hidden
    states and rotate_half), 27 for a GPT-2 block (38)."""
    one, two = _step_ops(arch, 1), _step_ops(arch, 2)
    layer = _LLAMA_LAYER if arch == "llama" else _GPT2_LAYER
    assert any(two == one[:at] + layer + one[at:] for at in range(len(one) + 1)), two


def _step_names(runner: CausalLM) -> list[str]:
    """The aten ops of ``runner``'s one-token step (two rows, at slot 7), after a first one."""
    ids, slots = torch.zeros(2, 1, dtype=torch.int64), torch.tensor([[7], [7]])
    runner.forward(ids, slots, last_only=True)
    with _Ops() as ops:
        runner.forward(ids, slots, last_only=True)
    return ops.names


ROPE = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0},  # attention_scaling 1.139
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    "longrope": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.5, 2.0, 3.0],
                 "long_factor": [2.0, 3.0, 4.0, 6.0], "original_max_position_embeddings": 128},
}  # fmt: skip


def _roped(rope: str, dtype: torch.dtype) -> torch.nn.Module:
    """A tiny Llama model (no grouped queries) with the rotary type ``rope``, its norms away from 1."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256, rope_parameters=ROPE[rope], bos_token_id=None,
        eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(dtype).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(1, 0.2)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rope", list(ROPE))
def test_the_rotation_is_looked_up_where_the_rotary_type_allows(rope, dtype):
    """A rotary type whose frequencies are fixed (default, linear, llama3, yarn: a function of the position
    alone) is a lookup in the request's table of the module's own cos/sin, two ops (``index``, ``unbind``)
    instead of the module's forward and the sign fold; dynamic and long RoPE, whose frequencies follow the
    positions of each forward, run the module at every forward. transformers' bits either way."""
    model = _roped(rope, dtype)
    _same_steps(model)
    runner = CausalLM(model, "model")
    runner.begin(torch.tensor([1, 3]), max_slots=16)
    names = _step_names(runner)
    looked_up = rope not in ("dynamic", "longrope")
    assert ("cos" not in names and names.count("index") == 1) == looked_up, names


def test_the_rotation_table_follows_the_model_between_requests():
    """The table follows the model: made in the model's dtype for a request's new cache after a cast, and
    made again on a cache that a later request takes over (kept graphs) when what its values come from
    changed: ``inv_freq`` written in place, a new ``attention_scaling``. Each request's outputs are
    transformers' bits on the model as it is then."""
    model = tiny_model("llama", VOCAB, seed=7, kv_heads=4)
    rotary = model.model.rotary_emb
    lean, plain = CausalLM(model, "model"), CausalLM(model, "model", lean=False)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    changes = {
        "first": lambda: None,
        "fp16": lambda: model.to(torch.float16),
        "inv_freq": lambda: rotary.inv_freq.mul_(0.75),
        "scaling": lambda: setattr(rotary, "attention_scaling", 0.5),
        "bf16": lambda: model.to(torch.bfloat16),
        "fp32": lambda: model.to(torch.float32),
    }
    for change, apply in changes.items():
        apply()
        outputs = []
        for runner in (lean, plain):
            kept = runner.cache if runner is lean and change in ("inv_freq", "scaling") else None
            runner.begin(torch.tensor([1, 3]), max_slots=16, cache=kept)
            prefill = runner.forward(ids[:, :6], torch.arange(6).expand(2, 6))
            step = runner.forward(ids[:, 6:7], torch.tensor([[6], [6]]), last_only=True)
            outputs.append((prefill, step))
        assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1]), change
        assert lean.cache.rotation[2].dtype == model.dtype, change


@pytest.mark.parametrize("patched", ["LlamaRMSNorm", "LlamaMLP", "Linear"])
def test_a_class_whose_forward_is_patched_after_a_request_runs_its_forward(patched, monkeypatch):
    """The types written out are looked up again when a class's ``forward`` changes after a first request
    (a patched ``forward``, or torch's own classes': none of them is written out then), and written out
    again once the original is back."""
    from transformers.models.llama import modeling_llama

    model = tiny_model("llama", VOCAB, seed=7, kv_heads=4)
    _same_steps(model)
    runner = CausalLM(model, "model")
    runner.begin(torch.tensor([1, 3]), max_slots=16)
    written_out = _step_names(runner)
    cls = torch.nn.Linear if patched == "Linear" else getattr(modeling_llama, patched)
    original = cls.forward
    monkeypatch.setattr(cls, "forward", lambda self, x: original(self, x) * 1.5)
    _same_steps(model)
    assert len(_step_names(runner)) > len(written_out)  # the patched forward's ops, not the written-out ones
    monkeypatch.undo()
    assert _step_names(runner) == written_out


def test_attention_output_in_any_layout(monkeypatch):
    """CUDA's attention kernels may return grouped-query output laid out so that no view splits its query
    axis (the H200 run of 2026-12-04 failed there, in a test with threads capturing): the lean forward reads
    any layout, with the same logits."""
    model = tiny_model("llama", VOCAB, seed=7, kv_heads=2)  # four query heads on two key/value heads
    tokens = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    slots = torch.arange(5).expand(2, 5)

    def logits() -> torch.Tensor:
        runner = CausalLM(model, "model", lean=True)
        assert runner.lean
        runner.begin(torch.tensor([0, 0]), max_slots=16)
        return runner.forward(tokens, slots, last_only=False, hidden=True)[0]

    expected = logits()
    attention = torch.nn.functional.scaled_dot_product_attention

    def transposed(*args, **kwargs):  # the same values, stored [batch, queries, kv_heads, head_dim]
        return attention(*args, **kwargs).transpose(1, 2).contiguous().transpose(1, 2)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", transposed)
    assert torch.equal(logits(), expected)
