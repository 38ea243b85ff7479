"""Registering a user's ONNX model in a models directory (``tandem models add``).

:func:`add_onnx_model` loads the model with ONNX Runtime (which proves it loads and runs, and
gives its input/output spec), copies it into the directory unless it is already there, and
writes its manifest entry (name, version, sha256, size, spec, labels), so that a worker
pointed at the directory serves it. :func:`class_count` is how the class count is learnt,
here and by the edge runtime, when a model leaves its class axis dynamic.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tandem.runtime.backends import ModelBackend
from tandem.runtime.backends.onnx import OnnxBackend
from tandem.runtime.config import validate_config
from tandem.runtime.errors import BackendError, ConfigError
from tandem.runtime.manifest import (
    MANIFEST_NAME,
    Manifest,
    ModelEntry,
    load_manifest,
    sha256_file,
    write_manifest,
)


def class_count(backend: ModelBackend) -> int | None:
    """The size of the class axis (the last axis of the first output), or None when the
    output has no such axis (fewer than 2 dimensions).

    Read from the output spec when the axis is fixed; when it is dynamic (``[N, ?]``), learnt
    from the model's answer to one all-zeros row (dynamic input axes set to 1, as
    :meth:`~tandem.runtime.backends.onnx.OnnxBackend.warm_up` does).
    """
    shape = backend.output_spec.shape
    if len(shape) >= 2 and shape[-1] is not None:
        return shape[-1]
    row = tuple(d or 1 for d in backend.input_spec.shape[1:])
    out = backend.predict(np.zeros((1, *row), np.dtype(backend.input_spec.dtype)))
    return int(out.shape[-1]) if out.ndim >= 2 else None


def read_labels_file(path: str | Path) -> list[str]:
    """One label per line, in output order (a trailing newline is fine, a blank line is not)."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read labels: {getattr(e, 'strerror', None) or e}") from None
    blank = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if blank:
        raise ConfigError(f"{p}: line {blank[0]} is blank; write one label per line")
    return [line.strip() for line in lines]


@dataclass(frozen=True)
class AddedModel:
    """What :func:`add_onnx_model` did."""

    entry: ModelEntry
    manifest_path: Path
    copied_from: Path | None  # None: the file was already in the models directory
    replaced: bool  # an entry of the same name was replaced
    n_classes: int | None


def add_onnx_model(
    models_dir: str | Path,
    model: str | Path,
    *,
    name: str,
    labels: Sequence[str] | None = None,
    version: str | None = None,
    description: str = "",
    replace: bool = False,
) -> AddedModel:
    """Register the ONNX file ``model`` as ``name`` in ``models_dir`` (created if missing).

    The file is copied into ``models_dir`` under its own name unless it already lies inside
    it; an existing different file of that name is an error, unless ``replace`` is set and
    the file belongs to the entry being replaced alone. ``version`` defaults to the first 12
    hex digits of the sha256 (as :class:`~tandem.runtime.backends.onnx.OnnxBackend` does).
    ``labels``, if given, must match the class count (see :func:`class_count`).

    Everything is checked before anything is written. Raises :class:`ConfigError` (bad
    arguments, name taken, label mismatch) or :class:`BackendError` (ONNX Runtime cannot
    load or run the file).
    """
    src = Path(model)
    root = Path(models_dir)
    manifest_path = root / MANIFEST_NAME
    if not src.is_file():
        raise ConfigError(f"{src}: no such file")
    backend = _load(src, name)
    n_classes = _check_labels(src, backend, labels)
    manifest = load_manifest(root) if manifest_path.exists() else Manifest(models=[])
    old = next((i for i, m in enumerate(manifest.models) if m.name == name), None)
    if old is not None and not replace:
        raise ConfigError(
            f"{manifest_path}: models.{old}.name: a model named {name!r} is already registered "
            f"(version {manifest.models[old].version}); replace it with --replace (replace=True)"
        )
    digest = sha256_file(src)
    file, copy_to = _place(src, root.resolve(), digest, manifest, old)
    entry = validate_config(
        {
            "name": name,
            "version": version if version is not None else digest[:12],
            "file": file,
            "sha256": digest,
            "size_bytes": src.stat().st_size,
            "input": backend.input_spec.model_dump(),
            "output": backend.output_spec.model_dump(),
            "labels": list(labels) if labels else None,
            "description": description,
        },
        ModelEntry,
        source=f"{manifest_path}: model {name!r}",
    )
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"{root}: cannot create the models directory: {e.strerror or e}"
        ) from None
    if copy_to is not None:
        _copy(src, copy_to)
    models = list(manifest.models)
    if old is None:
        models.append(entry)
    else:
        models[old] = entry
    write_manifest(root, manifest.model_copy(update={"models": models}))
    return AddedModel(
        entry=entry,
        manifest_path=manifest_path,
        copied_from=src if copy_to is not None else None,
        replaced=old is not None,
        n_classes=n_classes,
    )


