"""The ``omnidraft-fast`` command on local model folders."""

from __future__ import annotations

import itertools
import json
import math
import re

import pytest
import torch
from conftest import perturbed_copy, tiny_model, word_tokenizer

from omnidraft_fast.cli import build_parser, main

VOCAB = 64


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    target = tiny_model("llama", VOCAB, seed=3)
    drafter = perturbed_copy(target, 0.2)
    tokenizer = word_tokenizer(VOCAB)
    for name, model in (("target", target), ("drafter", drafter)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root, target, tokenizer


def test_generate_prints_the_targets_greedy_text(folders, capsys):
    root, target, tokenizer = folders
    prompt = "w5 w9 w17 w33"
    code = main(
        ["generate", "--model", str(root / "target"), "--drafter", str(root / "drafter"),
         "--prompt", prompt, "--max-new-tokens", "12", "--num-draft-tokens", "3"]
    )  # fmt: skip
    assert code == 0
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    expected = target.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :]
    out = capsys.readouterr().out
    assert prompt + tokenizer.decode(expected, skip_special_tokens=True) in out
    assert "acceptance" in out and "tok/s" in out


def test_generate_by_prompt_lookup_prints_the_targets_greedy_text(folders, capsys):
    """No drafter: --prompt-lookup-num-tokens drafts from the prompt; --drafter and it exclude each other."""
    root, target, tokenizer = folders
    prompt = "w5 w9 w17 w5 w9 w17 w5"
    code = main(
        ["generate", "--model", str(root / "target"), "--prompt-lookup-num-tokens", "3",
         "--max-matching-ngram-size", "2", "--prompt", prompt, "--max-new-tokens", "12", "--json"]
    )  # fmt: skip
    assert code == 0
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    expected = target.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :]
    text, report = capsys.readouterr().out.split("--- stats")
    assert prompt + tokenizer.decode(expected, skip_special_tokens=True) in text
    assert json.loads(report)["proposed"] > 0
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(root / "target"), "--drafter", str(root / "drafter"),
              "--prompt-lookup-num-tokens", "3", "--prompt", prompt])  # fmt: skip
    assert "not allowed with argument" in capsys.readouterr().err
    # each way of drafting refuses the other's flags, by name, rather than dropping them without a word
    lookup = [
        "generate",
        "--model",
        str(root / "target"),
        "--prompt-lookup-num-tokens",
        "3",
        "--prompt",
        prompt,
    ]
    for flags in (["--drafter-tokenizer", str(root / "drafter")], ["--confidence-threshold", "0.4"],
                  ["--translation", "tli"], ["--no-split-tokens"]):  # fmt: skip
        assert main([*lookup, *flags]) == 2
        assert f"{flags[0]}: for drafting with --drafter" in capsys.readouterr().err
    code = main(["generate", "--model", str(root / "target"), "--drafter", str(root / "drafter"),
                 "--max-matching-ngram-size", "2", "--prompt", prompt])  # fmt: skip
    assert code == 2 and "--max-matching-ngram-size sets how prompt lookup" in capsys.readouterr().err


def test_generate_with_captured_rounds_prints_the_same_text(folders, capsys):
    root, _, _ = folders
    command = ["generate", "--model", str(root / "target"), "--drafter", str(root / "drafter"),
               "--prompt", "w5 w9 w17", "--max-new-tokens", "16"]  # fmt: skip
    texts = []
    for extra in (
        [],
        ["--cuda-graphs"],
        ["--cuda-graphs", "--rounds-per-sync", "3"],
        ["--confidence-threshold", "1"],
    ):
        assert main(command + extra + ["--json"]) == 0
        text, report = capsys.readouterr().out.split("--- stats")
        texts.append(text)
        stats = json.loads(report)
    assert texts[0] == texts[1] == texts[2] == texts[3]
    assert stats["drafted_per_round"] == 1.0  # threshold 1: one drafted token per round


def test_generate_across_vocabularies_with_and_without_split_tokens(capsys):
    """The zoo's cross-vocabulary pair from its folders: the same text either way, split tokens counted
    (on the held-out prose prompt where the drafter drafts some)."""
    from omnidraft_fast.zoo import ROOT
    from omnidraft_fast.zoo.data import heldout_prompts

    pair = ROOT / "code-pair"
    prompt = next(p for task, p in heldout_prompts(1) if task == "prose")
    command = ["generate", "--model", str(pair / "target"), "--drafter", str(pair / "drafter-cross"),
               "--prompt", prompt, "--max-new-tokens", "24", "--dtype", "float32", "--device", "cpu",
               "--json"]  # fmt: skip
    texts, stats = [], []
    for extra in ([], ["--no-split-tokens"]):
        assert main(command + extra) == 0
        text, report = capsys.readouterr().out.split("--- stats")
        texts.append(text)
        stats.append(json.loads(report))
    assert texts[0] == texts[1]
    assert stats[0]["split_proposed"] > 0 and stats[1]["split_proposed"] == 0


