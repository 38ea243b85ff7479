"""Placing a model's files in a models directory for :mod:`tandem.runtime.registry`: where its
entry points (already inside, already there with the same bytes, or a copy), and a copy that is
never half-written and is checked against the digest that was checked."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from tandem.runtime.errors import ConfigError
from tandem.runtime.manifest import Manifest, sha256_file


def size_of(src: Path) -> int:
    if src.is_file():
        return src.stat().st_size
    return sum(p.stat().st_size for p in src.rglob("*") if p.is_file())


def head_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(8)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None


def place(
    src: Path, root: Path, digest: str, manifest: Manifest, replacing: int | None
) -> tuple[str, Path | None]:
    """The entry's ``file`` for ``src`` (a file, or a transformers directory), and where to
    copy it (None: no copy needed)."""
    real = src.resolve()
    if real == root:
        raise ConfigError(f"{src} is the models directory itself; put the model in a folder")
    if real.is_relative_to(root):
        return real.relative_to(root).as_posix(), None
    dest = root / src.name
    if not (dest.exists() or dest.is_symlink()):
        return src.name, dest
    same_kind = not dest.is_symlink() and (dest.is_dir() if src.is_dir() else dest.is_file())
    if same_kind and _digest_or_none(dest) == digest:
        return src.name, None  # the same bytes are already there
    users = [i for i, m in enumerate(manifest.models) if m.file == src.name]
    if replacing is None or users != [replacing] or not same_kind:
        what = "directory" if src.is_dir() else "file"
        raise ConfigError(
            f"{dest} already exists and differs from {src}; rename one of them "
            f"(the {what} is copied into the models directory under its own name)"
        )
    return src.name, dest  # the file of the entry being replaced, used by no other


def _digest_or_none(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except ConfigError:  # a directory holding symlinks: not what was checked
        return None


def copy_checked(src: Path, dest: Path, digest: str) -> None:
    """Copy a file or directory through a temporary one in the same folder, so ``dest`` is
    never half-written, and check the copy's digest is the one that was checked (the source
    did not change meanwhile)."""
    if src.is_dir():
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
        try:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
            _same_digest(src, tmp, digest)
            if dest.exists():  # the directory of the entry being replaced
                old = Path(
                    tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".old")
                )
                os.replace(dest, old / dest.name)
                os.replace(tmp, dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copy(src, name)  # content and permission bits (mkstemp made it 0600)
        _same_digest(src, Path(name), digest)
        os.replace(name, dest)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def _same_digest(src: Path, copy: Path, digest: str) -> None:
    if sha256_file(copy) != digest:
        raise ConfigError(f"{src} changed while it was being registered; add it again")
