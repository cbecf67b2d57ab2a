"""The README demo: plain ``model.generate()`` against this engine on a model pair built from configs.

Until the embedded, trained model pair ships, the demo builds a randomly initialised Llama-architecture
target and an *early-exit* drafter: a copy of the target's embeddings, first layer(s), final norm and
head. No checkpoint is downloaded. Random weights make the acceptance rate a property of this toy pair,
not of real models; what the demo shows is the mechanics (identical greedy output, fewer target calls)
and the timings on this machine, measured side by side in one process.
"""

from __future__ import annotations

import copy
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .engine import SpeculativeEngine

__all__ = ["build_demo_pair", "run_demo"]


def build_demo_pair(
    *, vocab_size: int = 8192, hidden: int = 512, layers: int = 8, drafter_layers: int = 1, seed: int = 0
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A random Llama target and its early-exit drafter (the first ``drafter_layers`` layers of it)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    target = LlamaForCausalLM(config).eval()
    drafter = copy.deepcopy(target)
    drafter.model.layers = drafter.model.layers[:drafter_layers]
    drafter.config.num_hidden_layers = drafter_layers
    if hasattr(drafter.config, "layer_types") and drafter.config.layer_types is not None:
        drafter.config.layer_types = drafter.config.layer_types[:drafter_layers]
    return target, drafter.eval()


def _timed(fn):
    begin = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - begin


def run_demo(
    *,
    prompts: int = 3,
    prompt_length: int = 16,
    max_new_tokens: int = 64,
    num_draft_tokens: int = 4,
    seed: int = 0,
) -> dict:
    """Generate greedily for a few random prompts both ways; print a side-by-side table and return the figures."""
    target, drafter = build_demo_pair(seed=seed)
    engine = SpeculativeEngine(target, drafter)
    generator = torch.Generator().manual_seed(seed + 1)
    print(
        f"omnidraft_fast demo: random Llama target ({sum(p.numel() for p in target.parameters()) / 1e6:.1f}M "
        f"params, {target.config.num_hidden_layers} layers) and its early-exit drafter "
        f"({drafter.config.num_hidden_layers} layer); built from configs, no checkpoint. Greedy, "
        f"{max_new_tokens} new tokens per prompt, k={num_draft_tokens}, device {engine.device}.\n"
    )
    # Warm-up so neither side pays one-time costs in the timings.
    warm = torch.randint(0, target.config.vocab_size, (1, prompt_length), generator=generator)
    target.generate(warm, max_new_tokens=4, do_sample=False)
    engine.generate(warm, max_new_tokens=4)
    engine.stats = type(engine.stats)()

    plain_seconds = spec_seconds = 0.0
    identical = True
    for index in range(prompts):
        ids = torch.randint(0, target.config.vocab_size, (1, prompt_length), generator=generator)
        expected, seconds = _timed(
            lambda ids=ids: target.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        )
        plain_seconds += seconds
        out, seconds = _timed(
            lambda ids=ids: engine.generate(
                ids, max_new_tokens=max_new_tokens, num_draft_tokens=num_draft_tokens
            )
        )
        spec_seconds += seconds
        same = torch.equal(out, expected)
        identical &= same
        print(
            f"prompt {index}: new ids {out[0, prompt_length : prompt_length + 16].tolist()} ...  identical to target: {same}"
        )

    stats = engine.stats
    tokens = prompts * max_new_tokens
    rows = [
        ("transformers model.generate()", tokens / plain_seconds, "-", "-", 1.0),
        (
            "omnidraft_fast (this engine)",
            tokens / spec_seconds,
            f"{stats.acceptance_rate:.1%}",
            f"{stats.mean_accepted_length:.2f}",
            stats.target_calls_per_token,
        ),
    ]
    print(f"\n{'decoding':32} {'tok/s':>8} {'acceptance':>11} {'accepted len':>13} {'target calls/tok':>17}")
    for name, speed, acceptance, length, calls in rows:
        print(f"{name:32} {speed:8.1f} {acceptance:>11} {length:>13} {calls:17.3f}")
    print(f"\nspeed-up {plain_seconds / spec_seconds:.2f}x, greedy outputs identical: {identical}")
    print(f"engine stages: {', '.join(f'{k} {v * 1e3:.0f} ms' for k, v in stats.stage_seconds.items())}")
    return {
        "plain_tokens_per_second": tokens / plain_seconds,
        "engine_tokens_per_second": tokens / spec_seconds,
        "identical": identical,
        "stats": stats.as_dict(),
    }
