"""The README demo: plain ``model.generate()`` against this engine on the embedded, trained model pair.

It loads the zoo's ``code-pair`` (a small trained target, a drafter sharing its vocabulary and a drafter
with a different, SentencePiece-style vocabulary), generates greedily for held-out prompts (code, math,
prose) and prints the cross-vocabulary text and a table of the four ways of decoding (plain, each
drafter, and prompt lookup without a drafter), timed side by side in one process on this machine.
"""

from __future__ import annotations

import time

import torch

from .config import EngineConfig
from .engine import SpeculativeEngine
from .zoo import load
from .zoo.data import heldout_prompts

__all__ = ["run_demo"]


def run_demo(*, prompts_per_task: int = 1, max_new_tokens: int = 48, num_draft_tokens: int = 4) -> dict:
    """Run the demo; print text and a table; return the figures (``identical`` is the greedy check)."""
    zoo = load("code-pair")
    target, tokenizer = zoo.target, zoo.target_tokenizer
    config = EngineConfig(num_draft_tokens=num_draft_tokens)
    engines = {
        "omnidraft_fast, shared-vocabulary drafter": SpeculativeEngine(target, zoo.drafter_shared, config=config),
        "omnidraft_fast, cross-vocabulary drafter": SpeculativeEngine(
            target, zoo.drafter_cross, target_tokenizer=tokenizer, drafter_tokenizer=zoo.drafter_tokenizer,
            config=config,
        ),
        "omnidraft_fast, prompt lookup (no drafter)": SpeculativeEngine(target, None, config=config),
    }  # fmt: skip
    prompts = heldout_prompts(prompts_per_task)
    params = sum(p.numel() for p in target.parameters()) / 1e6
    print(
        f"omnidraft_fast demo on the embedded code-pair: target {params:.1f}M params (byte-level BPE, "
        f"{target.config.vocab_size} ids), drafters "
        f"{sum(p.numel() for p in zoo.drafter_cross.parameters()) / 1e6:.1f}M params (one with the target's "
        f"vocabulary, one with a {zoo.drafter_cross.config.vocab_size}-id SentencePiece-style vocabulary). "
        f"Greedy, {max_new_tokens} new tokens, k={num_draft_tokens}, {len(prompts)} held-out prompts, CPU threads "
        f"{torch.get_num_threads()}.\n"
    )
    warm = tokenizer("def f(x):", return_tensors="pt").input_ids
    target.generate(warm, max_new_tokens=4, do_sample=False)
    for engine in engines.values():
        engine.generate(warm, max_new_tokens=4)
        engine.stats = type(engine.stats)()

    seconds = dict.fromkeys(["transformers model.generate()", *engines], 0.0)
    plain_tokens = 0
    identical = True
    for task, prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        began = time.perf_counter()
        expected = target.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        seconds["transformers model.generate()"] += time.perf_counter() - began
        plain_tokens += expected.shape[1] - ids.shape[1]
        outputs = {}
        for name, engine in engines.items():
            began = time.perf_counter()
            outputs[name] = engine.generate(ids, max_new_tokens=max_new_tokens)
            seconds[name] += time.perf_counter() - began
            identical &= torch.equal(outputs[name], expected)
        cross = outputs["omnidraft_fast, cross-vocabulary drafter"]
        text = tokenizer.decode(cross[0, ids.shape[1] :], skip_special_tokens=True)
        print(f"--- {task} prompt (end): ...{prompt[-70:]!r}\n--- cross-vocabulary continuation:\n{text}\n")

    plain = seconds["transformers model.generate()"]
    tokens = {name: (engine.stats.new_tokens or 1) for name, engine in engines.items()}
    print(
        f"{'decoding':44} {'tok/s':>7} {'speed-up':>9} {'acceptance':>11} {'accepted len':>13} {'target calls/tok':>17}"
    )
    figures = {}
    for name, spent in seconds.items():
        if name in engines:
            stats = engines[name].stats
            speed = tokens[name] / spent
            row = (
                f"{stats.acceptance_rate:.1%}",
                f"{stats.mean_accepted_length:.2f}",
                f"{stats.target_calls_per_token:.3f}",
            )
            figures[name] = {**stats.as_dict(), "tokens_per_second": speed, "speedup": plain / spent}
        else:
            speed = plain_tokens / spent
            row = ("-", "-", "1.000")
            figures[name] = {"tokens_per_second": speed}
        print(f"{name:44} {speed:7.1f} {plain / spent:8.2f}x {row[0]:>11} {row[1]:>13} {row[2]:>17}")
    print(f"\ngreedy outputs identical to the target's: {identical}")
    return {"identical": identical, "figures": figures}
