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

import sys as _sys

if __name__ == "kernels":  # this folder imported as a top-level package: a checkout's root on sys.path
    # (`python -m pytest` run there). The name belongs to Hugging Face's `kernels` distribution, which
    # transformers imports when it is installed: hand the import over to it where it is installed.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _spec = _machinery.PathFinder.find_spec(
        "kernels", [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root]
    )
    if _spec is not None:
        _module = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _module  # what `import kernels` returns once this file has run
        _spec.loader.exec_module(_module)
