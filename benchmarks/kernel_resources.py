"""Registers, shared memory and resident programs per SM of the Triton kernels, as the launchers launch them
at the goal shapes, compiled for an NVIDIA architecture on any machine (no GPU needed).

A memory-bound pass is fast only while each SM holds enough warps to keep loads in flight, and a grid
larger than the GPU holds at once runs in waves, the last one partly idle. Both follow from the compiled
kernel (registers per thread, shared memory, warps) and the grid, which this script reports per launch:
the launchers run on CPU tensors at the goal shapes of ``benchmarks/TUNING.md`` with every kernel launch
intercepted and compiled (``triton.compile``) as a GPU launch specialises it (an int equal to 1 a
constant, an int or a pointer divisible by 16 marked so: the specialisation decides vectorisation, and
with it registers); their grids are sized for ``--sms`` SMs, since a CPU has none to count. The
resources come from ``cuobjdump -res-usage`` (Triton's own copy), the limits per SM from CUDA's
occupancy tables.

    python benchmarks/kernel_resources.py --arch 90 --sms 132 --out DIR   # writes DIR/resources-sm_90.{json,md}

Exit status 77: this Triton has no NVIDIA backend, or no cuobjdump beside it (nothing compiled).
``tests/compile_kernels.py`` compiles every kernel variant through :func:`compiling` too.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton

from omnidraft_fast.report import environment, provenance, write_results


@dataclass(frozen=True)
class Limits:
    """What one SM holds at once (CUDA's occupancy tables for the compute capability)."""

    registers: int = 65536  # in 4 sub-partitions of 16384, each holding whole warps
    threads: int = 2048
    programs: int = 32
    shared: int = 233472  # bytes: 228 KB on sm_90, 164 KB on sm_80
    reserved: int = 1024  # bytes of shared memory the driver reserves a program (sm_80 on)


LIMITS = {90: Limits(), 80: Limits(shared=167936)}


def resident(registers: int, warps: int, shared: int, limits: Limits) -> tuple[int, str]:
    """(programs one SM holds at once, the resource that bounds it) for a kernel of ``registers`` per
    thread, ``warps`` warps and ``shared`` bytes per program (static and dynamic), by the rules of CUDA's
    occupancy calculator (``cuda_occupancy.h``): registers go to a warp in units of 256 (8 a thread), the
    warps of an SM in 4 sub-partitions of a quarter of its registers each; shared memory to a program with
    the driver's reserved 1 KB, in units of 128 bytes."""
    per_warp = math.ceil(registers * 32 / 256) * 256
    shared = math.ceil((shared + limits.reserved) / 128) * 128
    bounds = {
        "registers": 4 * (limits.registers // 4 // per_warp) // warps if registers else limits.programs,
        "threads": limits.threads // (32 * warps),
        "shared": limits.shared // shared,
        "programs": limits.programs,
    }
    bound = min(bounds, key=bounds.get)
    return bounds[bound], bound


LAUNCH_OPTIONS = ("num_warps", "num_stages", "maxnreg")  # what a launch may set beside the arguments


def specialise(kernel, args: tuple, kwargs: dict) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) of a launch of ``kernel`` with these arguments, as a GPU
    launch specialises them: by Triton's own rule (an int equal to 1 a constant, an int or a tensor's
    address divisible by 16 marked ``tt.divisibility``, on which loads and stores vectorise; ints in 32 bits
    where they fit)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(kernel.params):
        value = kwargs[param.name] if param.name in kwargs else args[i] if i < len(args) else param.default
        if param.is_constexpr or value is None:  # a None argument is specialised as a constant
            signature[param.name], constexprs[param.name] = "constexpr", value
            continue
        kind, desc = native_specialize_impl(
            CUDABackend, value, False, not param.do_not_specialize, not param.do_not_specialize_on_alignment
        )
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = desc
        elif isinstance(desc, str) and (parsed := CUDABackend.parse_attr(desc)):
            attrs[(i,)] = parsed
    options = {
        "num_warps": 4,
        **{name: kwargs[name] for name in LAUNCH_OPTIONS if kwargs.get(name) is not None},
    }
    return signature, constexprs, attrs, options


@dataclass
class Launch:
    """One intercepted launch, compiled for ``arch``."""

    kernel: str
    arch: int
    constexprs: dict
    grid: tuple
    warps: int
    maxnreg: int | None  # the registers a thread may take, where the launch caps them
    registers: int | None = None  # per thread; None where the compile failed
    stack: int | None = None  # bytes per thread spilled to local memory
    shared: int | None = None  # bytes per program, static (cuobjdump's) and dynamic (Triton's)
    error: str | None = None

    @property
    def programs(self) -> int:
        return math.prod(self.grid)


CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"  # Triton's own copy


def _resources(compiled) -> tuple[int, int, int]:
    """(registers, stack bytes, shared bytes) of a compiled kernel, from cuobjdump: its static shared memory
    (on sm_90, 1 KB where the kernel uses shared memory at all, its dynamic window starting past it) and
    Triton's dynamic; CUDA's occupancy calculator adds the 1 KB the driver reserves a program
    (``resident``)."""
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run(
            [str(CUOBJDUMP), "-res-usage", cubin.name], capture_output=True, text=True, check=True
        )
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", usage.stdout)
    if found is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {usage.stdout[-500:]}")
    registers, stack, static = map(int, found.groups())
    return registers, stack, static + compiled.metadata.shared


def nvidia_backend() -> str | None:
    """Why kernels cannot be compiled for NVIDIA GPUs here, or None when they can."""
    if "nvidia" not in triton.backends.backends:
        return "this Triton has no NVIDIA backend"
    try:
        from triton._C.libtriton import native_specialize_impl  # noqa: F401 (specialise)
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as error:
        return str(error)
    return None


@contextlib.contextmanager
def compiling(archs: list[int], record: Callable[[Launch], None], resources: bool = False) -> Iterator[None]:
    """Within the block, every Triton launch (``kernel[grid](...)``) compiles the kernel for each of
    ``archs`` instead of running it, once per distinct variant (kernel, constexprs, signature, attrs,
    launch options: warps, stages, a register cap), and hands ``record`` a :class:`Launch` (with its resources when ``resources``; a compile error
    as its ``error``). What a launcher computes after an intercepted launch is garbage."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    seen: set = set()

    def intercept(kernel, grid):
        def launch(*args, **kwargs):
            signature, constexprs, attrs, options = specialise(kernel, args, kwargs)
            for arch in archs:
                key = (
                    kernel.__name__,
                    arch,
                    repr(sorted(constexprs.items())),
                    repr(signature),
                    repr(attrs),
                    repr(sorted(options.items())),
                )
                if key in seen:
                    continue
                seen.add(key)
                warps, maxnreg = options["num_warps"], options.get("maxnreg")
                launch = Launch(kernel.__name__, arch, constexprs, tuple(grid), warps, maxnreg)
                try:
                    compiled = triton.compile(
                        ASTSource(kernel, signature, constexprs, attrs),
                        target=GPUTarget("cuda", arch, 32),
                        options=options,
                    )
                    if resources:
                        launch.registers, launch.stack, launch.shared = _resources(compiled)
                except Exception as error:  # report every failure, not only the first
                    launch.error = str(error.__cause__ or error)
                record(launch)

        return launch

    original = triton.runtime.jit.JITFunction.__getitem__
    triton.runtime.jit.JITFunction.__getitem__ = intercept
    try:
        yield
    finally:
        triton.runtime.jit.JITFunction.__getitem__ = original


@contextlib.contextmanager
def setting(module, name: str, value) -> Iterator[None]:
    """``module.name`` set to ``value`` within the block, put back after (a launch constant, or what sizes
    the launchers' grids)."""
    shipped = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, shipped)


def sized_for(sms: int) -> contextlib.AbstractContextManager:
    """The launchers size their grids by the device's SM count (``rows.target_programs``); a CPU has none,
    so within the block they take ``sms``."""
    from omnidraft_fast.kernels import rows

    return setting(rows, "target_programs", lambda device, per_sm: per_sm * sms)


