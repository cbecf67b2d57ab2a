"""Triton kernels of omnidraft_fast and their torch references (installed as ``omnidraft_fast.kernels``).

Each module holds one op's maths: the torch reference ``<op>_reference`` that defines it and, for the
ops with a kernel (sampling, verification, translation, the n-gram table, prompt lookup's draft), the
launcher ``<op>_triton`` with its Triton kernels (``_<op>_kernel``, or one per pass); ``match`` is
verification by exact match.
``commit``, ``proposal`` and ``ragged`` are references only. ``cascade`` (the deferral rules) and
``target_stats`` (the statistics pass over the target's logits) are the parts both verifications share;
``thresholds`` (the top-k/top-p search) is shared by sampling and both verifications, and ``rows`` (how a row
is chunked over programs, the Triton helpers over one tile) by every pass over a vocabulary; ``host`` says
when a reference's CPU shortcut may use a tensor's values on the host.
Kernels know nothing of models or tokenizers: tensors in, tensors out. The
public, checked entry points are in ``omnidraft_fast.ops``.
"""
