"""The zoo's corpus: text every machine has, split into training and held-out parts by fixed rules.

- Code: the top-level modules of the running Python's standard library (sorted by name); the modules
  in ``HELDOUT_MODULES`` are never trained on and give the evaluation prompts.
- Math: generated arithmetic word problems with worked answers; seeds below ``HELDOUT_SEED`` train,
  seeds from it on are held out.
- Prose: docstrings of the held-out modules.
"""

from __future__ import annotations

import random
import re
import sysconfig
from pathlib import Path

__all__ = ["HELDOUT_MODULES", "heldout_prompts", "stdlib_sources", "training_texts", "word_problem"]

HELDOUT_MODULES = (
    "bisect.py",
    "calendar.py",
    "colorsys.py",
    "fractions.py",
    "heapq.py",
    "shlex.py",
    "textwrap.py",
)
HELDOUT_SEED = 1_000_000
_NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo")
_THINGS = ("apples", "books", "coins", "marbles", "pencils", "stamps", "shells", "cards")


def stdlib_sources(heldout: bool = False) -> list[tuple[str, str]]:
    """(file name, source) of the standard library's top-level modules, sorted; held-out or training."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(path for path in root.glob("*.py") if (path.name in HELDOUT_MODULES) == heldout)
    return [(path.name, path.read_text(encoding="utf-8", errors="replace")) for path in files]


def word_problem(seed: int) -> str:
    """One arithmetic word problem with a worked answer, fully determined by ``seed``."""
    rng = random.Random(seed)
    name, other = rng.sample(_NAMES, 2)
    thing = rng.choice(_THINGS)
    a, b, c = rng.randint(2, 60), rng.randint(2, 40), rng.randint(2, 9)
    kind = rng.randrange(3)
    if kind == 0:
        question = f"{name} has {a} {thing} and buys {b} more. How many {thing} does {name} have now?"
        answer = f"{name} has {a} + {b} = {a + b} {thing}. The answer is {a + b}."
    elif kind == 1:
        a = a + b
        question = f"{name} has {a} {thing} and gives {b} to {other}. How many {thing} are left?"
        answer = f"{name} has {a} - {b} = {a - b} {thing} left. The answer is {a - b}."
    else:
        question = f"{name} buys {c} boxes of {thing} with {b} {thing} in each box. How many {thing} is that?"
        answer = f"{c} boxes of {b} {thing} make {c} * {b} = {c * b} {thing}. The answer is {c * b}."
    return f"Question: {question}\nAnswer: {answer}\n"


def training_texts(problems: int = 20_000) -> list[str]:
    """The training corpus: training modules plus word problems in groups of 20 (one text each)."""
    texts = [source for _, source in stdlib_sources()]
    for start in range(0, problems, 20):
        texts.append("\n".join(word_problem(seed) for seed in range(start, start + 20)))
    return texts


def heldout_prompts(per_task: int = 4) -> list[tuple[str, str]]:
    """(task, prompt) pairs never trained on: code cut after a ``def`` line, math questions, prose openings."""
    if per_task < 1:
        raise ValueError(f"prompts per task must be an int >= 1, got {per_task}")
    prompts: list[tuple[str, str]] = []
    code, prose = [], []
    for _, source in stdlib_sources(heldout=True):
        for match in re.finditer(r"\n(def [^\n]+:\n)", source):
            code.append(source[max(0, match.start() - 200) : match.end()].lstrip("\n"))
        for match in re.finditer(r'"""([A-Z][^"\n]{40,})', source):
            prose.append(match.group(1)[:60])
    if per_task > min(len(code), len(prose)):  # none made up, none dropped: as many of each task
        raise ValueError(
            f"prompts per task must be at most {min(len(code), len(prose))} (the held-out modules' "
            f"{len(code)} code and {len(prose)} prose prompts), got {per_task}"
        )
    prompts += [("code", text) for text in code[:: max(1, len(code) // per_task)][:per_task]]
    for seed in range(HELDOUT_SEED, HELDOUT_SEED + per_task):
        problem = word_problem(seed)
        prompts.append(("math", problem[: problem.index("Answer:") + len("Answer:")]))
    prompts += [("prose", text) for text in prose[:per_task]]
    return prompts
