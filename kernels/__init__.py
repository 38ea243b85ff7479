"""Hot-path kernels: array in, array out, nothing of tandem. Numba on CPU, Triton on CUDA
tensors; each public function has a plain reference beside it (``*_reference``) that the
tests compare against."""

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
    "topk_gating",
    "topk_gating_reference",
]
