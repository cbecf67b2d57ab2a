"""The kernel microbenchmarks against their goals, from the pytest-benchmark JSON of a GPU run.

``benchmarks/bench_<op>.py --benchmark-json=DIR/bench_<op>.json`` (``gpu_suite.sh`` writes them) time each
op's eager torch reference, ``torch.compile`` of it and the Triton kernel, beside a device-to-device copy
of the same logits for sampling and verification. This script turns them into one table per op (median
times; for the Triton kernel its bandwidth, the share of the copy's, and its speed-up over eager and
compiled references) and checks the goals:

- sampling at ``[72, 128256]`` bf16 logits and verification at 8 rows x 9 positions x 128256 (the same
  72 rows), speculative sampling and by exact match (``bench_match.py``, per configuration): the Triton
  kernel at >= 80% of the copy's bandwidth, >= 3x the eager reference, >= 1.5x its ``torch.compile``;
- the n-gram table: lookups >= 500M keys/s, inserts >= 200M keys/s (Triton, at the largest batch measured
  per table size: a smaller one's host launch and sync, some 10-20 us, bound its rate below the goal
  however fast the kernel; those rows are tabled only).

Translation and prompt lookup's draft have no goal: their tables compare the three implementations.

Those timings include the host's launches and a sync. Where ``DIR`` also holds ``tune-<device>.json``
(``benchmarks/tune_kernels.py``), a section ``device time`` checks the bandwidth goals again on device
time (CUDA-graph replays), at the vocabulary tile the engine runs (the launchers' default ``block``, as
the sweep records it; the fastest tile measured is listed beside it), against the eager reference (that script does not compile).
A goal whose baseline was not measured (a compile that failed, no copy case) reads "n/a", neither met
nor missed.

    python benchmarks/kernel_report.py DIR [--out DIR]

Writes ``kernels-<device>.json`` and ``.md`` (``<device>`` from the benchmarks' own records), with
``DIR/environment.txt`` (driver, package versions, commit) when the run left one.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from omnidraft_fast.report import write_results

GOAL_COPY_SHARE, GOAL_VS_EAGER, GOAL_VS_COMPILE = 0.8, 3.0, 1.5
GOAL_LOOKUPS, GOAL_INSERTS = 500e6, 200e6  # keys per second
IMPLEMENTATIONS = ("eager", "compile", "triton")
# The tile the engine ran in sweeps that recorded none (before 2026-12-04's change of sampling and match to 2048).
SWEPT_BEFORE_BLOCK = 1024


def _cases(path: Path) -> list[dict]:
    """Each benchmark of a pytest-benchmark JSON file: its test, parameters, median seconds, extra info."""
    data = json.loads(path.read_text())
    return [
        {
            "test": case["name"].split("[")[0],
            "params": case.get("params") or {},
            "median": case["stats"]["median"],
            "extra": case.get("extra_info") or {},
        }
        for case in data["benchmarks"]
    ]


def _compare(cases: list[dict], key, implementation, copy_key=None) -> list[dict]:
    """Rows of the op's table: per shape (``key(params)``), each implementation's median, and for Triton
    its bandwidth, its share of the copy's bandwidth (``copy_key(params)`` names the copy case) and its
    speed-ups over the references."""
    copies = {copy_key(c["params"]): c for c in cases if copy_key is not None and implementation(c) == "copy"}
    shapes: dict[tuple, dict] = {}
    for case in cases:
        name = implementation(case)
        if name in IMPLEMENTATIONS:
            shapes.setdefault(key(case["params"]), {})[name] = case
    rows = []
    for shape, by_name in shapes.items():
        row = {"shape": dict(shape), **{f"{name}_us": 1e6 * c["median"] for name, c in by_name.items()}}
        triton = by_name.get("triton")
        if triton is not None:
            moved = triton["extra"].get("bytes_moved")
            if moved:
                row["triton_gb_per_s"] = moved / triton["median"] / 1e9
            copy = copies.get(copy_key(triton["params"])) if copy_key is not None else None
            if copy is not None and moved:
                copy_gb_per_s = copy["extra"]["bytes_moved"] / copy["median"] / 1e9
                row["copy_gb_per_s"] = copy_gb_per_s
                row["copy_share"] = row["triton_gb_per_s"] / copy_gb_per_s
            for reference in ("eager", "compile"):
                if reference in by_name:
                    row[f"vs_{reference}"] = by_name[reference]["median"] / triton["median"]
        rows.append(row)
    return rows


def _bandwidth_goal(row: dict, compiled: bool = True) -> dict:
    """The bandwidth goals at ``row``: each True/False, or None where its baseline was not measured; ``met``
    False when one is missed, None when none is missed but one could not be checked."""
    goals = [("copy_share", f"copy share >= {GOAL_COPY_SHARE:.0%}", GOAL_COPY_SHARE),
             ("vs_eager", f">= {GOAL_VS_EAGER:g}x eager", GOAL_VS_EAGER)]  # fmt: skip
    if compiled:
        goals.append(("vs_compile", f">= {GOAL_VS_COMPILE:g}x torch.compile", GOAL_VS_COMPILE))
    checks = {name: None if key not in row else row[key] >= goal for key, name, goal in goals}
    met = False if False in checks.values() else None if None in checks.values() else True
    return {"shape": row["shape"], "checks": checks, "met": met}


def sampling(cases: list[dict]) -> dict:
    rows = _compare(
        cases,
        key=lambda p: (("rows", p["rows"]), ("vocab", p["vocab"]), ("config", p["config"])),
        implementation=lambda c: "copy" if c["test"] == "test_copy" else c["params"]["impl"],
        copy_key=lambda p: (p["rows"], p["vocab"]),
    )
    goal_rows = [r for r in rows if r["shape"]["rows"] == 72 and r["shape"]["vocab"] == 128256]
    return {"rows": rows, "goals": [_bandwidth_goal(r) for r in goal_rows]}


def _verification(cases: list[dict], *variants: tuple[str, object]) -> dict:
    """A verification op's table, per (batch, k, vocab, each ``variants`` parameter), and its goals at
    8 x 9 x 128256. A variant is (parameter, its value where a case lacks it: JSON of older runs)."""

    def key(p):
        shape = ("batch", p["batch"]), ("k", p["k"]), ("vocab", p["vocab"])
        return (*shape, *((name, p.get(name, default)) for name, default in variants))

    rows = _compare(cases, key=key, implementation=lambda c: c["params"]["implementation"], copy_key=key)
    goal_rows = [
        r for r in rows if (r["shape"]["batch"], r["shape"]["k"], r["shape"]["vocab"]) == (8, 8, 128256)
    ]
    return {"rows": rows, "goals": [_bandwidth_goal(r) for r in goal_rows]}


def verify(cases: list[dict]) -> dict:
    """Speculative sampling, per vocabulary pair and rules (runs before 2026-12-02: the rule mix only)."""
    return _verification(cases, ("cross_vocab", None), ("rules", "mix"))


def match(cases: list[dict]) -> dict:
    """Verification by exact match, per configuration (greedy, sampled, top-p)."""
    return _verification(cases, ("config", None))


def ngram(cases: list[dict]) -> dict:
    rows = []
    for op, goal in (("test_lookup", GOAL_LOOKUPS), ("test_insert", GOAL_INSERTS)):
        shapes: dict[tuple, dict] = {}
        for case in (c for c in cases if c["test"] == op):
            p = case["params"]
            shapes.setdefault((p["capacity"], p["batch"]), {})[p["implementation"]] = case
        largest = {}
        for capacity, batch in shapes:
            largest[capacity] = max(batch, largest.get(capacity, 0))
        for (capacity, batch), by_name in shapes.items():
            row = {"op": op.removeprefix("test_"), "shape": {"capacity": capacity, "batch": batch}}
            for name, case in by_name.items():
                row[f"{name}_keys_per_s"] = batch / case["median"]
            if "triton_keys_per_s" in row and batch == largest[capacity]:
                row["goal_keys_per_s"] = goal
                row["met"] = row["triton_keys_per_s"] >= goal
            rows.append(row)
    return {"rows": rows}


def _translate_shape(params: dict) -> tuple:
    return ("batch", params["batch"]), ("k", params["k"])


def translate(cases: list[dict]) -> dict:
    rows = _compare(
        [c for c in cases if c["test"] == "test_translate"],
        key=_translate_shape,
        implementation=lambda c: c["params"]["implementation"],
    )
    splits = {
        (_translate_shape(c["params"]), c["params"]["implementation"]): c["median"]
        for c in cases
        if c["test"] == "test_translate_with_splits"
    }
    for row in rows:  # the same with split tokens written out (units + split_reference)
        for name in ("eager", "triton"):
            seconds = splits.get((tuple(row["shape"].items()), name))
            if seconds is not None:
                row[f"{name}_with_splits_us"] = 1e6 * seconds
    return {"rows": rows}


def lookup(cases: list[dict]) -> dict:
    """Prompt lookup's draft, per batch, context length and longest suffix (no goal set), with the kernel's
    time at one program a row beside it (``triton_row``)."""

    def shape(params: dict) -> tuple:
        return ("batch", params["batch"]), ("context", params["context"]), ("ngram", params["ngram"])

    rows = _compare(cases, key=shape, implementation=lambda c: c["params"]["implementation"])
    one_program = {
        shape(c["params"]): c["median"] for c in cases if c["params"]["implementation"] == "triton_row"
    }
    for row in rows:
        seconds = one_program.get(tuple(row["shape"].items()))
        if seconds is not None:
            row["triton_row_us"] = 1e6 * seconds
            if "triton_us" in row:
                row["vs_triton_row"] = 1e6 * seconds / row["triton_us"]
    return {"rows": rows}


OPS = {
    "sampling": sampling,
    "verify": verify,
    "match": match,
    "ngram": ngram,
    "translate": translate,
    "lookup": lookup,
}


def device_time(tune: dict) -> dict:
    """The cases of a ``tune_kernels.py`` result on device time: the tile the engine runs against the copy
    of its logits and the eager reference, all replayed from CUDA graphs, the bandwidth goals checked there;
    the fastest tile measured beside it."""
    rows = []
    for name, case in tune["cases"].items():
        tiles = {
            int(key.split()[1]): times["graph"]
            for key, times in case.items()
            if key.startswith("triton ") and times["graph"] is not None
        }
        copy_us, eager_us = case["copy"]["graph"], case["eager"]["graph"]
        shipped = case.get("block", SWEPT_BEFORE_BLOCK)  # tune_kernels.py records the tile the engine runs
        if shipped not in tiles:
            continue
        triton_us = tiles[shipped]
        row = {"shape": {"case": name}, "block": shipped, "triton_us": triton_us}
        row["triton_gb_per_s"] = case["bytes_moved"] / triton_us / 1e3
        if copy_us is not None:
            row["copy_us"] = copy_us
            row["copy_gb_per_s"] = case["copy_bytes"] / copy_us / 1e3
            row["copy_share"] = row["triton_gb_per_s"] / row["copy_gb_per_s"]
        if eager_us is not None:
            row["eager_us"] = eager_us
            row["vs_eager"] = eager_us / triton_us
        row["best_block"] = best = min(tiles, key=tiles.get)
        row["best_block_us"] = tiles[best]
        rows.append(row)
    summary = {"rows": rows, "goals": [_bandwidth_goal(row, compiled=False) for row in rows]}
    if tune.get("complete") is False:  # tune_kernels.py stopped before its last case (a time limit)
        summary["note"] = (
            "Partial sweep: the tuning run stopped before its end; the cases missing were not measured."
        )
    return summary


def report(folder: Path) -> dict:
    """Every ``bench_<op>.json`` found in ``folder``, compared and checked."""
    result: dict = {"ops": {}}
    devices = set()
    for op, summarise in OPS.items():
        path = folder / f"bench_{op}.json"
        if not path.exists():
            continue
        try:
            cases = _cases(path)
        except (json.JSONDecodeError, KeyError):  # empty or partial: its step's time limit cut it off
            result.setdefault("unread", []).append(path.name)
            continue
        devices |= {c["extra"]["device"] for c in cases if "device" in c["extra"]}
        result["ops"][op] = summarise(cases)
    tunes = sorted(folder.glob("tune-*.json"))
    for path in tunes:
        tune = json.loads(path.read_text())
        devices.add(tune["device"])
        result["ops"]["device time" if len(tunes) == 1 else f"device time ({path.stem})"] = device_time(tune)
    result["device"] = ", ".join(sorted(devices)) or "unknown"
    environment = folder / "environment.txt"
    result["environment"] = environment.read_text().strip() if environment.exists() else None
    return result


def _cell(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def markdown(result: dict) -> str:
    lines = [f"# Kernel microbenchmarks ({result['device']})", ""]
    if result["environment"]:
        lines += ["```", result["environment"], "```", ""]
    if result.get("unread"):
        lines += [f"Not read (empty or cut off by its step's time limit): {', '.join(result['unread'])}.", ""]
    for op, summary in result["ops"].items():
        lines += [f"## {op}", ""]
        if "note" in summary:
            lines += [summary["note"], ""]
        for goal in summary.get("goals", []):
            checks = ", ".join(f"{name}: {_cell(ok)}" for name, ok in goal["checks"].items())
            lines.append(f"- goal at {goal['shape']}: {checks}")
        if summary.get("goals"):
            lines.append("")
        columns = list(dict.fromkeys(k for row in summary["rows"] for k in row if k != "shape"))
        lines += [
            "| shape | " + " | ".join(columns) + " |",
            "|---|" + "---|" * len(columns),
            *(
                "| " + " ".join(f"{k}={v}" for k, v in row["shape"].items()) + " | "
                + " | ".join(_cell(row.get(c, "-")) for c in columns) + " |"
                for row in summary["rows"]
            ),
            "",
        ]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", type=Path, help="the folder holding bench_<op>.json")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the folder)")
    args = parser.parse_args(argv)
    result = report(args.folder)
    if not result["ops"]:
        parser.error(f"no bench_<op>.json in {args.folder}")
    slug = re.sub(r"[^a-z0-9]+", "-", result["device"].lower()).strip("-")
    write_results((args.out or args.folder) / f"kernels-{slug}", result, markdown(result))


if __name__ == "__main__":
    main()