def test_generate_with_generation_options(capsys):
    """--stop, --repetition-penalty and --min-new-tokens on the zoo's cross pair: the text transformers gives."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from omnidraft_fast.zoo import ROOT
    from omnidraft_fast.zoo.data import heldout_prompts

    pair = ROOT / "code-pair"
    prompt = heldout_prompts(1)[0][1]
    command = ["generate", "--model", str(pair / "target"), "--drafter", str(pair / "drafter-cross"),
               "--prompt", prompt, "--max-new-tokens", "32", "--dtype", "float32", "--device", "cpu",
               "--stop", "):", "--stop", "\n\n", "--repetition-penalty", "1.2", "--min-new-tokens", "3"]  # fmt: skip
    assert main(command) == 0
    printed = capsys.readouterr().out.split("--- stats")[0].split("\n", 1)[1]
    tokenizer = AutoTokenizer.from_pretrained(pair / "target")
    target = AutoModelForCausalLM.from_pretrained(pair / "target", dtype=torch.float32, use_kernels=False)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    expected = target.generate(ids, max_new_tokens=32, do_sample=False, stop_strings=["):", "\n\n"],
                               tokenizer=tokenizer, repetition_penalty=1.2, min_new_tokens=3)  # fmt: skip
    assert expected.shape[1] < ids.shape[1] + 32  # a stop string ended it
    assert printed == prompt + tokenizer.decode(expected[0, ids.shape[1] :], skip_special_tokens=True) + "\n"


def test_generate_samples_per_prompt_with_bad_words(folders, capsys):
    """--num-return-sequences prints each prompt's samples; --bad-word keeps a word out of every one."""
    root, _, _ = folders
    code = main(
        ["generate", "--model", str(root / "target"), "--drafter", str(root / "drafter"), "--prompt", "w5 w6",
         "--prompt", "w7", "--max-new-tokens", "40", "--do-sample", "--temperature", "2.0", "--seed", "0",
         "--num-return-sequences", "3", "--typical-p", "0.95", "--bad-word", "w9", "--bad-word", "w4 w4"]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out.split("--- stats")[0]
    blocks = out.split("--- prompt ")[1:]
    assert [block.split(":")[0] for block in blocks] == [
        f"{p}, sample {s}" for p in (0, 1) for s in (0, 1, 2)
    ]
    for block in blocks:
        prompt = "w5 w6" if block.startswith("0") else "w7"
        line = block.split("\n", 1)[1]
        assert line.startswith(prompt)
        words = line[len(prompt) :].split()
        assert 0 < len(words) <= 40 and "w9" not in words  # EOS may end a sample early
        assert ("w4", "w4") not in set(itertools.pairwise(words))


def test_generate_batch_and_json(folders, capsys):
    root, _, _ = folders
    code = main(
        ["generate", "--model", str(root / "target"), "--drafter", str(root / "drafter"), "--prompt", "w5 w6",
         "--prompt", "w7", "--max-new-tokens", "5", "--do-sample", "--seed", "0", "--json"]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "--- prompt 1: 'w7'" in out and '"new_tokens": 10' in out


def test_bad_option_is_reported_not_raised(folders, capsys):
    root, _, _ = folders
    code = main(
        ["generate", "--model", str(root / "target"), "--drafter", str(root / "drafter"), "--prompt", "w5",
         "--max-new-tokens", "0"]
    )  # fmt: skip
    assert code == 2
    assert "max_new_tokens" in capsys.readouterr().err


def test_sampling_flags_without_do_sample_are_refused(folders, capsys):
    """Greedy decoding ignores them: refused before any model loads, rather than dropped without a word."""
    root, _, _ = folders
    common = [
        "generate",
        "--model",
        str(root / "missing"),
        "--drafter",
        str(root / "drafter"),
        "--prompt",
        "w5",
    ]
    assert main([*common, "--temperature", "0.7", "--top-k", "5"]) == 2
    assert "--temperature, --top-k shape sampling: add --do-sample" in capsys.readouterr().err
    assert main([*common, "--min-p", "0.1"]) == 2
    assert "--min-p shape sampling" in capsys.readouterr().err
    # the engine's own message would name do_sample=True, a Python argument: the command names its flag
    assert main([*common, "--num-return-sequences", "3"]) == 2
    assert (
        "--num-return-sequences 3 samples each prompt that many times: add --do-sample"
        in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("flag", "extra", "named"),
    [
        ("--model", [], "--model"),
        ("--drafter", [], "--drafter"),
        ("--tokenizer", ["--tokenizer", "{missing}"], "--tokenizer"),
        ("--device", ["--device", "bogus"], "--device"),
        ("--device", ["--device", "meta"], "--device meta: the meta device holds no weights"),
        ("--device", ["--device", "hpu"], "--device hpu: hpu is not available"),  # not a traceback
        ("--model", ["--model", "{file}"], "is a file: give the folder"),
    ],
)
def test_bad_paths_and_devices_name_their_flag(folders, capsys, tmp_path, flag, extra, named):
    root, _, _ = folders
    missing = str(tmp_path / "no-such-folder")
    (tmp_path / "weights.safetensors").write_bytes(b"")
    model = missing if flag == "--model" else str(root / "target")
    drafter = missing if flag == "--drafter" else str(root / "drafter")
    extra = [arg.format(missing=missing, file=tmp_path / "weights.safetensors") for arg in extra]
    code = main(["generate", "--model", model, "--drafter", drafter, "--prompt", "w5", *extra])
    assert code == 2
    assert named in capsys.readouterr().err


@pytest.fixture(scope="module")
def bare(folders):
    """Model folders holding no tokenizer: a llama one (transformers fails to build its tokenizer) and a
    qwen2 one (transformers builds a tokenizer with no vocabulary but <|endoftext|>)."""
    root, target, _ = folders
    perturbed_copy(target, 0.2).save_pretrained(root / "bare-llama")
    tiny_model("qwen2", VOCAB, seed=4).save_pretrained(root / "bare-qwen2")
    return root


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--model", "{bare}", "--drafter", "{drafter}"], r"--model '\S+': .*; save the tokenizer into it .*--tokenizer"),
        (["--model", "{target}", "--drafter", "{bare}"], r"--drafter '\S+': .*, or give the tokenizer's folder with --drafter-tokenizer"),
        (["--model", "{target}", "--drafter", "{drafter}", "--drafter-tokenizer", "{bare}"], r"--drafter-tokenizer '\S+': .*into it \(tokenizer.save_pretrained\(folder\)\)$"),
        (["--model", "{target}", "--drafter", "{drafter}", "--tokenizer", "{bare}"], r"--tokenizer '\S+': .*into it \(tokenizer.save_pretrained\(folder\)\)$"),
    ],
)  # fmt: skip
def test_a_folder_without_a_tokenizer_is_refused_naming_its_flag(bare, capsys, arch, flags, named):
    """Not the engine's later complaint about `tokenizer`/`drafter_tokenizer`, nor transformers' first line:
    the flag, and what the folder lacks."""
    folders = {"bare": bare / f"bare-{arch}", "target": bare / "target", "drafter": bare / "drafter"}
    code = main(
        ["generate", *[flag.format(**folders) for flag in flags], "--prompt", "w5", "--max-new-tokens", "2"]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert re.search(named, err), err
    assert "holds no tokenizer files (tokenizer.json, *.model, vocab.*, merges.txt" in err
    if arch == "qwen2":
        assert "its tokenizer has no vocabulary, only the special tokens ['<|endoftext|>']" in err


def test_a_folder_without_a_tokenizer_serves_with_the_tokenizer_flag(bare, capsys):
    root = bare
    code = main(["generate", "--model", str(root / "target"), "--drafter", str(root / "bare-llama"),
                 "--drafter-tokenizer", str(root / "target"), "--prompt", "w5 w9", "--max-new-tokens", "4"])  # fmt: skip
    assert code == 0
    assert "w5 w9" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("command", "flag", "value"),
    [("demo", "--prompts-per-task", "0"), ("cascade-sweep", "--prompts-per-task", "-1"),
     ("cascade-sweep", "--temperature", "-1"), ("cascade-sweep", "--temperature", "nan"),
     ("generate", "--seed", str(2**64)), ("generate", "--seed", "-1"), ("demo", "--max-new-tokens", "ten"),
     ("cascade-sweep", "--temperature", "warm"), ("cascade-sweep", "--temperature", "inf")],
)  # fmt: skip
def test_bad_counts_and_numbers_are_refused_by_the_parser(command, flag, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, flag, value])
    assert exit_.value.code == 2
    assert f"argument {flag}: must be" in capsys.readouterr().err


