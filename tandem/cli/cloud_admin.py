"""``tandem cloud models {list,load,replace,unload,reload} ENDPOINT [NAME]``: change what a
running worker serves, with an ``admin`` message (:mod:`tandem.cloud.model_admin`). The worker
must allow it (``admin: {enabled: true}``; with Curve, this client's key in
``admin.allowed_clients``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from tandem.cli.common import cloud_app, console, curve_pair, fail
from tandem.runtime.errors import TandemError

cloud_models_app = typer.Typer(
    help="Load, replace and unload a running worker's models (admin messages).",
    no_args_is_help=True,
)
cloud_app.add_typer(cloud_models_app, name="models")

Endpoint = Annotated[str, typer.Argument(help="The worker, e.g. tcp://127.0.0.1:5555")]
Name = Annotated[str, typer.Argument(help="A model name of the worker's manifest.")]
TimeoutOption = Annotated[
    float, typer.Option(help="Seconds to wait for the answer (loading and warm-up included).")
]
ClientKey = Annotated[Path | None, typer.Option(help="Curve: this client's NAME.key_secret file.")]
ServerKey = Annotated[Path | None, typer.Option(help="Curve: the worker's public NAME.key file.")]


def _send(
    endpoint: str,
    op: str,
    model: str | None,
    timeout_s: float,
    client_key: Path | None,
    server_key: Path | None,
) -> None:
    from tandem.runtime.client import CloudClient

    try:
        with CloudClient(endpoint, curve=curve_pair(client_key, server_key)) as client:
            result = client.admin(op, model, timeout_s=timeout_s)
    except TandemError as e:
        raise fail(e) from None
    console.print_json(json.dumps(result))


@cloud_models_app.command("list")
def models_list(
    endpoint: Endpoint,
    timeout_s: TimeoutOption = 5.0,
    client_key: ClientKey = None,
    server_key: ServerKey = None,
) -> None:
    """What the worker serves (versions, digests), loads and retires, and its admin state."""
    _send(endpoint, "list", None, timeout_s, client_key, server_key)


@cloud_models_app.command("load")
def models_load(
    endpoint: Endpoint,
    name: Name,
    timeout_s: TimeoutOption = 300.0,
    client_key: ClientKey = None,
    server_key: ServerKey = None,
) -> None:
    """Serve NAME, a manifest entry not served yet (checked and warmed up first)."""
    _send(endpoint, "load", name, timeout_s, client_key, server_key)


@cloud_models_app.command("replace")
def models_replace(
    endpoint: Endpoint,
    name: Name,
    timeout_s: TimeoutOption = 300.0,
    client_key: ClientKey = None,
    server_key: ServerKey = None,
) -> None:
    """Serve NAME's manifest entry as it is now; requests in flight finish on the old one."""
    _send(endpoint, "replace", name, timeout_s, client_key, server_key)


@cloud_models_app.command("unload")
def models_unload(
    endpoint: Endpoint,
    name: Name,
    timeout_s: TimeoutOption = 30.0,
    client_key: ClientKey = None,
    server_key: ServerKey = None,
) -> None:
    """Stop serving NAME (what runs on it finishes)."""
    _send(endpoint, "unload", name, timeout_s, client_key, server_key)


@cloud_models_app.command("reload")
def models_reload(
    endpoint: Endpoint,
    timeout_s: TimeoutOption = 600.0,
    client_key: ClientKey = None,
    server_key: ServerKey = None,
) -> None:
    """Serve what the worker's config file and manifest say now (as SIGHUP does)."""
    _send(endpoint, "reload", None, timeout_s, client_key, server_key)
