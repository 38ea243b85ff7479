"""Hot-path kernels: array in, array out, nothing of tandem. Numba on CPU; each public function
has a plain numpy reference beside it (``*_reference``) that the tests compare against."""

from tandem.kernels.confidence import (
    ConfidenceStats,
    all_finite,
    confidence,
    confidence_reference,
    confidence_row,
)

__all__ = ["ConfidenceStats", "all_finite", "confidence", "confidence_reference", "confidence_row"]
