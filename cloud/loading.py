"""What a worker serves and under which protection: its models, loaded from a models
directory (backend chosen by the manifest's ``format``, digests checked, warmed up), and the
check that a worker reachable from other hosts uses CurveZMQ.

An ``openai`` entry is a server, not a file: no digest to check; its API key is read from the
environment variable the entry names (``api_key_env``), and an unset variable means no key
(logged as a warning), for servers without authentication such as a local llama.cpp or vLLM."""

from __future__ import annotations

from typing import Any

from tandem.cloud.config import WorkerConfig
from tandem.runtime.backends import BACKENDS, open_backend
from tandem.runtime.curve import is_loopback, load_secret_key
from tandem.runtime.errors import ConfigError, UnknownModel
from tandem.runtime.manifest import (
    MANIFEST_NAME,
    OPENAI,
    Manifest,
    ModelEntry,
    api_key_from_env,
    load_manifest,
    verify_entry,
)


def load_backends(config: WorkerConfig) -> dict[str, Any]:
    """The manifest's models (or the config's subset), digests checked."""
    if config.models_dir is None:
        return {}
    manifest = load_manifest(config.models_dir)
    names = config.models if config.models is not None else [m.name for m in manifest.models]
    return {name: open_model(config, manifest, name) for name in names}


def manifest_entry(config: WorkerConfig, manifest: Manifest, name: str) -> ModelEntry:
    """``name``'s entry; :class:`UnknownModel` naming the ones there are."""
    try:
        return manifest.get(name)
    except KeyError:
        raise UnknownModel(
            f"model {name!r} is not in {config.models_dir}/manifest.json "
            f"(it has: {', '.join(m.name for m in manifest.models)})"
        ) from None


def open_model(config: WorkerConfig, manifest: Manifest, name: str) -> Any:
    """Open manifest entry ``name`` (its file's digest checked) and warm it up: what
    :func:`load_backends` does for each model, and a running worker's model admin for one."""
    entry = manifest_entry(config, manifest, name)
    if entry.format not in BACKENDS:
        raise UnknownModel(
            f"model {name!r} has format {entry.format!r}; known: {', '.join(BACKENDS)}"
        )
    assert config.models_dir is not None
    hosted = (config.experts or {}).get(name)
    extra: dict[str, Any] = {"experts": hosted} if hosted is not None else {}
    if entry.format == OPENAI:  # a server: nothing on disk to verify
        where = f"{config.models_dir / MANIFEST_NAME}: model {name!r}: api_key_env"
        extra |= {
            "model": entry.model,
            "api_key": api_key_from_env(entry.api_key_env, where=where),
            "continue_final_message": entry.continue_final_message,
        }
        path: Any = entry.url
    else:
        path = verify_entry(config.models_dir, entry)
    if entry.format == "gguf":
        extra["parallel"] = config.generation.parallel
    if entry.format == "transformers":  # KV caches are made per sequence, as they start
        extra["max_streams"] = config.generation.max_streams
    backend = open_backend(
        entry.format, path, name=name, version=entry.version, threads=config.threads, **extra
    )
    backend.warm_up()
    return backend


def check_security(config: WorkerConfig) -> None:
    """A worker that other hosts can reach must use Curve, or say ``insecure`` on purpose; its
    Curve keys must load. Raises :class:`ConfigError` saying what to do."""
    if config.curve is not None:
        load_secret_key(config.curve.secret_key)
        if not config.curve.allowed_clients.is_dir():
            raise ConfigError(
                f"curve.allowed_clients: {config.curve.allowed_clients} is not a directory "
                "(it holds the allowed clients' NAME.key files)"
            )
        allowed = config.admin.allowed_clients
        if config.admin.enabled and (allowed is None or not allowed.is_dir()):
            raise ConfigError(
                f"admin.allowed_clients: {allowed} is not a directory; with curve on, admin "
                "messages are taken only from the keys (NAME.key files) in that directory"
            )
    elif not config.insecure and not is_loopback(config.bind):
        raise ConfigError(
            f"bind {config.bind} is reachable from other hosts and curve is off: anyone who "
            "can reach it could use the models and read every request. Set curve "
            "(secret_key, allowed_clients; keys from `tandem keys generate`), bind a loopback "
            "address, or pass --insecure (insecure: true) if the network is protected otherwise"
        )