def _load(src: Path, name: str) -> OnnxBackend:
    """The model in an ONNX Runtime session, run once as a worker's warm-up runs it."""
    try:
        backend = OnnxBackend(src, name=name, threads=1)
    except TypeError:  # an input dtype numpy has no name for (string, bool...)
        raise ConfigError(
            f"{src}: input type not supported; Tandem serves numeric inputs"
        ) from None
    inputs = backend.session.get_inputs()
    if len(inputs) != 1:
        raise ConfigError(
            f"{src}: the model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
            "Tandem serves models with one input"
        )
    if backend.input_spec.shape[:1] != [None]:
        raise ConfigError(
            f"{src}: input {backend.input_spec.name!r} has shape {backend.input_spec.shape}; "
            "its first (batch) axis must be dynamic so that a worker can batch requests "
            "(torch.onnx.export(..., dynamic_axes={'x': {0: 'N'}}))"
        )
    try:
        backend.warm_up()
    except BackendError as e:
        raise BackendError(f"{src}: loads but fails on an all-zeros row: {e.message}") from None
    return backend


def _check_labels(src: Path, backend: OnnxBackend, labels: Sequence[str] | None) -> int | None:
    n_classes = class_count(backend)
    if not labels:
        return n_classes
    if any(not label.strip() for label in labels):
        raise ConfigError(f"labels: a label is empty, got {list(labels)!r}")
    dup = [label for label, n in Counter(labels).items() if n > 1]
    if dup:
        raise ConfigError(f"labels: {dup[0]!r} appears more than once")
    if n_classes is None:
        raise ConfigError(
            f"{src}: {len(labels)} labels given, but output {backend.output_spec.name!r} "
            f"(shape {backend.output_spec.shape}) has no class axis"
        )
    if len(labels) != n_classes:
        shape = backend.output_spec.shape
        counted = "" if len(shape) >= 2 and shape[-1] is not None else " on an all-zeros row"
        raise ConfigError(
            f"{src}: {len(labels)} labels given, but output {backend.output_spec.name!r} "
            f"has {n_classes} classes{counted}"
        )
    return n_classes


def _place(
    src: Path, root: Path, digest: str, manifest: Manifest, replacing: int | None
) -> tuple[str, Path | None]:
    """The entry's ``file`` for ``src``, and where to copy it (None: no copy needed)."""
    real = src.resolve()
    if real.is_relative_to(root):
        return real.relative_to(root).as_posix(), None
    dest = root / src.name
    if not (dest.exists() or dest.is_symlink()):
        return src.name, dest
    if dest.is_file() and not dest.is_symlink() and sha256_file(dest) == digest:
        return src.name, None  # the same bytes are already there
    users = [i for i, m in enumerate(manifest.models) if m.file == src.name]
    if replacing is None or users != [replacing] or dest.is_symlink() or not dest.is_file():
        raise ConfigError(
            f"{dest} already exists and differs from {src}; rename one of them "
            "(the file is copied into the models directory under its own name)"
        )
    return src.name, dest  # the file of the entry being replaced, used by no other


def _copy(src: Path, dest: Path) -> None:
    """Copy through a temporary file in the same folder, so ``dest`` is never half-written."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copy(src, tmp)  # content and permission bits (mkstemp made it 0600)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
