"""``triton_interpreter.py`` (installed by conftest.py): a launch patches the language once, whatever the
number of jit helper calls inside it, computes what it computed, and leaves the language as the plain
interpreter leaves it."""

from __future__ import annotations

import os

import pytest
import torch
import triton
import triton.language as tl

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton interpreter's patching: TRITON_INTERPRET=1"
)


@triton.jit
def _twice(x):
    return x * 2


@triton.jit
def _kernel(out_ptr, CALLS: tl.constexpr):
    x = tl.arange(0, 4).to(tl.float32)
    for _ in tl.static_range(CALLS):
        x = _twice(x)
    tl.store(out_ptr + tl.arange(0, 4), x)
    tl.store(out_ptr + 4, tl.sum(x, axis=0))  # a helper of triton.language's own (its globals: tl.core)


def test_a_launch_patches_the_language_once_whatever_its_helper_calls(monkeypatch):
    from triton.runtime import interpreter

    patched = []
    real = interpreter._patch_builtin
    monkeypatch.setattr(interpreter, "_patch_builtin", lambda pkg, *a: patched.append(pkg) or real(pkg, *a))
    _kernel[(1,)](torch.zeros(5), CALLS=1)  # the first launch rewrites the helpers (their globals grow)
    counts = {}
    for calls in (1, 8):
        out = torch.zeros(5)
        patched.clear()
        _kernel[(1,)](out, CALLS=calls)
        expected = torch.arange(4.0) * 2**calls
        assert torch.equal(out, torch.cat([expected, expected.sum()[None]]))
        counts[calls] = len(patched)
        assert tl.core.is_builtin(tl.load) and tl.core.is_builtin(tl.tensor.__add__)  # put back
    assert counts[8] == counts[1] > 0, counts  # unpatched, each call of `_twice` patched the language again


def test_numpy_dtypes_are_the_interpreters():
    """Each Triton type's numpy dtype is the plain interpreter's, kept after its first call, for scalars,
    blocks and pointers alike."""
    import triton_interpreter
    from triton.runtime import interpreter

    calls = []
    assert hasattr(interpreter._get_np_dtype, "__wrapped__"), "install() wraps the interpreter's own lookup"
    plain = interpreter._get_np_dtype.__wrapped__
    counted = triton_interpreter._remembered(lambda t: calls.append(t) or plain(t))
    scalars = [tl.int1, tl.int8, tl.uint8, tl.int32, tl.int64, tl.float16, tl.bfloat16, tl.float32, tl.float64]  # fmt: skip
    types = [*scalars, *(tl.block_type(t, [4]) for t in scalars), tl.pointer_type(tl.float32),
             tl.block_type(tl.pointer_type(tl.int64), [2, 4])]  # fmt: skip
    for _ in range(3):
        assert [counted(t) for t in types] == [plain(t) for t in types]
    assert len(calls) == len(scalars) + 3 * 2  # each scalar once; pointers every time, before the table
