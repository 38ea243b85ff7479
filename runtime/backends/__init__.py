"""Model backends: what runs a model, on the edge or in a cloud worker. One module per backend,
and one registry (:data:`BACKENDS`) that the worker's manifest and the edge's policy both choose
from by a ``format`` string.

Two kinds of backend:

* :class:`ModelBackend` — one batch of arrays in, one batch out: ``onnx``
  (:class:`~tandem.runtime.backends.onnx.OnnxBackend`), ``tandem-moe``
  (:class:`~tandem.runtime.backends.moe_classifier.MoEBackend`).
* :class:`~tandem.runtime.generation.GenerationBackend` — a language model that streams
  tokens: ``gguf`` (llama.cpp), ``transformers`` (a Hugging Face model directory; Mixtral's
  experts on Tandem's kernels), ``openai`` (any OpenAI-compatible server).

Modules are imported when their format is first opened, so the edge does not import torch or
llama.cpp unless its policy names them.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from tandem.runtime.errors import ConfigError
from tandem.runtime.generation import GenerationBackend, LocalGenerationBackend
from tandem.runtime.manifest import TensorSpec

__all__ = [
    "BACKENDS",
    "GENERATION_FORMATS",
    "ExpertsBackend",
    "GenerationBackend",
    "LocalGenerationBackend",
    "ModelBackend",
    "backend_class",
    "open_backend",
]


@runtime_checkable
class ModelBackend(Protocol):
    """A loaded model: one batch in, one batch out."""

    name: str
    version: str
    input_spec: TensorSpec
    output_spec: TensorSpec

    def check_batch(self, batch: np.ndarray) -> np.ndarray:
        """``batch`` converted to the input dtype; :class:`BadRequest` if it cannot fit."""
        ...

    def warm_up(self) -> None:
        """Do whatever the first call would do lazily, before the first request."""
        ...

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Run the model on a batch shaped ``(N, *input_spec.shape[1:])``: ``check_batch``
        then ``run``."""
        ...

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run the model on a batch that ``check_batch`` returned (no second check: the
        worker checks each request on arrival and runs their concatenation)."""
        ...


@runtime_checkable
class ExpertsBackend(ModelBackend, Protocol):
    """A :class:`ModelBackend` whose experts a worker serves one by one to a sharded MoE
    (``tandem-moe``): callers ask ``isinstance(backend, ExpertsBackend)``."""

    hosted: list[int]  # the experts this process holds

    @property
    def n_experts(self) -> int: ...

    @property
    def hidden(self) -> int: ...

    def run_experts(self, experts: list[int], counts: list[int], rows: np.ndarray) -> np.ndarray:
        """``rows`` (sum(counts), hidden) hold ``counts[i]`` rows for ``experts[i]``, in order;
        each row through its expert, same order. :class:`BadRequest` for an expert not hosted."""
        ...


# format → "module:class"; each class takes (path, *, name=, version=, threads=, **options).
BACKENDS: dict[str, str] = {
    "onnx": "tandem.runtime.backends.onnx:OnnxBackend",
    "tandem-moe": "tandem.runtime.backends.moe_classifier:MoEBackend",
    "gguf": "tandem.runtime.backends.llamacpp:LlamaCppBackend",
    "transformers": "tandem.runtime.backends.transformers_lm:TransformersBackend",
    "openai": "tandem.runtime.backends.openai_http:OpenAIBackend",
}
GENERATION_FORMATS = frozenset({"gguf", "transformers", "openai"})


def backend_class(fmt: str) -> type:
    """The backend class registered for ``fmt``; :class:`ConfigError` naming the known ones."""
    target = BACKENDS.get(fmt)
    if target is None:
        raise ConfigError(f"unknown model format {fmt!r}; known: {', '.join(BACKENDS)}")
    module, _, cls = target.partition(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:
        extra = "llm" if fmt in GENERATION_FORMATS else "dev"
        raise ConfigError(
            f"model format {fmt!r} needs a package that is not installed ({e.name}): "
            f'pip install -e ".[{extra}]"'
        ) from None


def open_backend(fmt: str, path: str | Path, **options: Any) -> Any:
    """Open the model at ``path`` (a file, a directory, or a URL for ``openai``) with the
    backend registered for ``fmt``."""
    return backend_class(fmt)(path, **options)
