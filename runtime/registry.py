"""Registering a user's model in a models directory (``tandem models add``): an ONNX file, a
GGUF file (llama.cpp), a transformers model directory, or an OpenAI-compatible server.

:func:`add_model` finds the kind from the source (a file's first bytes, a directory's
``config.json``, a URL), proves the model works the way a worker will use it (ONNX: loads and
answers an all-zeros row; a language model: loads through
:func:`~tandem.runtime.backends.open_backend`, warms up and streams a token), copies a file or
directory into the models directory unless it is already there, and writes its manifest entry
(name, version, sha256 or URL, size, spec, labels), so that a worker pointed at the directory
serves it. Nothing is written unless every check passes, and the manifest is read, checked and
written under :func:`~tandem.runtime.manifest.manifest_lock`, so concurrent adders never lose
each other's entries. :func:`class_count` is how the class count is learnt, here and by the
edge runtime, when a model leaves its class axis dynamic.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tandem.runtime.backends import ModelBackend, open_backend
from tandem.runtime.backends.onnx import OnnxBackend
from tandem.runtime.config import validate_config
from tandem.runtime.errors import BackendError, BadRequest, ConfigError, TandemError
from tandem.runtime.generation import SamplingParams
from tandem.runtime.manifest import (
    MANIFEST_NAME,
    OPENAI,
    Manifest,
    ModelEntry,
    api_key_from_env,
    is_env_var_name,
    load_manifest,
    manifest_lock,
    sha256_file,
    write_manifest,
)
from tandem.runtime.model_files import copy_checked, head_bytes, place, size_of

log = logging.getLogger(__name__)

KINDS = ("onnx", "gguf", "transformers", OPENAI)
"""What :func:`add_model` registers (``--format``)."""
EXPECTED = (
    "expected an ONNX file (.onnx), a GGUF file (starting with b'GGUF'), a transformers model "
    "directory (with config.json), or --url for an OpenAI-compatible server"
)
GGUF_MAGIC = b"GGUF"
# Prompts a language model is asked to continue by one token when it is added, the first it can
# tokenize (Tandem's reference models have lower-case character vocabularies).
PROBE_PROMPTS = ("Hello", "hello", "a", "0", " ")
CHECK_N_CTX = 512  # tokens of context for the check of a GGUF model (0 would be its trained one)


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
    """What :func:`add_model` did."""

    entry: ModelEntry
    manifest_path: Path
    copied_from: Path | None  # None: already in the models directory, or a server (openai)
    replaced: bool  # an entry of the same name was replaced
    n_classes: int | None  # ONNX classifiers; None for language models


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
    """Register the ONNX file ``model``: :func:`add_model` with ``format="onnx"``."""
    return add_model(
        models_dir,
        model,
        name=name,
        format="onnx",
        labels=labels,
        version=version,
        description=description,
        replace=replace,
    )


def add_model(
    models_dir: str | Path,
    source: str | Path | None = None,
    *,
    name: str,
    format: str | None = None,
    url: str | None = None,
    model: str | None = None,
    api_key_env: str | None = None,
    continue_final_message: bool = False,
    labels: Sequence[str] | None = None,
    version: str | None = None,
    description: str = "",
    replace: bool = False,
    timeout_s: float = 30.0,
) -> AddedModel:
    """Register a model as ``name`` in ``models_dir`` (created if missing).

    ``source`` is an ONNX file, a GGUF file or a transformers model directory (found by
    :func:`detect_format`); or, with ``url`` instead, an OpenAI-compatible server: ``model`` is
    the model id to ask it for (default: the first its ``/v1/models`` lists, resolved now and
    written down) and ``api_key_env`` the *name* of the environment variable holding its API
    key (never the key: a manifest is not a secret store; it must be set when the model is added).
    ``format`` forces the kind (one of :data:`KINDS`).

    A file or directory is copied into ``models_dir`` under its own name unless it already lies
    inside it; an existing different one of that name is an error, unless ``replace`` is set
    and it belongs to the entry being replaced alone. ``version`` defaults to the first 12 hex
    digits of the sha256 (the server's model id for ``openai``). ``labels`` (ONNX only), if
    given, must match the class count (see :func:`class_count`). ``timeout_s``: seconds to wait
    for a server (``openai``).

    Everything is checked before anything is written. Raises :class:`ConfigError` (bad
    arguments, a source of no known kind, name taken, label mismatch) or the backend's error
    (:class:`BackendError` and kin: the model does not load or generate, the server cannot be
    reached), which says why.
    """
    root = Path(models_dir)
    manifest_path = root / MANIFEST_NAME
    fmt = _kind(source, format, url, model, api_key_env)
    if labels and fmt != "onnx":
        raise ConfigError(f"labels are for ONNX classifiers; a {fmt} model has none")
    base = {"name": name, "format": fmt, "description": description}
    where = f"{manifest_path}: model {name!r}"
    if fmt == OPENAI:
        assert url is not None
        server = {
            "url": url,
            "model": model,
            "api_key_env": api_key_env,
            "continue_final_message": continue_final_message,
        }
        early = {**base, "version": "-" if version is None else version, **server}
        _entry(early, where)  # bad fields: fail now
        _check_name_free(root, name, replace)  # before asking the server; again when writing
        if api_key_env is not None and not os.environ.get(api_key_env):
            # not echoed: a key pasted in place of a variable's name must not reach a log
            raise ConfigError(
                "api_key_env (--api-key-env): the environment variable it names is not set "
                "here; export it first (the manifest records the variable's name, never the "
                "key), or leave --api-key-env out for a server that needs no key"
            )
        key = api_key_from_env(api_key_env, where=f"{where}: api_key_env")
        served = _check_server(url, name=name, version=version, model=model, key=key, t=timeout_s)
        version = served if version is None else version
        entry = _entry({**base, "version": version, **server, "model": served}, where)
        return _commit(root, entry, None, replace)
    src = Path(source)  # type: ignore[arg-type]
    # a source outside the models directory is copied in (symlinks followed: the HF cache)
    outside = not src.resolve().is_relative_to(root.resolve())
    digest = sha256_file(src, follow_symlinks=outside)
    version = digest[:12] if version is None else version
    fields: dict[str, Any] = {**base, "version": version, "sha256": digest}
    fields["size_bytes"] = size_of(src)
    _entry({**fields, "file": "model"}, where)  # bad fields: fail now
    n_classes = None
    if fmt == "onnx":
        backend = _load(src, name)
        n_classes = _check_labels(src, backend, labels)
        _check_name_free(root, name, replace)  # again when writing
        fields |= {
            "input": backend.input_spec.model_dump(),
            "output": backend.output_spec.model_dump(),
            "labels": list(labels) if labels else None,
        }
    else:
        _check_name_free(root, name, replace)  # before loading it; again when writing
        _check_language_model(fmt, src, name=name, version=version)
    return _commit(root, _entry({**fields, "file": "model"}, where), src, replace, n_classes)


def detect_format(source: str | Path) -> str:
    """The kind of model at ``source``: ``gguf`` (a file starting with ``GGUF``), ``onnx`` (a
    ``.onnx`` file, or one that starts as a serialised ONNX ModelProto does: field 1,
    ``ir_version``), ``transformers`` (a directory holding ``config.json``). Anything else is a
    :class:`ConfigError` saying what was expected."""
    src = Path(source)
    if src.is_dir():
        if not (src / "config.json").is_file():
            raise ConfigError(
                f"{src}: a directory is registered as a transformers model and needs the "
                f"config.json that save_pretrained writes; it has none ({EXPECTED})"
            )
        return "transformers"
    if not src.exists():
        raise ConfigError(f"{src}: no such file or directory")
    if not src.is_file():
        raise ConfigError(f"{src}: not a regular file or directory ({EXPECTED})")
    head = head_bytes(src)
    if head[:4] == GGUF_MAGIC:
        return "gguf"
    if src.suffix.lower() == ".gguf":
        raise ConfigError(f"{src}: not a GGUF file (starts with {head[:4]!r}, expected b'GGUF')")
    if src.suffix.lower() == ".onnx" or head[:1] == b"\x08":
        return "onnx"
    raise ConfigError(
        f"{src}: not a model file Tandem recognises (starts with {head[:4]!r}); {EXPECTED}, "
        "or --format to say which"
    )


def _kind(
    source: str | Path | None,
    fmt: str | None,
    url: str | None,
    model: str | None,
    api_key_env: str | None,
) -> str:
    """The format to register, from the arguments and the source; argument errors here."""
    if fmt is not None and fmt not in KINDS:
        raise ConfigError(f"format: expected one of {', '.join(KINDS)}, got {fmt!r}")
    if api_key_env is not None and not is_env_var_name(api_key_env):
        # not echoed: it may be the key itself
        raise ConfigError(
            "api_key_env (--api-key-env): expected the NAME of the environment variable that "
            "holds the API key (letters, digits and _, e.g. OPENAI_API_KEY), never the key "
            "itself; the value given is not a variable name (not shown)"
        )
    if url is not None:
        if source is not None:
            raise ConfigError("give a model file or directory, or --url for a server, not both")
        if fmt not in (None, OPENAI):
            raise ConfigError(f"--url registers format {OPENAI!r}, got --format {fmt}")
        return OPENAI
    if model is not None or api_key_env is not None:
        raise ConfigError("--model and --api-key-env go with --url (an OpenAI-compatible server)")
    if fmt == OPENAI:
        raise ConfigError(f"format {OPENAI!r} needs --url: the server's base URL")
    if source is None:
        raise ConfigError(f"nothing to register; {EXPECTED}")
    src = Path(source)
    if fmt is None:
        return detect_format(src)
    if not src.exists():
        raise ConfigError(f"{src}: no such file or directory")
    if fmt == "transformers":
        if not src.is_dir():
            raise ConfigError(
                f"{src}: format 'transformers' expects a model directory (with config.json), "
                "not a file"
            )
        return detect_format(src)  # the config.json check
    if not src.is_file():
        raise ConfigError(f"{src}: format {fmt!r} expects a file, not a directory")
    return fmt


def _entry(fields: dict[str, Any], where: str) -> ModelEntry:
    return validate_config(fields, ModelEntry, source=where)


def _check_name_free(root: Path, name: str, replace: bool) -> Manifest:
    """The manifest on disk (empty if none); :class:`ConfigError` if ``name`` is taken."""
    manifest_path = root / MANIFEST_NAME
    manifest = load_manifest(root) if manifest_path.exists() else Manifest(models=[])
    old = next((i for i, m in enumerate(manifest.models) if m.name == name), None)
    if old is not None and not replace:
        raise ConfigError(
            f"{manifest_path}: models.{old}.name: a model named {name!r} is already registered "
            f"(version {manifest.models[old].version}); replace it with --replace (replace=True)"
        )
    return manifest


def _commit(
    root: Path,
    entry: ModelEntry,
    src: Path | None,
    replace: bool,
    n_classes: int | None = None,
) -> AddedModel:
    """Under the manifest lock: read the manifest again, check the name again, place the file
    or directory, write the manifest. ``src`` None: a server, nothing to place."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"{root}: cannot create the models directory: {e.strerror or e}"
        ) from None
    with manifest_lock(root):
        manifest = _check_name_free(root, entry.name, replace)
        old = next((i for i, m in enumerate(manifest.models) if m.name == entry.name), None)
        copy_to = None
        if src is not None:
            assert entry.sha256 is not None
            file, copy_to = place(src, root.resolve(), entry.sha256, manifest, old)
            where = f"{root / MANIFEST_NAME}: model {entry.name!r}"
            entry = _entry({**entry.model_dump(), "file": file}, where)
            if copy_to is not None:
                copy_checked(src, copy_to, entry.sha256)
        models = list(manifest.models)
        if old is None:
            models.append(entry)
        else:
            models[old] = entry
        write_manifest(root, manifest.model_copy(update={"models": models}))
    return AddedModel(
        entry=entry,
        manifest_path=root / MANIFEST_NAME,
        copied_from=src if copy_to is not None else None,
        replaced=old is not None,
        n_classes=n_classes,
    )


