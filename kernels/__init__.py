"""Triton kernels of omnidraft_fast and their torch references (installed as ``omnidraft_fast.kernels``).

Each module holds, for one op, the Triton kernel ``_<op>_kernel``, its launcher
``<op>_triton`` and the torch reference ``<op>_reference`` that defines the op.
Kernels know nothing of models or tokenizers: tensors in, tensors out. The
public, checked entry points are in ``omnidraft_fast.ops``.
"""