def test_demo_runs_and_matches_the_target(capsys):
    torch.manual_seed(0)
    assert main(["demo", "--prompts-per-task", "1", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "identical to the target's: True" in out and "cross-vocabulary drafter" in out


def test_demo_prints_the_cross_vocabulary_drafters_continuation(monkeypatch, capsys):
    """The text under "cross-vocabulary continuation" is the cross drafter's engine's output, not that of the
    engine run last (prompt lookup): here prompt lookup's output is made to differ, so the two tell apart."""
    from omnidraft_fast import SpeculativeEngine

    generate, cross = SpeculativeEngine.generate, []

    def spied(engine, input_ids, **kwargs):
        out = generate(engine, input_ids, **kwargs)
        if engine.drafter is None:  # prompt lookup: every new token replaced
            out = out.clone()
            out[:, input_ids.shape[1] :] = out[0, 0]
        elif engine.bridge is not None:
            cross.append(
                engine.target_tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True)
            )
        return out

    monkeypatch.setattr(SpeculativeEngine, "generate", spied)
    main(["demo", "--prompts-per-task", "1", "--max-new-tokens", "8"])
    out = capsys.readouterr().out
    printed = out.split("cross-vocabulary continuation:\n")[1:]
    assert len(printed) == len(cross) - 1 > 0  # cross[0]: the warm-up request
    assert all(part.startswith(text + "\n\n") for part, text in zip(printed, cross[1:], strict=True))


def test_cascade_sweep_writes_the_trade_off(tmp_path, capsys):
    import json

    args = [
        "cascade-sweep",
        "--prompts-per-task",
        "1",
        "--max-new-tokens",
        "6",
        "--rules",
        "chow",
        "token_v2",
    ]
    assert main([*args, "--device", "cpu", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "cascades-cpu.json").read_text())
    assert len(results["pairs"]) == 2 and "speed-up" in capsys.readouterr().out
    for sweep in results["pairs"].values():
        points = {(p["rule"], p["alpha"]): p for p in sweep["points"]}
        assert len(points) == 1 + 8 + 7
        for exact in (("exact", None), ("chow", 0.0), ("token_v2", -0.5)):
            assert points[exact]["sequence_agreement"] == 1.0 and points[exact]["deferral_rate"] == 1.0
            assert points[exact]["agreement"] >= 0.9  # teacher-forced: a full forward may break near-ties
        assert points["chow", 1.0]["acceptance"] == 1.0 and points["chow", 1.0]["deferral_rate"] == 0.0
    assert main(["cascade-sweep", "--rules", "nope", "--out", str(tmp_path / "typo")]) == 2
    assert (
        "unknown" in capsys.readouterr().err and not (tmp_path / "typo").exists()
    )  # refused before anything


def test_cascade_sweep_writes_after_each_rule(tmp_path, monkeypatch):
    """A time limit that cuts the sweep short (the GPU suite gives it 120 s) keeps the rules swept so far:
    the results are written, marked partial, after each rule of each pair, then once complete."""
    import json

    from omnidraft_fast import cascade_sweep

    calls, real = [], cascade_sweep.write_results

    def spy(results, out, stem, complete=True):
        calls.append((complete, [len(sweep["points"]) for sweep in results["pairs"].values()]))
        real(results, out, stem, complete)

    monkeypatch.setattr(cascade_sweep, "write_results", spy)
    args = ["cascade-sweep", "--prompts-per-task", "1", "--max-new-tokens", "4", "--rules", "lossy", "chow"]
    assert main([*args, "--device", "cpu", "--out", str(tmp_path)]) == 0
    # exact, then lossy (4 alphas), then chow (8), for each pair in turn; then the complete write
    assert calls == [(False, [1]), (False, [5]), (False, [13]),
                     (False, [13, 1]), (False, [13, 5]), (False, [13, 13]), (True, [13, 13])]  # fmt: skip
    assert json.loads((tmp_path / "cascades-cpu.json").read_text())["complete"] is True


def test_cascade_sweep_samples_with_a_temperature(tmp_path):
    import json

    args = ["cascade-sweep", "--prompts-per-task", "1", "--max-new-tokens", "6", "--rules", "lossy"]
    assert main([*args, "--temperature", "1.0", "--device", "cpu", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "cascades-cpu-T1.json").read_text())
    assert "sampling at T=1.0" in results["meta"]["decoding"]
    for sweep in results["pairs"].values():
        assert sweep["decoding"] == "sampling at T=1.0"
        assert [p["alpha"] for p in sweep["points"]] == [None, 0.0, 0.3, 0.6, 0.9]
        assert all(0 <= p["agreement"] <= 1 and p["deferral_rate"] == 1.0 for p in sweep["points"])
        assert all(math.isfinite(p["z"]) for p in sweep["points"])  # sampled: how far from the target's law
    assert "| z |" in (tmp_path / "cascades-cpu-T1.md").read_text()


def test_the_sweep_summary_lists_every_rule_that_reaches_95_percent(tmp_path):
    """A rule with points at >= 95% agreement but none at >= 99% still gets its 95% columns."""
    from omnidraft_fast.cascade_sweep import write_results
    from omnidraft_fast.report import environment

    def point(rule, alpha, agreement, speedup):
        return dict(rule=rule, alpha=alpha, agreement=agreement, speedup=speedup, deferral_rate=0.5, acceptance=0.5,
                    mean_accepted_length=2.0, tokens_per_second=10.0, sequence_agreement=agreement,
                    target_log_likelihood=-1.0)  # fmt: skip

    points = [point("exact", None, 1.0, 1.0), point("chow", 0.5, 0.995, 1.2), point("chow", 0.9, 0.96, 1.5),
              point("diff", 0.3, 0.97, 1.3), point("opt", 1.0, 0.9, 2.0)]  # fmt: skip
    meta = {**environment(torch.device("cpu")), "models": "m", "prompts": 1, "max_new_tokens": 4, "k": 2}
    results = {"meta": meta, "pairs": {"pair": {"plain_tokens_per_second": 8.0, "plain_target_log_likelihood": -1.0,
                                                "points": points}}}  # fmt: skip
    write_results(results, tmp_path, "sweep")
    summary = (tmp_path / "sweep.md").read_text().split("| rule | alpha | deferral")[0]
    assert "| chow | 0.5 | 1.20x | 0.500 | 0.9 | 1.50x | 0.960 | 0.500 |" in summary
    assert "| diff | none | - | - | 0.3 | 1.30x | 0.970 | 0.500 |" in summary
    assert "| opt |" not in summary


def test_a_sweep_killed_while_writing_keeps_its_last_whole_results(tmp_path, monkeypatch):
    """The sweep writes after each rule; a run killed during a write (a time limit) keeps the files of the
    write before, whole, as the benchmarks' results do (report.write_results: written aside, renamed)."""
    import json
    from pathlib import Path

    from omnidraft_fast.cascade_sweep import write_results
    from omnidraft_fast.report import environment

    point = dict(rule="exact", alpha=None, agreement=1.0, speedup=1.0, deferral_rate=1.0, acceptance=0.5,
                 mean_accepted_length=2.0, tokens_per_second=10.0, sequence_agreement=1.0, target_log_likelihood=-1.0)  # fmt: skip
    meta = {**environment(torch.device("cpu")), "models": "m", "prompts": 1, "max_new_tokens": 4, "k": 2}
    results = {"meta": meta, "pairs": {"pair": {"plain_tokens_per_second": 8.0, "plain_target_log_likelihood": -1.0,
                                                "points": [point]}}}  # fmt: skip
    write_results(results, tmp_path, "sweep", complete=False)

    def killed_halfway(path, text, *args, **kwargs):  # half the text reaches the disk, then the kill
        with open(path, "w") as file:
            file.write(text[: len(text) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", killed_halfway)
    results["pairs"]["pair"]["points"].append(dict(point, rule="chow", alpha=0.5))
    with pytest.raises(KeyboardInterrupt):
        write_results(results, tmp_path, "sweep", complete=False)
    monkeypatch.undo()
    kept = json.loads((tmp_path / "sweep.json").read_text())
    assert kept["complete"] is False and len(kept["pairs"]["pair"]["points"]) == 1
    assert "| exact |" in (tmp_path / "sweep.md").read_text()


@pytest.mark.parametrize("command", ["generate", "demo", "cascade-sweep"])
def test_help_says_what_every_flag_does(command):
    """docs/usage.md: `--help` says what each flag does, so none is listed bare."""
    parser = build_parser()
    commands = next(action for action in parser._actions if action.dest == "command")
    bare = [
        action.option_strings[0]
        for action in commands.choices[command]._actions
        if action.option_strings and not action.help
    ]
    assert bare == []
