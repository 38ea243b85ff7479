"""``tandem quantize``: make a model smaller for the device, and say what it cost.

* :func:`quantize_onnx` — int8 with ONNX Runtime: ``dynamic`` (weights int8, activations
  quantized on the fly; no data needed) or ``static`` (weights and activations int8, QDQ
  format, activation ranges calibrated on sample inputs).
* :func:`quantize_gguf` — a transformers Llama/Mixtral directory with a Tandem tokenizer to a
  GGUF file (``q8_0`` or ``f16``) for llama.cpp.

Each returns a :class:`QuantizeReport`: sizes before and after and, where held-out data is
given, the accuracy of both models on it (classifiers: top-1 against labels; language models:
exact-match answers on the reference sorting task, transformers before vs llama.cpp after).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tandem.runtime.errors import BadRequest, ConfigError


@dataclass(frozen=True, slots=True)
class QuantizeReport:
    source: str
    output: str
    method: str
    bytes_before: int
    bytes_after: int
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    eval_items: int = 0

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else float("nan")

    def to_json(self) -> dict:
        return asdict(self)


def size_of(path: Path) -> int:
    """Bytes of a file, or of every file under a directory."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _classifier_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    from tandem.runtime.backends.onnx import OnnxBackend

    logits = OnnxBackend(path, threads=0).predict(x)
    if logits.ndim != 2 or len(logits) != len(y):
        raise BadRequest(f"{path}: output shape {logits.shape} does not match {len(y)} labels")
    return float((logits.argmax(axis=1) == y).mean())


class _Rows:
    """ONNX Runtime's CalibrationDataReader over an array, one batch of rows at a time."""

    def __init__(self, name: str, x: np.ndarray, batch: int = 64) -> None:
        self._batches = iter([{name: x[i : i + batch]} for i in range(0, len(x), batch)])

    def get_next(self) -> dict | None:
        return next(self._batches, None)


def quantize_onnx(
    src: str | Path,
    dst: str | Path,
    *,
    method: str = "dynamic",
    calibration: np.ndarray | None = None,
    eval_data: tuple[np.ndarray, np.ndarray] | None = None,
) -> QuantizeReport:
    """Quantize an ONNX model to int8. ``static`` needs ``calibration`` rows shaped like the
    model's input (a few hundred representative inputs); ``eval_data`` = (x, labels)."""
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ConfigError(f"{src}: no such ONNX file")
    if method not in ("dynamic", "static"):
        raise ConfigError(f"method: expected 'dynamic' or 'static', got {method!r}")
    if method == "static" and (calibration is None or len(calibration) == 0):
        raise ConfigError("static quantization needs calibration inputs (--calibration)")
    root = logging.getLogger()
    quiet = logging.Filter("tandem")  # drops onnxruntime's advice logged on the root logger
    root.addFilter(quiet)
    try:
        if method == "dynamic":
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        else:
            assert calibration is not None
            inp = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).get_inputs()
            quantize_static(
                str(src),
                str(dst),
                _Rows(inp[0].name, np.ascontiguousarray(calibration, dtype=np.float32)),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"{src}: ONNX Runtime could not quantize it: {e}") from None
    finally:
        root.removeFilter(quiet)
    before = after = None
    if eval_data is not None:
        x, y = eval_data
        before, after = _classifier_accuracy(src, x, y), _classifier_accuracy(dst, x, y)
    return QuantizeReport(
        str(src),
        str(dst),
        f"int8-{method}",
        size_of(src),
        size_of(dst),
        before,
        after,
        0 if eval_data is None else len(eval_data[1]),
    )


def quantize_gguf(
    hf_dir: str | Path,
    dst: str | Path,
    *,
    qtype: str = "q8_0",
    eval_items: int = 0,
    score: Callable[[str, Path, int], float] | None = None,
    progress: Callable[[str], None] | None = None,
) -> QuantizeReport:
    """Export ``hf_dir`` to GGUF (``q8_0`` or ``f16``). With ``eval_items`` > 0 and a ``score``
    (``score(format, path, n)``: an accuracy on ``n`` held-out items, such as
    :func:`tandem.reference.lm_task.sorting_accuracy`), the accuracy per model: transformers on
    ``hf_dir`` before, llama.cpp on the GGUF after."""
    from tandem.runtime.gguf import export_gguf

    hf_dir, dst = Path(hf_dir), Path(dst)
    if qtype not in ("q8_0", "f16"):
        raise ConfigError(f"qtype: expected 'q8_0' or 'f16', got {qtype!r}")
    if not (hf_dir / "config.json").is_file():
        raise ConfigError(f"{hf_dir}: not a transformers model directory (no config.json)")
    say = progress or (lambda _m: None)
    say(f"exporting {hf_dir} to {qtype}")
    with tempfile.TemporaryDirectory(dir=dst.parent if dst.parent.exists() else None) as tmp:
        tmp_out = Path(tmp) / dst.name
        export_gguf(hf_dir, tmp_out, qtype=qtype)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(tmp_out, dst)
    before = after = None
    if eval_items > 0 and score is not None:
        say(f"scoring both models on {eval_items} held-out items")
        before = score("transformers", hf_dir, eval_items)
        after = score("gguf", dst, eval_items)
    return QuantizeReport(
        str(hf_dir), str(dst), qtype, size_of(hf_dir), size_of(dst), before, after, eval_items
    )
