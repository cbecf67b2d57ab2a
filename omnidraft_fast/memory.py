"""What a device holds in all: the bound on configuration values that size an allocation (the n-gram table
and the acceptance head when an engine is built, the prefill's attention mask of a ``prompt_bucket``-wide
prompt at every padded request), checked when the engine is built, so that one too large for the device is
refused by name instead of failing inside torch's allocator or, built piece by piece, running for hours
first."""

from __future__ import annotations

import os

import torch

__all__ = ["check_fits", "device_memory"]


def device_memory(device: torch.device | str) -> int | None:
    """Bytes of memory ``device`` has in all: a CUDA GPU's, or the machine's physical memory for the CPU;
    None where that cannot be read (other devices, a platform without ``sysconf``)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, OSError, ValueError):
            return None
    return None


def check_fits(setting: str, needed: int, what: str, devices: tuple[torch.device | str, ...]) -> None:
    """Refuse ``setting`` (its name and value, as the message shows them) when it needs ``needed`` bytes
    for ``what``, more than one of ``devices`` has in all."""
    for device in devices:
        total = device_memory(device)
        if total is not None and needed > total:
            raise ValueError(
                f"{setting} needs {needed:,} bytes for {what}, more than the {torch.device(device)} has in all "
                f"({total:,} bytes); lower it"
            )
