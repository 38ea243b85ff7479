"""The models directory: model files plus ``manifest.json`` describing each of them.

A cloud worker loads every model its manifest lists (or the subset its config names) and checks
each file's sha256 before serving it, so a model's identity is ``name@version`` plus a digest.
An entry's ``file`` may name a directory (a Hugging Face model, format ``transformers``): its
digest is :func:`sha256_file` of the directory. An ``openai`` entry names no file: it is a
server (``url``, ``model``), its API key read from the environment variable ``api_key_env``
(:func:`api_key_from_env`), so no key is ever written into a manifest.

Writers hold :func:`manifest_lock` across read-check-write; :func:`write_manifest` replaces the
file atomically, so a reader sees the old manifest or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, ValidationInfo, field_validator, model_validator

from tandem.runtime.config import StrictModel, load_config
from tandem.runtime.errors import ConfigError

MANIFEST_NAME = "manifest.json"
LOCK_NAME = "manifest.json.lock"
OPENAI = "openai"  # the format of a model served by an OpenAI-compatible server: no file
_INSIDE = "must be a path inside the models directory"
_DRIVE = re.compile(r"^[A-Za-z]:")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
log = logging.getLogger(__name__)


def _http_url(v: str) -> str:
    """A server's base URL: http or https, a host, no credentials (they belong in the
    environment variable ``api_key_env`` names), no query or fragment."""
    try:
        parts = urlsplit(v)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise ValueError("must be an http:// or https:// URL with a valid port") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            "must be an http:// or https:// URL with a host (the server's base URL, "
            "e.g. http://127.0.0.1:8080 or https://api.example.com/v1)"
        )
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            "must not hold credentials; put the API key in an environment variable and "
            "give its name as api_key_env"
        )
    if parts.query or parts.fragment:
        raise ValueError("must be the server's base URL, without a query or fragment")
    return v


def _env_var_name(v: str) -> str:
    if not _ENV_NAME.match(v):
        raise ValueError(
            "must be the NAME of the environment variable that holds the API key (letters, "
            "digits and _, not starting with a digit), never the key itself"
        )
    return v


HttpUrl = Annotated[str, AfterValidator(_http_url)]
"""An OpenAI-compatible server's base URL (``http``/``https``, no credentials in it)."""
EnvVarName = Annotated[str, AfterValidator(_env_var_name)]
"""The name of an environment variable (which holds a secret that must not be written down)."""


def is_env_var_name(v: str) -> bool:
    """Whether ``v`` can name an environment variable (an API key pasted instead cannot,
    mostly: ``sk-...``)."""
    return bool(_ENV_NAME.match(v))


def check_file_or_server(fmt: str | None, value: object, *, server: bool, noun: str) -> None:
    """Format ``openai`` is a server, named by ``url``; every other format a file (a manifest's
    ``file`` and ``sha256``, a policy's ``path``). ``ValueError`` unless ``value``, a field only
    a server (``server``) or only a file has, is given exactly when ``fmt`` is on its side."""
    if fmt is None:  # the format itself failed validation: that error is enough
        return
    served = fmt == OPENAI
    if value is None and served == server:
        if server:
            raise ValueError(
                f"required for format {OPENAI!r}: the server's base URL, e.g. http://127.0.0.1:8080"
            )
        raise ValueError(f"required for format {fmt!r} (only format {OPENAI!r} takes a url)")
    if value is not None and served != server:
        if server:
            raise ValueError(f"only format {OPENAI!r} has a {noun}; this one is {fmt!r}")
        raise ValueError(f"format {OPENAI!r} names a server (url), not a {noun}; remove it")


def check_server_options(fmt: str, options: dict[str, object]) -> None:
    """``ValueError`` naming the server-only options (``model``, ``api_key_env``...) set on a
    model that is not a server: ``options`` maps each to its value (None or False: unset)."""
    extra = [k for k, v in options.items() if v is not None and v is not False]
    if fmt != OPENAI and extra:
        raise ValueError(f"{' and '.join(extra)}: only format {OPENAI!r} has them; this is {fmt!r}")


def api_key_from_env(var: str | None, *, where: str) -> str | None:
    """The API key held by the environment variable ``var`` (None: no key is used).

    An unset or empty variable also means no key, with a warning naming ``where`` (the
    manifest or policy key that names it): servers on the same machine or network (llama.cpp's
    ``llama-server``, vLLM, llama-cpp-python's server) often run without authentication, and a
    server that needs a key answers HTTP 401, which names the URL."""
    if var is None:
        return None
    key = os.environ.get(var)
    if not key:
        log.warning(
            "%s: environment variable %s is not set; sending no API key",
            where,
            var,
            extra={"where": where, "variable": var},
        )
        return None
    return key


class TensorSpec(StrictModel):
    name: str
    dtype: str = "float32"
    shape: list[int | None]  # None = dynamic (the batch axis)


