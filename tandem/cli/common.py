"""What every command of the ``tandem`` CLI shares: the command groups and the consoles."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from tandem.runtime.errors import TandemError

app = typer.Typer(
    help="Tandem: edge-cloud collaborative inference.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
models_app = typer.Typer(
    help="Build the reference models, or register your own.", no_args_is_help=True
)
cloud_app = typer.Typer(help="Run and query cloud workers.", no_args_is_help=True)
policy_app = typer.Typer(
    help="Check routing policy files, and compare two on logged traffic.", no_args_is_help=True
)
keys_app = typer.Typer(help="CurveZMQ key pairs for workers and clients.", no_args_is_help=True)
quantize_app = typer.Typer(
    help="Make a model smaller: int8 ONNX, or GGUF for llama.cpp.", no_args_is_help=True
)
app.add_typer(models_app, name="models")
app.add_typer(quantize_app, name="quantize")
app.add_typer(cloud_app, name="cloud")
app.add_typer(policy_app, name="policy")
app.add_typer(keys_app, name="keys")
bench_app = typer.Typer(
    help="Measure a deployment: latency per tier, accuracy, escalations, over emulated links.",
    no_args_is_help=True,
)
app.add_typer(bench_app, name="bench")

console = Console()
err_console = Console(stderr=True)


# --log-format / --log-level, shared by the commands that serve (and configure logging)
LogFormatOption = Annotated[
    str,
    typer.Option(
        "--log-format",
        help="text, or json: one JSON object per line (ts, level, logger, message, extras, "
        "request_id, trace_id).",
    ),
]
LogLevelOption = Annotated[
    str | None,
    typer.Option("--log-level", help="debug, info, warning or error (default: info)."),
]


def setup_logging(
    log_format: str = "text", log_level: str | None = None, quiet: bool = False
) -> None:
    """Configure the root logger on stderr for a serving command (``quiet``: warnings
    unless ``log_level`` says otherwise). Exits with a message on a bad format or level."""
    from tandem.runtime.logs import configure_logging

    level = log_level or ("warning" if quiet else "info")
    try:
        configure_logging(level, log_format.lower())
    except ValueError as e:
        err_console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None


def curve_pair(client_key: Path | None, server_key: Path | None) -> tuple[Path, Path] | None:
    """The ``(--client-key, --server-key)`` of a command that asks a worker; ConfigError when
    only one is given."""
    from tandem.runtime.errors import ConfigError

    if (client_key is None) != (server_key is None):
        raise ConfigError("give both --client-key and --server-key (Curve), or neither")
    return (client_key, server_key) if client_key and server_key else None


def write_ready_file(path: Path | None, endpoint: str) -> None:
    """``--ready-file``: write the bound endpoint atomically (a reader never sees half)."""
    if path is not None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(endpoint)
        tmp.replace(path)


def fail(e: TandemError) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {e.message}", highlight=False, soft_wrap=True)
    return typer.Exit(code=1)
