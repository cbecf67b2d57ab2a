"""When a reference may use a tensor's values on the host (numpy's partition and sort, a read of the rule ids
a batch holds, whether a translated block holds a split marker, the early exits of prompt lookup's scan and
the n-gram table's probes, the rows a large insert still probes): the one condition the references' CPU
shortcuts share."""

from __future__ import annotations

import torch

__all__ = ["eager_cpu"]


def eager_cpu(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a CPU tensor used eagerly: outside ``torch.compile`` (which traces numpy calls as
    torch ops and would turn a value read into a constant) and outside any dispatch mode (one that records
    ops to replay them, as the engine's CPU stand-in for CUDA graphs does, sees torch's ops only, refuses
    host reads, and would replay without numpy's work)."""
    return (
        tensor.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
    )
