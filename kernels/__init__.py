"""Triton kernels of omnidraft_fast and their torch references (installed as ``omnidraft_fast.kernels``).

Each module holds one op's maths: the torch reference ``<op>_reference`` that defines it and, for the
ops with a kernel (sampling, verification, translation, the n-gram table), the launcher ``<op>_triton``
with its Triton kernels (``_<op>_kernel``, or one per pass). ``commit``, ``proposal`` and ``ragged`` are
references only.
Kernels know nothing of models or tokenizers: tensors in, tensors out. The
public, checked entry points are in ``omnidraft_fast.ops``.
"""
