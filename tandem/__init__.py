"""Tandem: edge-cloud collaborative inference.

The subpackages are the architecture (see DESIGN.md): ``tandem.kernels``, ``tandem.runtime``,
``tandem.router``, ``tandem.edge``, ``tandem.cloud`` and ``tandem.bench``.
"""

__version__ = "0.1.0"
