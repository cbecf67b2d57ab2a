"""Capture and replay of the engine's round stages: CUDA graphs on CUDA, a replay recorder elsewhere.

A round (``rounds.py``) is a few *stages* of fixed-shape device work that read and write only tensors
allocated before the round (the request's state, the caches, the models' weights, the n-gram table):
one stage for the whole round, or, with an adaptive draft length, one per draft step and one for the
rest (translate, target forward, verify, commit, learn), chosen by the host between them; without a
drafter, prompt lookup's stage ("lookup") and the rest, as wide as the round's longest draft; with
``rounds_per_sync``, one for several rounds; with ``in_flight_rounds``, the learning step ("learn").
:class:`StageGraphs` runs a stage the first time eagerly (the warm-up: Triton compiles, cuBLAS picks
its kernels), captures it the second time and from then on replays it: no Python, no launch overhead,
no host round-trip. Captured stages share one memory pool and are released with it (``close``); the
engine keeps them for the next request of the same shapes and settings (``Rounds.begin``).

Replay semantics are what the engine must respect, on every device:

- Python inside a stage runs once, at capture; Python values it computes are constants thereafter.
  What a stage passes to a later one goes through tensors allocated outside the stages.
- A stage reads its inputs where they were at capture: tensors are updated in place, never rebound.
- A stage never reads the device from the host (``.item()``, ``bool(t)``, ``nonzero``,
  data-dependent shapes): a CUDA capture would fail or, worse, bake in one round's value.
- Randomness comes from the request's generator, registered with every graph, so each replay draws
  fresh numbers.

Off CUDA, :class:`ReplayGraph` gives the same semantics without a GPU: capture runs the stage once
while recording every aten op it dispatches (with its inputs' storage at that moment, as a CUDA graph
keeps addresses), replay re-runs the recorded ops on the same storage, copying fresh results into the
recorded outputs. Python does not rerun, so a stage that
breaks the rules above computes something else than in eager mode, and a host read or data-dependent
shape inside a capture raises :class:`CaptureError`. That is how the tests check, on a CPU, that the
engine's rounds can be captured (``EngineConfig(cuda_graphs=True)`` works on every device). Work that
bypasses the dispatcher is not recorded (Triton kernels run by the interpreter): off CUDA the ops run
their torch references, which go through it.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Hashable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes, _pop_mode
from torch.utils._pytree import tree_flatten, tree_map_only

from .locks import ModelsBusy
from .stats import StageTimer

__all__ = ["CaptureError", "ReplayGraph", "StageGraphs"]

# Ops whose output shape depends on tensor values: a capture cannot hold them.
_DATA_DEPENDENT = frozenset(
    {"nonzero", "nonzero_static", "masked_select", "unique", "_unique", "_unique2", "unique_consecutive",
     "unique_dim", "repeat_interleave", "argwhere", "bincount", "histc"}
)  # fmt: skip


# Indexing ops that turn a boolean index into positions (a `nonzero` inside).
_INDEXING = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})


def _boolean_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


class CaptureError(RuntimeError):
    """A captured stage did something a CUDA graph cannot replay (a host read, a data-dependent shape)."""


# Host reads that reach no dispatcher (on a CPU tensor they read its memory directly), refused while
# recording: a replay would reuse the values read once (JetMoE's router sizes its expert splits so).
_HOST_READS = ("tolist", "numpy", "__array__")
# They are refused by replacing torch.Tensor's methods, which every thread shares: installed by the first
# recording under way, restored by the last, refusing in the recording threads only (other threads, a
# streamer's consumer or another engine's request, read as they like).
_REFUSAL_GUARD = threading.Lock()
_RECORDING: Counter[int] = Counter()  # thread -> its recordings under way
_METHODS: dict[str, Callable] = {}  # torch.Tensor's own methods, read as the first recording installs ours


@contextmanager
def _host_reads_refused() -> Iterator[None]:
    """``.tolist()``, ``.numpy()`` and ``__array__`` raise :class:`CaptureError` in this thread meanwhile."""
    thread = threading.get_ident()
    counted = False
    try:
        with _REFUSAL_GUARD:
            _RECORDING[thread] += 1
            counted = True
            for name in _HOST_READS:
                method = getattr(torch.Tensor, name)
                # Ours, installed already (or left by an install or restore cut short): never taken for
                # torch.Tensor's own, which _METHODS keeps.
                if not getattr(method, "_refuses_host_reads", False):
                    _METHODS[name] = method
                    setattr(torch.Tensor, name, _refusing(name, method))
        yield
    finally:
        with _REFUSAL_GUARD:
            if counted:
                _RECORDING[thread] -= 1
                if not _RECORDING[thread]:
                    del _RECORDING[thread]
            if not _RECORDING:
                for name, method in _METHODS.items():
                    setattr(torch.Tensor, name, method)


def _refusing(name: str, method: Callable) -> Callable:
    def read(tensor, *args, **kwargs):
        if threading.get_ident() not in _RECORDING:
            return method(tensor, *args, **kwargs)
        raise CaptureError(
            f"`.{name}()` reads a tensor back to the host inside a captured stage; read it after the stage instead"
        )

    read._refuses_host_reads = True
    return read


class ReplayGraph(TorchDispatchMode):
    """A CPU stand-in for ``torch.cuda.CUDAGraph`` with the same replay semantics (module docstring).

    Use as a context manager around the stage once (it runs and is recorded), then :meth:`replay`.
    """

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[Any, tuple, dict, Any, bool]] = []
        self._refusal = ExitStack()

    def __enter__(self):
        self._refusal.enter_context(_host_reads_refused())
        try:
            return super().__enter__()
        except BaseException:
            self._refusal.close()
            raise

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._refusal.close()

    def record(self, stage: Callable[..., Any], *args: Any) -> None:
        """``with self: stage(*args)``, leaving the thread as it was however that ends: an exit cut short (a
        Ctrl-C as ``__exit__`` begins) would leave this recorder on the thread's dispatch stack, refusing
        every later host read there."""
        depth = torch._C._len_torch_dispatch_stack()
        try:
            with self:
                stage(*args)
        finally:
            while torch._C._len_torch_dispatch_stack() > depth:
                _pop_mode()
            self._refusal.close()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _DATA_DEPENDENT or (name in _INDEXING and _boolean_index(args)):
            raise CaptureError(
                f"`{name}` has a data-dependent output shape and cannot be captured; keep the stage's shapes "
                "fixed (masks and torch.where instead of boolean indexing)"
            )
        out = func(*args, **kwargs)
        if not all(isinstance(x, torch.Tensor) or x is None for x in tree_flatten(out)[0]):
            raise CaptureError(
                f"`{func}` reads a value back to the host inside a captured stage (`.item()`, `bool()`, "
                "`.tolist()`...); read it after the stage instead"
            )
        aliased = any(r.alias_info is not None for r in func._schema.returns)  # in place or a view
        # Inputs are kept as the storage they had now, as a CUDA graph keeps addresses: a tensor whose
        # `.data` is swapped after the capture is not seen by replays.
        with _disable_current_modes():
            args, kwargs = tree_map_only(torch.Tensor, torch.Tensor.detach, (args, kwargs))
        self.ops.append((func, args, kwargs, out, aliased))
        return out

    @torch.no_grad()
    def replay(self) -> None:
        """Re-run the recorded ops on the recorded tensors."""
        for func, args, kwargs, out, aliased in self.ops:
            result = func(*args, **kwargs)
            if not aliased:  # a fresh tensor: its consumers read the recorded one
                for old, new in zip(tree_flatten(out)[0], tree_flatten(result)[0], strict=True):
                    if old is not None:
                        old.copy_(new)


class StageGraphs:
    """The captured stages of a request, and of the requests after it that reuse them (module docstring).

    Args:
        device: the engine's device; CUDA captures CUDA graphs, other devices :class:`ReplayGraph`\\ s.
        generator: the request's random generator (registered with every CUDA graph).
        enabled: ``False`` runs every stage eagerly.
    """

    def __init__(self, device: torch.device, generator: torch.Generator, enabled: bool):
        self.enabled = enabled
        self.cuda = enabled and device.type == "cuda"
        self.generator = generator
        self.graphs: dict[Hashable, torch.cuda.CUDAGraph | ReplayGraph] = {}
        self.warm: set[Hashable] = set()
        self._pool = torch.cuda.graph_pool_handle() if self.cuda else None
        self._stream = torch.cuda.Stream(device) if self.cuda else None

    def run(self, key: Hashable, stage: Callable[[StageTimer], None], timer: StageTimer, name: str) -> None:
        """Run ``stage`` (called with the timer its inner stages use), captured under ``key``.

        Eager runs time their inner stages; a replay is timed as one stage ``name``.
        """
        if not self.enabled:
            stage(timer)
            return
        graph = self.graphs.get(key)
        if graph is not None:
            with timer(name):
                graph.replay()
            return
        if key not in self.warm:
            self.warm.add(key)
            stage(timer)
            return
        untimed = StageTimer(False, timer.device)
        with timer(f"capture:{name}"):
            try:
                if self.cuda:
                    graph = torch.cuda.CUDAGraph()
                    graph.register_generator_state(self.generator)
                    # thread_local: the CUDA calls of other threads (another engine's request, the
                    # caller's own work) neither fail nor spoil this capture; this thread's still fail it.
                    with torch.cuda.graph(
                        graph, pool=self._pool, stream=self._stream, capture_error_mode="thread_local"
                    ):
                        stage(untimed)
                    graph.replay()  # a capture records the work without doing it
                else:
                    graph = ReplayGraph()
                    graph.record(stage, untimed)  # a recording does the work
            except (torch.OutOfMemoryError, ModelsBusy):  # no capture failure: a nested generate() call, say
                raise
            except RuntimeError as error:  # what a capture raises (CUDA's errors, CaptureError); the rest,
                # a caller's hook's ValueError say, reaches the caller as itself.
                # The engine's stages are capturable (tests/test_graphs.py): what fails is a model's forward
                # that reads values on the host or sizes tensors by them (mixture-of-experts routing, ...).
                raise CaptureError(
                    f"the round's `{name}` stage could not be captured as a CUDA graph ({type(error).__name__}: "
                    f"{error}); a model whose forward reads values back to the host or has data-dependent shapes "
                    "cannot run captured: use EngineConfig(cuda_graphs=False) or, for mixture-of-experts "
                    "routing, load the model with experts_implementation='batched_mm' (fixed shapes)"
                ) from error
        self.graphs[key] = graph

    def close(self) -> None:
        """Release the graphs and their memory."""
        for graph in self.graphs.values():
            if isinstance(graph, torch.cuda.CUDAGraph):
                graph.reset()
        self.graphs.clear()