class ModelEntry(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")  # no paths, spaces or @
    version: str = Field(min_length=1)
    # which backend serves it (tandem.runtime.backends.BACKENDS): "onnx", "tandem-moe", "gguf",
    # "transformers" (``file`` is then a directory), "openai" (a server: url, no file)
    format: str = "onnx"
    # relative to the models directory, and inside it; None only for format "openai"
    file: str | None = Field(default=None, validate_default=True)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$", validate_default=True)
    size_bytes: int = Field(default=0, ge=0)
    # array models (onnx, tandem-moe) have an input and an output; language models do not
    input: TensorSpec | None = None
    output: TensorSpec | None = None
    quantization: str = "none"  # "none" (fp32) or e.g. "int8-dynamic"
    labels: list[str] | None = None
    metrics: dict[str, float] = Field(default_factory=dict)  # e.g. test accuracy
    description: str = ""
    # format "openai" only: the server's base URL (``http://host:port`` gets ``/v1``), the
    # model id to ask it for (None: the first its /v1/models lists), and the name of the
    # environment variable holding its API key (None: no key; see api_key_from_env)
    url: HttpUrl | None = Field(default=None, validate_default=True)
    model: str | None = Field(default=None, min_length=1)
    api_key_env: EnvVarName | None = None
    # format "openai" only: a chat handed over mid-answer is continued with vLLM's
    # continue_final_message (other servers, OpenAI's API among them, refuse the field)
    continue_final_message: bool = False

    @field_validator("file", "sha256")
    @classmethod
    def _file_unless_served(cls, v: str | None, info: ValidationInfo) -> str | None:
        """A file and its digest for every format but ``openai``, which has neither."""
        check_file_or_server(info.data.get("format"), v, server=False, noun="file")
        return v

    @field_validator("file")
    @classmethod
    def _relative_inside(cls, v: str | None) -> str | None:
        """Refuse what could name a file outside the models directory without looking at the
        disk (absolute, ``..``, empty); :func:`verify_entry` checks where symlinks lead."""
        if v is None:
            return v
        path = PurePosixPath(v.strip().replace("\\", "/"))  # "" and "." have no parts
        if not path.parts or path.is_absolute() or ".." in path.parts or _DRIVE.match(v):
            raise ValueError(_INSIDE)
        return v

    @field_validator("url")
    @classmethod
    def _url_if_served(cls, v: str | None, info: ValidationInfo) -> str | None:
        check_file_or_server(info.data.get("format"), v, server=True, noun="url")
        return v

    @model_validator(mode="after")
    def _server_fields_only_for_openai(self) -> ModelEntry:
        check_server_options(
            self.format,
            {
                "model": self.model,
                "api_key_env": self.api_key_env,
                "continue_final_message": self.continue_final_message,
            },
        )
        return self


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


def sha256_file(path: str | Path, *, follow_symlinks: bool = False) -> str:
    """The file's sha256; for a directory (a transformers model), the sha256 over its regular
    files in sorted order, each as (path length, relative path, size, contents), so no two
    different trees hash alike. A symlink in a model directory is refused: it could point
    anywhere. ``follow_symlinks`` hashes what a symlinked file holds instead, as a copy made
    with ``shutil.copytree`` (which follows them) would hash: a directory from the Hugging
    Face cache, whose files are links into its ``blobs/``, on its way into a models
    directory."""
    h = hashlib.sha256()
    root = Path(path)
    if not root.is_dir():
        _hash_into(h, root)
        return h.hexdigest()
    for file in sorted(root.rglob("*")):
        if file.is_symlink() and not follow_symlinks:
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
    if entry.file is None:
        raise ConfigError(
            f"{Path(models_dir) / MANIFEST_NAME}: model {entry.name!r} (format {entry.format!r}) "
            f"is served by {entry.url}; it has no file to verify"
        )
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
    """Write ``manifest.json`` atomically: into a temporary file of its own (a unique name, so
    two writers never share one), flushed to disk, then renamed over the manifest. Writers
    that read, check and write hold :func:`manifest_lock` around all three."""
    path = Path(models_dir) / MANIFEST_NAME
    text = json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{MANIFEST_NAME}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)  # mkstemp: 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def manifest_lock(models_dir: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on ``models_dir``'s manifest (``flock`` on ``manifest.json.lock``
    beside it; the directory must exist), for one writer's read-check-write at a time. Blocks
    until the lock is free; released on exit, or by the kernel if the process dies.

    The lock file is removed on exit, while still locked, so a models directory holds only
    models and their manifest. A waiter that then gets the lock of the removed file notices
    (the path no longer names the file it locked) and takes the lock again on the path."""
    lock_path = Path(models_dir) / LOCK_NAME
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(
                f"{lock_path}: cannot open the lock file: {e.strerror or e}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held, now = os.fstat(fd), os.stat(lock_path)
        except FileNotFoundError:  # removed by the holder we waited for
            os.close(fd)
            continue
        except BaseException:
            os.close(fd)
            raise
        if (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
            break
        os.close(fd)  # a newer lock file took its place: lock that one
    try:
        yield lock_path
    finally:
        lock_path.unlink(missing_ok=True)  # still locked: see above
        os.close(fd)  # closing the last descriptor releases the lock
