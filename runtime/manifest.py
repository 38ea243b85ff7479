"""The models directory: ONNX files plus ``manifest.json`` describing each of them.

A cloud worker loads every model its manifest lists (or the subset its config names) and checks
each file's sha256 before serving it, so a model's identity is ``name@version`` plus a digest.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import Field

from tandem.runtime.config import StrictModel, load_config
from tandem.runtime.errors import ConfigError

MANIFEST_NAME = "manifest.json"


class TensorSpec(StrictModel):
    name: str
    dtype: str = "float32"
    shape: list[int | None]  # None = dynamic (the batch axis)


class ModelEntry(StrictModel):
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    file: str  # relative to the models directory
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(ge=0)
    input: TensorSpec
    output: TensorSpec
    format: str = "onnx"  # which backend serves the file: "onnx" or "tandem-moe"
    quantization: str = "none"  # "none" (fp32) or e.g. "int8-dynamic"
    labels: list[str] | None = None
    metrics: dict[str, float] = Field(default_factory=dict)  # e.g. test accuracy
    description: str = ""


class Manifest(StrictModel):
    models: list[ModelEntry]
    workload: str = ""
    seed: int | None = None

    def get(self, name: str) -> ModelEntry:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(models_dir: str | Path) -> Manifest:
    path = Path(models_dir) / MANIFEST_NAME
    if not path.exists():
        raise ConfigError(
            f"{path}: no manifest; build the reference models with `tandem models build`"
        )
    return load_config(path, Manifest)


def verify_entry(models_dir: str | Path, entry: ModelEntry) -> Path:
    """Path of ``entry``'s file after checking it exists and its sha256 matches."""
    path = Path(models_dir) / entry.file
    if not path.is_file():
        raise ConfigError(
            f"{Path(models_dir) / MANIFEST_NAME}: model {entry.name!r}: {path} missing"
        )
    digest = sha256_file(path)
    if digest != entry.sha256:
        raise ConfigError(
            f"{Path(models_dir) / MANIFEST_NAME}: model {entry.name!r}: sha256 of {path} is "
            f"{digest}, manifest says {entry.sha256}"
        )
    return path


def write_manifest(models_dir: str | Path, manifest: Manifest) -> Path:
    path = Path(models_dir) / MANIFEST_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    tmp.replace(path)
    return path
