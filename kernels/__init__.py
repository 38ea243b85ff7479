"""Hot-path kernels: array in, array out, nothing of tandem. Numba on CPU, Triton on CUDA
tensors; each public function has a plain reference beside it (``*_reference``) that the
tests compare against. Where the library call (BLAS, torch) may beat a kernel on some CPU,
:mod:`~tandem.kernels.autotune` times both on this machine, per shape class, and keeps the
faster (:func:`~tandem.kernels.linear.linear`, the MoE experts); ``autotune.choices()`` says
what it chose."""

import sys as _sys

if __name__ == "kernels":
    # Python started in the repository root (``python -m pytest``, ``python -c``, a notebook)
    # finds this folder as a top-level ``kernels`` before the installed package of that name
    # (Hugging Face's kernel hub client, which transformers imports). This folder is only ever
    # ``tandem.kernels``: hand the import on to the next ``kernels`` on sys.path, and let the
    # import system return that module (it re-reads sys.modules after running this file).
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os

    _here = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _path = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _here]
    _spec = _machinery.PathFinder.find_spec(__name__, _path)
    del _sys.modules[__name__]
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError(
            "No module named 'kernels' (the repository's kernels/ folder is tandem.kernels)",
            name="kernels",
        )
    _module = _util.module_from_spec(_spec)
    _sys.modules[__name__] = _module
    try:
        _spec.loader.exec_module(_module)
    except BaseException:
        del _sys.modules[__name__]
        raise
else:
    from tandem.kernels.confidence import (
        ConfidenceStats,
        all_finite,
        confidence,
        confidence_reference,
        confidence_row,
    )
    from tandem.kernels.dispatch import (
        MoEPlan,
        combine,
        combine_reference,
        moe_align,
        moe_align_reference,
        permute,
        permute_reference,
        route,
        route_reference,
    )
    from tandem.kernels.gating import topk_gating, topk_gating_reference

    __all__ = [
        "ConfidenceStats",
        "MoEPlan",
        "all_finite",
        "combine",
        "combine_reference",
        "confidence",
        "confidence_reference",
        "confidence_row",
        "moe_align",
        "moe_align_reference",
        "permute",
        "permute_reference",
        "route",
        "route_reference",
        "topk_gating",
        "topk_gating_reference",
    ]
