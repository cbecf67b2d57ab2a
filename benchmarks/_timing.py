"""What every kernel benchmark times: the call, then a device synchronise (pytest-benchmark times the host)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def synced(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` followed by ``torch.cuda.synchronize()``, so a timing covers the GPU work it queued."""

    def run() -> None:
        fn()
        torch.cuda.synchronize()

    return run
