"""``tandem cloud ray-serve``: the models of a models directory as Ray Serve deployments, behind
an ingress that speaks Tandem's wire protocol (:mod:`tandem.cloud.ray_serve`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from tandem.cli.common import cloud_app, err_console, fail, write_ready_file
from tandem.runtime.errors import TandemError


@cloud_app.command("ray-serve")
def cloud_ray_serve(
    config: Annotated[Path, typer.Option(help="Ray Serve config YAML (docs/ray.md).")],
    bind: Annotated[
        str | None, typer.Option(help="Override the config's ingress.bind address.")
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(help="Join this Ray cluster (e.g. auto, HOST:6379) instead of the config's."),
    ] = None,
    ready_file: Annotated[
        Path | None, typer.Option(help="Write the ingress's endpoint here once serving.")
    ] = None,
    keep_deployments: Annotated[
        bool,
        typer.Option(help="Leave the deployments running on exit (other ingresses use them)."),
    ] = False,
    quiet: Annotated[bool, typer.Option(help="Log warnings only.")] = False,
    insecure: Annotated[
        bool,
        typer.Option(help="Allow a non-loopback bind without curve (plain text, any client)."),
    ] = False,
) -> None:
    """Deploy the config's models on Ray Serve (a local Ray, or the cluster at ray_address) and
    serve them on a ZeroMQ ingress until SIGTERM/SIGINT; then delete the deployments."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from tandem.cloud.ray_config import load_ray_config

    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        from tandem.cloud.ray_serve import serve_ray
    except ImportError as e:
        raise fail(
            TandemError(f"{e}: install Tandem's ray extra (pip install tandem[ray])")
        ) from None
    try:
        cfg = load_ray_config(config)
        update: dict[str, object] = {}
        if bind:
            update["ingress"] = cfg.ingress.model_copy(update={"bind": bind})
        if ray_address:
            update["ray_address"] = ray_address
        if insecure:
            update["insecure"] = True
        cfg = cfg.model_copy(update=update)
    except TandemError as e:
        raise fail(e) from None

    def ready(endpoint: str) -> None:
        write_ready_file(ready_file, endpoint)
        if not quiet:
            names = ", ".join(sorted({d.model for d in cfg.deployments}))
            err_console.print(f"serving {names} on Ray Serve through {endpoint}")

    try:
        code = serve_ray(cfg, ready, keep_deployments=keep_deployments)
    except TandemError as e:
        raise fail(e) from None
    raise typer.Exit(code=code)
