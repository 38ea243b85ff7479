"""The models directory: model files plus ``manifest.json`` describing each of them.

A cloud worker loads every model its manifest lists (or the subset its config names) and checks
each file's sha256 before serving it, so a model's identity is ``name@version`` plus a digest.
An entry's ``file`` may name a directory (a Hugging Face model, format ``transformers``): its
digest is :func:`sha256_file` of the directory.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path, PurePosixPath

from pydantic import Field, field_validator, model_validator

from tandem.runtime.config import StrictModel, load_config
from tandem.runtime.errors import ConfigError

MANIFEST_NAME = "manifest.json"
_INSIDE = "must be a path inside the models directory"
_DRIVE = re.compile(r"^[A-Za-z]:")


class TensorSpec(StrictModel):
    name: str
    dtype: str = "float32"
    shape: list[int | None]  # None = dynamic (the batch axis)


class ModelEntry(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")  # no paths, spaces or @
    version: str = Field(min_length=1)
    file: str  # relative to the models directory, and inside it
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(ge=0)
    # array models (onnx, tandem-moe) have an input and an output; language models do not
    input: TensorSpec | None = None
    output: TensorSpec | None = None
    # which backend serves it (tandem.runtime.backends.BACKENDS): "onnx", "tandem-moe", "gguf",
    # "transformers" (``file`` is then a directory)
    format: str = "onnx"
    quantization: str = "none"  # "none" (fp32) or e.g. "int8-dynamic"
    labels: list[str] | None = None
    metrics: dict[str, float] = Field(default_factory=dict)  # e.g. test accuracy
    description: str = ""

    @field_validator("file")
    @classmethod
    def _relative_inside(cls, v: str) -> str:
        """Refuse what could name a file outside the models directory without looking at the
        disk (absolute, ``..``, empty); :func:`verify_entry` checks where symlinks lead."""
        path = PurePosixPath(v.strip().replace("\\", "/"))  # "" and "." have no parts
        if not path.parts or path.is_absolute() or ".." in path.parts or _DRIVE.match(v):
            raise ValueError(_INSIDE)
        return v


class Manifest(StrictModel):
    models: list[ModelEntry]
    workload: str = ""
    seed: int | None = None

    @model_validator(mode="after")
    def _names_unique(self) -> Manifest:
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"model names must be unique; listed more than once: {dup}")
        return self

    def get(self, name: str) -> ModelEntry:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)


def sha256_file(path: str | Path) -> str:
    """The file's sha256; for a directory (a transformers model), the sha256 over its regular
    files in sorted order, each as (path length, relative path, size, contents), so no two
    different trees hash alike. A symlink in a model directory is refused: it could point
    anywhere."""
    h = hashlib.sha256()
    root = Path(path)
    if not root.is_dir():
        _hash_into(h, root)
        return h.hexdigest()
    for file in sorted(root.rglob("*")):
        if file.is_symlink():
            raise ConfigError(f"{file}: a model directory may not hold symlinks")
        if file.is_file():
            rel = file.relative_to(root).as_posix().encode()
            h.update(len(rel).to_bytes(8, "little") + rel)
            h.update(file.stat().st_size.to_bytes(8, "little"))
            _hash_into(h, file)
    return h.hexdigest()


def _hash_into(h, file: Path) -> None:
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def load_manifest(models_dir: str | Path) -> Manifest:
    path = Path(models_dir) / MANIFEST_NAME
    if not path.exists():
        raise ConfigError(
            f"{path}: no manifest; build the reference models with `tandem models build`"
        )
    return load_config(path, Manifest)


def verify_entry(models_dir: str | Path, entry: ModelEntry) -> Path:
    """Path of ``entry``'s file or directory (symlinks resolved) after checking it lies inside
    ``models_dir``, exists and its sha256 (:func:`sha256_file`) matches."""
    root = Path(models_dir).resolve()
    path = (root / entry.file).resolve()
    if path == root or not path.is_relative_to(root):
        raise ConfigError(
            f"{Path(models_dir) / MANIFEST_NAME}: {_entry_key(models_dir, entry)}.file: "
            f"{_INSIDE}, got {entry.file!r} (model {entry.name!r}; it resolves to {path})"
        )
    if not (path.is_file() or (path.is_dir() and entry.format == "transformers")):
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


def _entry_key(models_dir: str | Path, entry: ModelEntry) -> str:
    """``models.N`` for ``entry`` in the manifest on disk, for an error message."""
    try:
        names = [m.name for m in load_manifest(models_dir).models]
        return f"models.{names.index(entry.name)}"
    except (ConfigError, ValueError):
        return f"model {entry.name!r}"


def write_manifest(models_dir: str | Path, manifest: Manifest) -> Path:
    path = Path(models_dir) / MANIFEST_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    tmp.replace(path)
    return path
