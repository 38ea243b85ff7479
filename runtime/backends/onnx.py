"""ONNX models in ONNX Runtime (format ``onnx``): the edge's classifiers and dense cloud
models."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tandem.kernels.confidence import all_finite
from tandem.runtime.errors import BackendError, BadRequest
from tandem.runtime.manifest import TensorSpec, sha256_file

_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
}


class OnnxBackend:
    """An ONNX model in an ONNX Runtime session (CPU execution provider).

    ``threads`` sets ONNX Runtime's intra-op threads: 1 suits a small edge model (thread hand-off
    costs more than it saves), 0 lets ONNX Runtime use every core (cloud batches).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        name: str | None = None,
        version: str | None = None,
        threads: int = 1,
    ) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.name = name or self.path.stem
        try:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 3
            self.session = ort.InferenceSession(
                str(self.path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as e:
            raise BackendError(f"cannot load ONNX model {self.path}: {e}") from None
        self.version = version or sha256_file(self.path)[:12]
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self.input_spec = _spec(inp)
        self.output_spec = _spec(out)
        self._input_name = inp.name
        self._output_names = [out.name]
        try:
            self._dtype = np.dtype(self.input_spec.dtype)
        except TypeError:
            raise BackendError(
                f"ONNX model {self.path}: input {inp.name!r} has type {inp.type}; Tandem serves "
                f"numeric inputs ({', '.join(sorted(set(_ORT_DTYPES.values())))})"
            ) from None
        self._row_shape = tuple(self.input_spec.shape[1:])
        self._fixed_row_shape = None if None in self._row_shape else self._row_shape
        self._floating = self._dtype.kind == "f"
        # The bound C++ session where there is one: the same call as InferenceSession.run
        # without its Python-side re-validation, which check_batch() already did.
        self._run = getattr(self.session, "_sess", self.session).run

    def check_batch(self, batch: np.ndarray) -> np.ndarray:
        """``batch`` as the model's dtype, or :class:`BadRequest` if its shape cannot fit or
        it holds NaN/inf (an int8 model turns those into finite, confident-looking logits)."""
        if not (batch.dtype == self._dtype and batch.shape[1:] == self._fixed_row_shape):
            batch = self._coerce(batch)
        if self._floating and not all_finite(batch):
            bad = np.flatnonzero(~np.isfinite(batch.reshape(len(batch), -1)).all(axis=1))
            raise BadRequest(f"model {self.name!r}: input rows {bad.tolist()[:10]} hold NaN or inf")
        return batch

    def _coerce(self, batch: np.ndarray) -> np.ndarray:
        if batch.ndim != len(self._row_shape) + 1 or any(
            want is not None and got != want
            for got, want in zip(batch.shape[1:], self._row_shape, strict=True)
        ):
            raise BadRequest(
                f"model {self.name!r} takes input shaped "
                f"(N, {', '.join(map(_dim, self._row_shape))}), got {batch.shape}"
            )
        if batch.dtype != self._dtype:
            if batch.dtype.kind not in "fiub":
                raise BadRequest(f"model {self.name!r} takes {self._dtype}, got {batch.dtype}")
            batch = batch.astype(self._dtype)
        return batch

    def warm_up(self) -> None:
        """Run one all-zeros row, so the first real request does not pay for ONNX Runtime's
        lazy allocations and thread-pool start (tens of ms for a CNN on a cold worker)."""
        shape = (1, *(d or 1 for d in self._row_shape))
        self.predict(np.zeros(shape, self._dtype))

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.run(self.check_batch(batch))

    def run(self, batch: np.ndarray) -> np.ndarray:
        try:
            return self._run(self._output_names, {self._input_name: batch}, None)[0]
        except Exception as e:
            raise BackendError(f"model {self.name!r} failed: {e}") from None


def _dim(d: int | None) -> str:
    return "?" if d is None else str(d)


def _spec(node) -> TensorSpec:  # onnxruntime NodeArg
    shape = [d if isinstance(d, int) else None for d in node.shape]
    return TensorSpec(name=node.name, dtype=_ORT_DTYPES.get(node.type, node.type), shape=shape)
