"""Compile every Triton kernel of ``omnidraft_fast.kernels`` for NVIDIA GPUs, on any machine (no GPU needed).

Run by ``test_kernels_compile.py`` in a process of its own, without ``TRITON_INTERPRET`` (the interpreter
never compiles). The public launchers run on small CPU tensors with every kernel launch intercepted
(``benchmarks/kernel_resources.py``'s ``compiling``): each distinct variant (kernel, constexprs, argument
types and the specialisation a GPU launch gives them, warps) is compiled with ``triton.compile`` for the
targets given on the command line (compute capabilities, e.g. ``90 80``) instead of launched. What the
launchers compute after an intercepted launch is garbage and is ignored. Exit status: 0 all compiled, 1
some failed or were never reached, 77 this Triton has no NVIDIA backend.

    python tests/compile_kernels.py 90 80
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from kernel_resources import Launch, compiling, nvidia_backend

KERNELS = {
    "_stats_kernel", "_threshold_pass_kernel", "_probs_kernel", "_finish_kernel", "_sums_kernel", "_draw_kernel",
    "_race_kernel", "_match_kernel", "_translate_kernel", "_ngram_insert_kernel", "_ngram_lookup_kernel",
    "_lookup_kernel",
}  # fmt: skip


def main(archs: list[int]) -> int:
    if (problem := nvidia_backend()) is not None:
        print(f"cannot compile for NVIDIA GPUs here: {problem}")
        return 77
    launches: list[Launch] = []
    with compiling(archs, launches.append):
        for launcher in _launches():
            try:
                launcher()
            except Exception:  # the intercepted launches left garbage behind: nothing to check
                continue
    failures = [
        f"{launch.kernel} sm_{launch.arch} {launch.constexprs}: {launch.error}"
        for launch in launches
        if launch.error
    ]
    for name in sorted(KERNELS - {launch.kernel for launch in launches}):
        failures.append(f"{name}: never launched")
    print(f"compiled {len(launches)} kernel variants for sm_{', sm_'.join(map(str, archs))}")
    for failure in failures:
        print("FAILED", failure[-2000:])
    return 1 if failures else 0


def _launches():
    """Calls of every launcher over the variants the engine uses: greedy and sampled, filters, masks,
    vocabulary bridges, fp16/bf16 logits, with and without an n-gram table, prompt lookup's settings."""
    from omnidraft_fast.kernels import lookup, match, ngram, sampling, translate, verify
    from test_kernels_match import _case as _match_case
    from test_kernels_translate import _d2t, _drafts, _table
    from test_kernels_verify import _case

    for temperature in (0.0, 0.7):
        for options in ({}, {"vocab_d": 257}, {"vocab_d": 257, "separate_t1": True}, {"top_k": 5, "top_p": 0.9},
                        {"dtype": torch.bfloat16}, {"dtype": torch.float16},
                        {"vocab_d": 257, "separate_t1": True, "support_only": True}):  # fmt: skip
            yield lambda t=temperature, o=options: verify.verify_triton(**_case(4, 3, 300, t, **o))
    for temperature in (0.0, 0.7):
        for options in ({}, {"top_k": 5, "top_p": 0.9}, {"dtype": torch.bfloat16}, {"dtype": torch.float16}):
            yield lambda t=temperature, o=options: match.match_triton(**_match_case(4, 3, 300, t, **o))
    mask = torch.rand(300) < 0.7
    for temperature, top_k, top_p, allowed in ((0.0, 0, 1.0, None), (1.0, 0, 1.0, None), (0.7, 5, 0.9, mask),
                                               (1.0, 0, 0.8, None), (0.0, 0, 1.0, mask)):  # fmt: skip
        logits, noise = torch.randn(3, 300), torch.rand(3, 300)
        args = (logits, noise, temperature, top_k, top_p, allowed)
        for probs in (True, False):  # the distribution written, or the ids alone
            yield lambda a=args, p=probs: sampling.sample_triton(*a, probs=p)
    drafts, d2t = _drafts(4, 5, seed=1), _d2t(seed=2)
    table = _table(drafts, 4, 64, windows=10, random=10, seed=3)
    for drafted in (None, torch.tensor([5, 2, 0, 3])):
        yield lambda d=drafted: translate.translate_triton(drafts, d2t, drafted=d)
        yield lambda d=drafted: translate.translate_triton(drafts, d2t, *table, drafted=d)
    table = (torch.full((64,), -1), torch.full((64, 4), -1, dtype=torch.int32),
             torch.full((64,), -1, dtype=torch.int32), torch.zeros(64, dtype=torch.int64))  # fmt: skip
    keys, values = torch.randint(0, 9, (10, 4)), torch.randint(0, 9, (10,))
    yield lambda: ngram.ngram_insert_triton(*table, keys, values, torch.ones(10, dtype=torch.int64))
    yield lambda: ngram.ngram_lookup_triton(table[1], table[2], keys)
    tokens, start, lengths = torch.randint(0, 3, (3, 40)), torch.tensor([0, 4, 9]), torch.tensor([40, 30, 9])
    for k, max_ngram in ((1, 1), (10, 2), (5, 4)):  # prompt lookup's k and max_matching_ngram_size
        for splits in (1, 3):  # one program a row, or a row's programs meeting in atomics
            yield lambda a=(tokens, start, lengths, k, max_ngram), s=splits: lookup.lookup_triton(
                *a, block=16, splits=s
            )


if __name__ == "__main__":
    sys.exit(main([int(arch) for arch in sys.argv[1:]] or [90]))
