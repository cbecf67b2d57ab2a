"""One request at a time per model: what lets several threads share engines and models.

transformers' ``generate()`` keeps no state between the model's forwards, so servers call it from several
threads on one model. A request here does keep state for its whole length: the engine's caches, device
state and kept graphs, the n-gram table and the learners, and, with online distillation, the drafter's
own weights (the merged adapter is swapped in, ``distill.py``). So a request holds a lock on each of its
models (and so on its engine, whose models are fixed), and so do ``save_state``, ``load_state``,
``release`` and the construction of a learning engine (peft puts its layers in the drafter for a
moment): callers in other threads wait their turn. The locks are taken in one global order, so engines
that share a model (one drafter serving several targets) do not deadlock.

A call made from inside a request, in its own thread (a streamer, stopping criterion, logits processor or
forward hook calling ``generate()`` again), on a model the request holds would wait for itself, and would
find the drafter's weights swapped: it raises :class:`ModelsBusy` (a ``RuntimeError``) that says so, before
it does anything (:func:`refuse_nested`, also inside a captured round), in the callback (which may catch
it; otherwise the request fails with it and the engine serves the next one as usual). On other models it runs if they are free, and raises :class:`ModelsBusy` too if another thread's
request holds them: waiting there could deadlock (that request may be calling into this thread's models
from its own callback). A callback that hands the call to another thread and waits for it is not seen:
it waits for the request it serves, for good. Plain ``model.generate()`` of transformers takes no lock:
called on the drafter while a distilling engine serves, it runs the drafter with the merged adapter.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

__all__ = ["ModelsBusy", "holding", "refuse_nested"]

_LOCKS: weakref.WeakKeyDictionary[torch.nn.Module, threading.Lock] = weakref.WeakKeyDictionary()
_GUARD = threading.Lock()  # guards _LOCKS
_HELD = threading.local()  # .ids: the ids of the models this thread's requests hold


class ModelsBusy(RuntimeError):
    """A model is in use by a request (this thread's, or another thread's while the call may not wait)."""


def _lock(model: torch.nn.Module) -> threading.Lock:
    with _GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.Lock()
        return lock


def refuse_nested(models: Iterable[torch.nn.Module], what: str) -> None:
    """Raise :class:`ModelsBusy` if this thread's request in progress holds one of ``models`` (``what``: the
    call): before anything else, so that such a call does nothing (no host read inside a capture, say)."""
    held: set[int] = _HELD.__dict__.setdefault("ids", set())
    if held & {id(model) for model in models}:
        raise ModelsBusy(
            f"{what} was called, in the thread of a request in progress, on a model that request is using (from "
            "a streamer, a stopping criterion, a logits processor or a forward hook?): it would wait for that "
            "request to end, which waits for it. Make the call after the request returns, or from another thread"
        )


@contextmanager
def holding(models: Iterable[torch.nn.Module], what: str, wait: bool = True) -> Iterator[None]:
    """Hold every model's lock for the duration (``what``: the call, named in the refusals). ``wait=False``,
    or a thread already holding models, raises :class:`ModelsBusy` instead of waiting for a busy one."""
    distinct = {id(model): model for model in models}
    refuse_nested(distinct.values(), what)
    held: set[int] = _HELD.__dict__.setdefault("ids", set())
    wait = wait and not held  # two requests' callbacks calling each other's models would wait for good
    taken: list[threading.Lock] = []
    try:
        for key in sorted(distinct):  # one global order: no two callers wait for each other
            lock = _lock(distinct[key])
            if not lock.acquire(blocking=wait):
                raise ModelsBusy(
                    f"{what}: a model it needs is in use by another thread's request"
                    + (
                        ", and this thread's own request may not wait for it (that request could be waiting "
                        "for this one's models): make the call after this request returns, or from another thread"
                        if held
                        else ""
                    )
                )
            taken.append(lock)
        held.update(distinct)
        yield
    finally:
        held.difference_update(distinct)
        for lock in reversed(taken):
            lock.release()