def goal_cases() -> dict[str, Callable[[], object]]:
    """The goal shapes' launches by case (``tune_kernels.py``'s cases and verification's other variants, on
    CPU tensors)."""
    from omnidraft_fast.kernels.match import match_triton
    from omnidraft_fast.kernels.sampling import sample_triton
    from omnidraft_fast.kernels.verify import verify_triton

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_match import match_inputs
    from bench_sampling import sampling_inputs
    from bench_verify import TEMPERATURE, verify_inputs
    from tune_kernels import BATCH, MATCH, ROWS, SAMPLING, VERIFY, VOCAB, K

    cases: dict[str, Callable[[], object]] = {}
    logits, noise = sampling_inputs(ROWS, VOCAB, device="cpu")
    for name, (temperature, top_k, top_p, probs) in SAMPLING.items():
        cases[f"sample {name}"] = lambda t=temperature, k=top_k, p=top_p, q=probs: sample_triton(
            logits, noise, t, k, p, probs=q
        )
    inputs = verify_inputs(BATCH, K, VOCAB, cross_vocab=False, device="cpu")[:7]
    for name, (top_k, top_p) in VERIFY.items():
        cases[f"verify {name}"] = lambda k=top_k, p=top_p: verify_triton(
            *inputs[:3], None, *inputs[3:], TEMPERATURE, k, p
        )
    # Variants the engine launches beside the goal cases: greedy rows under a deferral rule, a drafter of
    # another vocabulary (the proposal read through the bridge), its T = 1 law apart for the rules.
    cases["verify rule mix, greedy"] = lambda: verify_triton(*inputs[:3], None, *inputs[3:], 0.0, 0, 1.0)
    crossed = verify_inputs(BATCH, K, VOCAB, cross_vocab=True, device="cpu")[:8]
    cases["verify rule mix, cross-vocabulary"] = lambda: verify_triton(
        *crossed[:3], None, *crossed[3:7], TEMPERATURE, 0, 1.0, crossed[7]
    )
    cases["verify rule mix, cross-vocabulary, T = 1 law apart"] = lambda: verify_triton(
        *crossed[:3], crossed[2].clone(), *crossed[3:7], TEMPERATURE, 0, 1.0, crossed[7]
    )
    for name, temperature in MATCH.items():
        match = match_inputs(BATCH, K, VOCAB, temperature, device="cpu")
        cases[f"match {name}"] = lambda t=temperature, m=match: match_triton(*m, t, 0, 1.0)
    return cases


def measure(arch: int, sms: int, only: list[str] | None = None) -> dict[str, list[dict]]:
    """Each goal case's launches (one per kernel variant) with their resources and occupancy."""
    limits = LIMITS.get(arch, Limits())
    result: dict[str, list[dict]] = {}
    for case, run in goal_cases().items():
        if only and not any(text in case for text in only):
            continue
        launches: list[Launch] = []
        with sized_for(sms), compiling([arch], launches.append, resources=True):
            run()
        rows = []
        for launch in launches:
            row = {**asdict(launch), "programs": launch.programs}
            if launch.registers is not None:
                per_sm, bound = resident(launch.registers, launch.warps, launch.shared, limits)
                row.update(per_sm=per_sm, bound=bound, waves=round(launch.programs / (per_sm * sms), 2))
            rows.append(row)
        result[case] = rows
    return result


def _markdown(result: dict) -> str:
    lines = [
        f"# Kernel resources, sm_{result['arch']}, {result['sms']} SMs ({provenance(result)})",
        "",
        "Each launch of the goal cases (`benchmarks/kernel_resources.py`), compiled as a GPU launch",
        "specialises it: registers (and the launch's cap on them) and stack per thread, shared memory per",
        "program, the programs one SM holds at once and what bounds them, and the grid in waves of the whole",
        "GPU (a fraction past a whole number is a last wave partly idle).",
        "",
        "| case | kernel | warps | registers | stack | shared | grid | per SM | bound | waves |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case, rows in result["cases"].items():
        for row in rows:
            if row["error"]:
                lines.append(f"| {case} | `{row['kernel']}` | {row['warps']} | failed: {row['error'][:80]} |")
                continue
            cap = f" (cap {row['maxnreg']})" if row["maxnreg"] else ""
            lines.append(
                f"| {case} | `{row['kernel']}` | {row['warps']} | {row['registers']}{cap} | {row['stack']} | "
                f"{row['shared']} | {' x '.join(map(str, row['grid']))} | {row['per_sm']} | {row['bound']} | "
                f"{row['waves']} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200), 80 (A100)"
    )
    parser.add_argument("--sms", type=int, default=132, help="SMs of the GPU the grids are sized for")
    parser.add_argument("--only", nargs="+", metavar="TEXT", help="the cases whose name holds one of these")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if (problem := nvidia_backend()) is not None:
        print(f"cannot compile for NVIDIA GPUs here: {problem}")
        return 77
    if not CUOBJDUMP.is_file():
        print(f"cannot read compiled kernels' resources here: this Triton has no {CUOBJDUMP}")
        return 77
    result = {**environment(torch.device("cpu")), "arch": args.arch, "sms": args.sms}
    result["cases"] = measure(args.arch, args.sms, args.only)
    write_results(args.out / f"resources-sm_{args.arch}", result, _markdown(result))
    return 1 if any(row["error"] for rows in result["cases"].values() for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
