"""Hot-path kernels: array in, array out. Numba on CPU; Triton on GPU (later issues)."""

from tandem.kernels.confidence import (
    ConfidenceStats,
    confidence,
    confidence_reference,
    confidence_row,
)

__all__ = ["ConfidenceStats", "confidence", "confidence_reference", "confidence_row"]
