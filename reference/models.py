"""Train, export and quantize the reference models for the corrupted-digits workload.

* ``digits-edge``: a 64→32→10 MLP, exported to ONNX and quantized to int8 with
  ``onnxruntime.quantization.quantize_dynamic`` (the file the edge runs). Its fp32 export is
  kept beside it (``digits-edge-fp32``) so sizes and accuracy can be compared.
* ``digits-cloud``: a small CNN (three 3×3 convolutions), ONNX fp32: the model the cloud serves.
* ``digits-moe`` (``--moe``): an MoE classifier (a SwiGLU MoE layer, 8 experts, top-2) served by
  the worker on Tandem's MoE kernels (format ``tandem-moe``, an ``.npz`` of weights).

Deterministic for a seed (training always runs on 2 torch threads), about
20 seconds on 2 cores, and no downloads. ``manifest.json`` records name, version, sha256, input
spec, test accuracy and size of each file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tandem.reference.digits import N_CLASSES, DigitsWorkload, load_workload
from tandem.runtime.backends.onnx import OnnxBackend
from tandem.runtime.manifest import (
    Manifest,
    ModelEntry,
    TensorSpec,
    load_manifest,
    manifest_lock,
    sha256_file,
    write_manifest,
)

log = logging.getLogger(__name__)

EDGE = "digits-edge"
EDGE_FP32 = "digits-edge-fp32"
CLOUD = "digits-cloud"
MOE = "digits-moe"
LABELS = [str(i) for i in range(N_CLASSES)]
RECIPE_VERSION = "1"  # bump when the workload or a model recipe changes: invalidates caches

Progress = Callable[[str], None]


def default_models_dir() -> Path:
    """``$TANDEM_CACHE_DIR/models`` if set, else the user cache dir (e.g. ~/.cache/tandem)."""
    env = os.environ.get("TANDEM_CACHE_DIR")
    if env:
        base = Path(env)
    else:
        import platformdirs

        base = Path(platformdirs.user_cache_dir("tandem"))
    return base / f"models-v{RECIPE_VERSION}"


def _mlp():
    from torch import nn

    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, N_CLASSES))


def _cnn():
    from torch import nn

    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(256, 128),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(128, N_CLASSES),
    )


def _moe():
    from tandem.runtime.moe import MoEClassifier

    return MoEClassifier(64, 128, 256, n_experts=8, k=2, n_classes=N_CLASSES)


def train(make_model: Callable, data: DigitsWorkload, *, epochs: int, seed: int, lr: float = 3e-3):
    """Build ``make_model()`` under ``seed`` and train it with AdamW and a one-cycle schedule
    over the corrupted training split."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = make_model()
    x, y = torch.from_numpy(data.train.x), torch.from_numpy(data.train.y)
    bs = 128
    steps = epochs * ((len(x) + bs - 1) // bs)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), bs):
            b = perm[i : i + bs]
            loss = nn.functional.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def export_onnx(model, path: Path) -> None:
    """Export with torch's TorchScript-based exporter (``dynamo=False``): no onnxscript
    dependency and byte-stable output for these small graphs."""
    import torch

    dummy = torch.zeros(1, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )


def quantize_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    quiet = logging.Filter("tandem")  # drops onnxruntime's advice logged on the root logger
    root.addFilter(quiet)
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    finally:
        root.removeFilter(quiet)


def manifest_entry(
    models_dir: Path,
    name: str,
    file: str,
    *,
    version_prefix: str,
    fmt: str = "onnx",
    quantization: str = "none",
    metrics: dict[str, float] | None = None,
    description: str = "",
) -> ModelEntry:
    """A manifest entry for a (None, 64) → (None, 10) digits model already in ``models_dir``;
    its version is ``{version_prefix}-{first 8 hex digits of sha256}``."""
    path = models_dir / file
    digest = sha256_file(path)
    return ModelEntry(
        name=name,
        version=f"{version_prefix}-{digest[:8]}",
        file=file,
        sha256=digest,
        size_bytes=path.stat().st_size,
        input=TensorSpec(name="x", shape=[None, 64]),
        output=TensorSpec(name="logits", shape=[None, N_CLASSES]),
        format=fmt,
        quantization=quantization,
        labels=LABELS,
        metrics=metrics or {},
        description=description,
    )


def accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    if path.suffix == ".npz":
        from tandem.runtime.backends.moe_classifier import MoEBackend

        logits = MoEBackend(path).predict(x)
    else:
        logits = OnnxBackend(path, threads=0).predict(x)
    return float((logits.argmax(axis=1) == y).mean())


def build_reference_models(
    out_dir: str | Path | None = None,
    *,
    seed: int = 0,
    force: bool = False,
    moe: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Build (or reuse, if already built with this recipe) the reference models into
    ``out_dir``, plus the MoE classifier if ``moe``; return the directory."""
    out = Path(out_dir) if out_dir else default_models_dir()
    say = progress or log.info
    if not force and is_built(out, seed):
        say(f"models already built in {out}")
    else:
        _build_base(out, seed, say)
    if moe and (force or not _has(out, MOE)):
        _build_moe(out, seed, say)
    return out


def _has(models_dir: Path, name: str) -> bool:
    try:
        entry = load_manifest(models_dir).get(name)
    except Exception:
        return False
    path = models_dir / entry.file
    return path.is_file() and sha256_file(path) == entry.sha256


@contextlib.contextmanager
def _two_torch_threads() -> Iterator[None]:
    """Training runs on 2 torch threads: results are reproducible for a fixed thread count."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _build_moe(out: Path, seed: int, say: Progress) -> None:
    with _two_torch_threads():
        data = load_workload(seed)
        say(f"training the MoE classifier (8 experts, top-2) on {len(data.train)} images")
        model = train(_moe, data, epochs=20, seed=seed)
        file = "moe.npz"
        model.save(out / file)
        entry = manifest_entry(
            out,
            MOE,
            file,
            version_prefix=f"{RECIPE_VERSION}.{seed}",
            fmt="tandem-moe",
            metrics={"test_accuracy": accuracy(out / file, data.test.x, data.test.y)},
            description="MoE classifier, 8 SwiGLU experts, top-2",
        )
    with manifest_lock(out):  # read, change, write: as tandem models add does
        manifest = load_manifest(out)
        models = [m for m in manifest.models if m.name != MOE] + [entry]
        write_manifest(out, manifest.model_copy(update={"models": models}))
    say(f"{MOE}: test accuracy {entry.metrics['test_accuracy']:.3f}, {entry.size_bytes} bytes")


def _build_base(out: Path, seed: int, say: Progress) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with _two_torch_threads():
        say("generating corrupted digits (train/calib/test)")
        data = load_workload(seed)
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            tmpd = Path(tmp)
            say(f"training edge MLP on {len(data.train)} images")
            export_onnx(train(_mlp, data, epochs=30, seed=seed), tmpd / "edge-fp32.onnx")
            say("quantizing edge model to int8")
            quantize_int8(tmpd / "edge-fp32.onnx", tmpd / "edge-int8.onnx")
            say("training cloud CNN (the slow step, ~15 s)")
            export_onnx(train(_cnn, data, epochs=15, seed=seed), tmpd / "cloud-fp32.onnx")
            entries = []
            for name, file, quant, desc in (
                (EDGE, "edge-int8.onnx", "int8-dynamic", "64-32-10 MLP, int8 weights"),
                (EDGE_FP32, "edge-fp32.onnx", "none", "64-32-10 MLP, fp32 (size reference)"),
                (CLOUD, "cloud-fp32.onnx", "none", "3-conv CNN, fp32"),
            ):
                final = out / file
                (tmpd / file).replace(final)
                entries.append(
                    manifest_entry(
                        out,
                        name,
                        file,
                        version_prefix=f"{RECIPE_VERSION}.{seed}",
                        quantization=quant,
                        metrics={"test_accuracy": accuracy(final, data.test.x, data.test.y)},
                        description=desc,
                    )
                )
        write_manifest(out, Manifest(models=entries, workload="corrupted-digits", seed=seed))
    for e in entries:
        say(f"{e.name}: test accuracy {e.metrics['test_accuracy']:.3f}, {e.size_bytes} bytes")


def is_built(models_dir: Path, seed: int = 0) -> bool:
    """True if ``models_dir`` holds intact reference models built with this recipe and seed."""
    try:
        m = load_manifest(models_dir)
        entries = [m.get(n) for n in (EDGE, EDGE_FP32, CLOUD)]
    except Exception:
        return False
    return m.seed == seed and all(
        (models_dir / e.file).is_file()
        and e.version.startswith(f"{RECIPE_VERSION}.{seed}-")
        and sha256_file(models_dir / e.file) == e.sha256
        for e in entries
    )


def cloud_logits(
    client: Any, model: str, x: np.ndarray, chunk: int = 512, timeout_s: float = 30.0
) -> np.ndarray:
    """``model``'s outputs for every row of ``x``, ``chunk`` rows a request."""
    parts = [
        client.infer(model, x[i : i + chunk], timeout_s=timeout_s)["outputs"]
        for i in range(0, len(x), chunk)
    ]
    return np.concatenate(parts)