def _check_language_model(fmt: str, path: Path, *, name: str, version: str) -> None:
    """Open ``path`` as a worker would, warm it up and stream one token; the backend's error,
    naming what failed, if any step does."""
    options: dict[str, Any] = {"name": name, "version": version, "threads": 1}
    if fmt == "gguf":
        options |= {"n_ctx": CHECK_N_CTX, "parallel": 1}
    backend = _open(fmt, path, options)
    try:
        _one_token(backend, path, fmt)
    finally:
        backend.close()


def _check_server(
    url: str, *, name: str, version: str | None, model: str | None, key: str | None, t: float
) -> str:
    """Ask the server at ``url`` for one token (its model id resolved if not given); the model
    id it serves."""
    options = {"name": name, "version": version, "model": model, "api_key": key, "timeout_s": t}
    backend = _open(OPENAI, url, options)
    try:
        _one_token(backend, url, OPENAI)
        return str(backend.model)
    finally:
        backend.close()


def _open(fmt: str, path: str | Path, options: dict[str, Any]) -> Any:
    try:
        return open_backend(fmt, path, **options)
    except TandemError:
        raise  # the backend's own message names the model and why
    except Exception as e:  # a library's error on a model it cannot read
        raise BackendError(f"{path}: cannot load as {fmt}: {type(e).__name__}: {e}") from None


def _one_token(backend: Any, where: str | Path, fmt: str) -> None:
    """``warm_up()`` (the ``openai`` backend's streams one token), then for local models one
    token of the first of :data:`PROBE_PROMPTS` the model can tokenize. A model that can take
    none of them has been checked by its warm-up alone."""
    try:
        backend.warm_up()
        if fmt == OPENAI:
            return
        for prompt in PROBE_PROMPTS:
            try:
                stream = backend.stream(prompt, SamplingParams(max_tokens=1))
            except BadRequest:
                continue  # not in its vocabulary
            try:
                for _ in stream:
                    pass
            finally:
                stream.close()
            return
        log.info("%s: tokenizes none of %s; checked by its warm-up", where, PROBE_PROMPTS)
    except TandemError as e:
        raise type(e)(f"{where}: loads as {fmt} but cannot generate: {e.message}") from None
    except Exception as e:
        raise BackendError(
            f"{where}: loads as {fmt} but cannot generate: {type(e).__name__}: {e}"
        ) from None


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
