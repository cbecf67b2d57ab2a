"""The end-to-end benchmark's diagnosis of a greedy departure (``benchmarks/e2e.py``'s ``first_departure``),
and its account in the Markdown, on a tiny Llama built from a config."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]
PROMPT = 5  # prompt tokens
NEW = 8  # new tokens


def _e2e_module():
    spec = importlib.util.spec_from_file_location("e2e", ROOT / "benchmarks" / "e2e.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _greedy(model) -> torch.Tensor:
    prompt = torch.tensor([[3, 17, 42, 8, 61]])
    return model.generate(prompt, max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW, pad_token_id=0)


def _last_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits[0, -1].float()


def test_first_departure_finds_the_position_the_tokens_and_the_margin():
    e2e = _e2e_module()
    target = tiny_model("llama")
    reference = _greedy(target)
    assert reference.shape[1] == PROMPT + NEW
    assert e2e.first_departure(target, reference, reference.clone(), PROMPT) is None
    for position in (0, 3, NEW - 1):
        output = reference.clone()
        # the runner-up there, then tokens unlike the reference's after it too: only the first counts
        logits = _last_logits(target, reference[:, : PROMPT + position])
        swapped = int(logits.topk(2).indices[1])
        output[0, PROMPT + position] = swapped
        output[0, PROMPT + position + 1 :] = (reference[0, PROMPT + position + 1 :] + 1) % 96
        departure = e2e.first_departure(target, reference, output, PROMPT)
        chosen = int(reference[0, PROMPT + position])
        assert departure["position"] == position
        assert (departure["reference_token"], departure["token"]) == (chosen, swapped)
        margin = float(logits[chosen] - logits[swapped])
        assert margin > 0  # greedy chose the top logit: the runner-up's margin is the gap between the two
        assert abs(departure["margin"] - margin) < 1e-5 and departure["margin_float32"] == departure["margin"]
        # the logits at the next position (prefix one token longer) would give another margin
        later = _last_logits(target, reference[:, : PROMPT + position + 1])
        assert abs(float(later[chosen] - later[swapped]) - margin) > 1e-3
        assert departure["resolution"] == pytest.approx(
            torch.finfo(torch.float32).eps * float(logits.abs().max())
        )
        assert departure["within_rounding"] is (margin <= departure["resolution"])


def test_first_departure_weighs_in_the_run_dtype_and_in_float32():
    e2e = _e2e_module()
    exact = tiny_model("llama")
    target = copy.deepcopy(exact).to(torch.bfloat16)
    reference = _greedy(target)
    output = reference.clone()
    output[0, PROMPT + 2] = (output[0, PROMPT + 2] + 5) % 96
    departure = e2e.first_departure(target, reference, output, PROMPT, exact)
    tokens = int(reference[0, PROMPT + 2]), int(output[0, PROMPT + 2])
    assert (departure["position"], departure["reference_token"], departure["token"]) == (2, *tokens)
    low, high = (_last_logits(model, reference[:, : PROMPT + 2]) for model in (target, exact))
    assert departure["margin"] == float(low[tokens[0]] - low[tokens[1]])
    assert abs(departure["margin_float32"] - float(high[tokens[0]] - high[tokens[1]])) < 1e-5
    assert departure["resolution"] == pytest.approx(torch.finfo(torch.bfloat16).eps * float(low.abs().max()))
    assert departure["within_rounding"] is (abs(departure["margin_float32"]) <= departure["resolution"])
    # a tie to well within bfloat16's resolution: within rounding
    assert departure["resolution"] > 1e-3  # bf16's eps is 2**-7
    tied = copy.deepcopy(exact)
    with torch.no_grad():
        tied.lm_head.weight[tokens[1]] = tied.lm_head.weight[tokens[0]]
    nearly = e2e.first_departure(target, reference, output, PROMPT, tied)
    assert abs(nearly["margin_float32"]) < 1e-6 and nearly["within_rounding"] is True


def test_first_departure_of_an_output_cut_short_has_no_margin():
    e2e = _e2e_module()
    target = tiny_model("llama")
    reference = _greedy(target)
    departure = e2e.first_departure(target, reference, reference[:, : PROMPT + 4], PROMPT)
    assert departure == {"position": 4, "reference_token": int(reference[0, PROMPT + 4]), "token": None}


def test_markdown_sums_the_departures_up():
    e2e = _e2e_module()
    departures = [
        {"task": "code", "prompt": 0, "position": 7, "reference_token": 11, "token": 12, "margin": -0.01,
         "margin_float32": 0.002, "resolution": 0.02, "within_rounding": True},
        {"task": "prose", "prompt": 1, "position": 3, "reference_token": 5, "token": 6, "margin": 0.5,
         "margin_float32": -0.75, "resolution": 0.02, "within_rounding": False},
    ]  # fmt: skip
    rows = [
        {"method": "transformers", "departures": []},
        {"method": "omnidraft_fast tli", "departures": departures},
    ]
    lines = e2e._departures(rows, "float16")
    assert lines[-1] == ("| omnidraft_fast tli | 2 | 1 | 0.5 | 0.75 | code #0, 7, (11, 12), -0.01, 0.002 |")
    assert not any(line.startswith("| transformers |") for line in lines)
    assert "float16's resolution" in "\n".join(lines)
    assert e2e._departures(rows[:1], "float16")[-1].startswith("Departures: none")
