"""The Triton interpreter without the work it repeats at every call of a ``@triton.jit`` helper.

Under ``TRITON_INTERPRET=1`` a kernel launch (``GridExecutor.__call__``) points the builtins of the
language modules its kernel's globals name (``triton.language``, ``triton.language.core``) at the
interpreter (``_patch_lang``), runs the programs and puts them back. Each call of a jit helper inside the
kernel (``rows.load_z``, ``tl.sum``, ``tl.max``, ...) runs ``_patch_lang`` again for the helper's globals:
``inspect.getmembers`` over those modules, ~4 ms a call. Once a module is patched in this launch, that
changes nothing (its builtins are already replaced, so skipped; the rest is set to equal, stateless
values). A sampling launch with top-k/top-p calls helpers ~2300 times: the repeated patching was about half
of the interpreted kernel tests' time (triton 3.9; 3.6 does the same).

``install()`` skips it: the launch's own patch runs, and so does the first helper call in the
launch that names a module not patched yet (``tl.sum``'s globals name ``tl.core``, the kernels' ``tl``),
exactly as before, what it patches left as the interpreter leaves it. It also keeps the answers of the
interpreter's ``_get_np_dtype`` (a Triton type's numpy dtype, a fixed table it builds anew at each of the
~80,000 calls of a sampling test: about 8% of those tests' time). The kernels run the same interpreted
operations on the same values.
"""

from __future__ import annotations

import functools
import threading

_STARTING = object()


def install() -> None:
    """Wrap the interpreter's launch and its ``_patch_lang`` (once; left as it is where a Triton has not both)."""
    import triton.language as tl
    from triton.runtime import interpreter

    if not hasattr(interpreter, "_patch_lang") or not hasattr(interpreter, "GridExecutor"):
        return
    if getattr(interpreter._patch_lang, "_skips_nested", False):
        return
    patch_lang, launch = interpreter._patch_lang, interpreter.GridExecutor.__call__
    state = threading.local()  # per thread: the launch's patched modules, _STARTING before its patch, or None

    def languages(fn) -> frozenset[int]:  # read at each call: the interpreter adds to a module's globals
        return frozenset(id(v) for v in fn.__globals__.values() if v is tl or v is tl.core)

    def patch_once(fn):
        held = getattr(state, "held", None)
        if held is _STARTING:  # the launch's own patch
            scope = patch_lang(fn)
            state.held = languages(fn)
            return scope
        if held is None:  # not inside a launch
            return patch_lang(fn)
        if languages(fn) <= held:  # a helper inside the launch, its modules already patched
            return interpreter._LangPatchScope()
        scope = patch_lang(fn)  # the first helper naming another module (tl.sum's globals name tl.core)
        state.held = held | languages(fn)
        return scope

    def launch_holding_the_patch(self, *args, **kwargs):
        state.held = _STARTING
        try:
            return launch(self, *args, **kwargs)
        finally:
            state.held = None

    patch_once._skips_nested = True
    interpreter._patch_lang = patch_once
    interpreter.GridExecutor.__call__ = launch_holding_the_patch
    if hasattr(interpreter, "_get_np_dtype"):
        interpreter._get_np_dtype = _remembered(interpreter._get_np_dtype)


def _remembered(np_dtype):
    """``np_dtype`` (the interpreter's ``_get_np_dtype``: a Triton type's numpy dtype, a block's that of its
    elements; it builds its table of 20 types at each of its ~80,000 calls in a sampling test) with the
    answer for each scalar element type kept (blocks and pointers are not hashable; a pointer's answer
    comes before the table)."""
    import triton.language as tl

    known = {}

    @functools.wraps(np_dtype)
    def remembered(tt_dtype):
        scalar = tt_dtype.element_ty if isinstance(tt_dtype, tl.block_type) else tt_dtype
        if isinstance(scalar, tl.pointer_type):
            return np_dtype(tt_dtype)
        try:
            return known[scalar]
        except KeyError:
            known[scalar] = answer = np_dtype(scalar)
            return answer

    return remembered
