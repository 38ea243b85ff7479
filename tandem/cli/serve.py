"""``tandem cloud``, ``tandem keys``, ``tandem generate`` and ``tandem gateway``: run a worker, ask one, secure the link, and answer from the edge."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from tandem.cli.common import (
    LogFormatOption,
    LogLevelOption,
    app,
    cloud_app,
    console,
    curve_pair,
    err_console,
    fail,
    keys_app,
    setup_logging,
    write_ready_file,
)
from tandem.runtime.errors import TandemError


@cloud_app.command("serve")
def cloud_serve(
    config: Annotated[Path, typer.Option(help="Worker config YAML.")],
    bind: Annotated[str | None, typer.Option(help="Override the config's bind address.")] = None,
    ready_file: Annotated[
        Path | None, typer.Option(help="Write the bound endpoint here once serving.")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="Log warnings only.")] = False,
    insecure: Annotated[
        bool,
        typer.Option(help="Allow a non-loopback bind without curve (plain text, any client)."),
    ] = False,
    http: Annotated[
        str | None,
        typer.Option(
            help="Serve /metrics, /health and /ready on HOST:PORT (overrides the config's "
            "http.bind; unauthenticated, no request data in it).",
        ),
    ] = None,
    log_format: LogFormatOption = "text",
    log_level: LogLevelOption = None,
) -> None:
    """Serve the models of a models directory on a ZeroMQ ROUTER socket until SIGTERM/SIGINT."""
    # Before torch and numpy load their thread pools (each reads these once): an engine step
    # alternates torch's GEMMs, Numba's kernels and numpy's BLAS, and pool threads that spin
    # after a region take the cores from the next one. Measured on 2 busy cores, a
    # 32-sequence step of sort-cloud: 25 ms with OpenMP passive vs 135-730 ms spinning; an
    # 8-sequence step with numpy's BLAS: 4.3 ms on one thread vs 216 ms with OpenBLAS's pool.
    # (BLAS products of a few rows gain nothing from threads.) Values the user set win.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import signal

    from tandem.cloud.config import load_worker_config, with_http
    from tandem.cloud.worker import CloudWorker

    # SIGHUP reloads the models once serving; before (while the models load) its default
    # action would end the process: a reload sent early is ignored instead
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    log_format = log_format.lower()
    setup_logging(log_format, log_level, quiet)
    try:
        cfg = load_worker_config(config)
        if bind:
            cfg = cfg.model_copy(update={"bind": bind})
        if insecure:
            cfg = cfg.model_copy(update={"insecure": True})
        if http:
            cfg = with_http(cfg, http)
        worker = CloudWorker(cfg, config_path=config)  # a SIGHUP reads it again
    except TandemError as e:
        raise fail(e) from None

    def ready(endpoint: str) -> None:
        write_ready_file(ready_file, endpoint)
        if not quiet and log_format == "text":  # json: stderr holds JSON lines only
            err_console.print(f"serving {', '.join(worker.backends)} on {endpoint}")

    try:
        code = worker.serve(ready)
    except TandemError as e:
        raise fail(e) from None
    raise typer.Exit(code=code)


@cloud_app.command("health")
def cloud_health(
    endpoint: Annotated[str, typer.Argument(help="e.g. tcp://127.0.0.1:5555")],
    timeout_ms: Annotated[int, typer.Option(help="How long to wait.")] = 2000,
    client_key: Annotated[
        Path | None, typer.Option(help="Curve: this client's NAME.key_secret file.")
    ] = None,
    server_key: Annotated[
        Path | None, typer.Option(help="Curve: the worker's public NAME.key file.")
    ] = None,
) -> None:
    """Ask a worker for its models, versions and queue depth."""
    from tandem.runtime.client import CloudClient

    try:
        with CloudClient(endpoint, curve=curve_pair(client_key, server_key)) as client:
            info = client.health(timeout_ms / 1e3)
    except TandemError as e:
        raise fail(e) from None
    console.print_json(json.dumps(info))


@keys_app.command("generate")
def keys_generate(
    directory: Annotated[
        Path, typer.Argument(help="Where to write the pair (created if missing).")
    ],
    name: Annotated[
        str, typer.Option(help="File name stem: NAME.key, NAME.key_secret.")
    ] = "worker",
    force: Annotated[bool, typer.Option(help="Replace an existing pair of that name.")] = False,
) -> None:
    """Write a CurveZMQ key pair: NAME.key (public, share it) and NAME.key_secret (keep it)."""
    from tandem.runtime.curve import generate_keypair

    try:
        public, secret = generate_keypair(directory, name, force=force)
    except TandemError as e:
        raise fail(e) from None
    console.print(f"public key  {public}", highlight=False, soft_wrap=True)
    console.print(
        f"secret key  {secret}  (mode 0600: never share it)", highlight=False, soft_wrap=True
    )
    console.print(
        "if this is a worker's pair: its config gets curve: {secret_key: "
        f"{secret}, allowed_clients: DIR_OF_CLIENT_KEYS}}, and each client's policy gets "
        f"cloud.server_key: {public}\n"
        f"if this is a robot's (client's) pair: copy {public} into the worker's "
        f"allowed_clients directory, and the robot's policy gets cloud.client_key: {secret}",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt.")],
    policy: Annotated[Path, typer.Option(help="Policy YAML with a generation task.")],
    task: Annotated[str | None, typer.Option(help="The task (default: the only one).")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Default: the task's.")] = None,
    temperature: Annotated[float, typer.Option(help="0: greedy.")] = 0.0,
    tag: Annotated[list[str] | None, typer.Option(help="Request tags, e.g. private.")] = None,
) -> None:
    """Generate through the router and stream the answer, coloured by tier (edge green, cloud
    blue, edge-degraded yellow); then the tiers, confidence and timings."""
    from tandem.edge import EdgeRuntime

    colours = {"edge": "green", "cloud": "blue", "edge-degraded": "yellow"}
    try:
        with EdgeRuntime.from_policy(policy) as rt:
            stream = rt.generate(
                prompt,
                task,
                max_tokens=max_tokens,
                temperature=temperature,
                tags=tag or (),
                stream=True,
            )
            with stream:
                for chunk in stream:
                    if chunk.restart:
                        console.print("\n[dim](restarted by the cloud)[/dim]")
                    style = colours[chunk.tier.value]
                    if chunk.drafted and chunk.token_texts:  # drafted and accepted: underlined
                        for text, drafted in zip(chunk.token_texts, chunk.drafted, strict=True):
                            s = f"{style} underline" if drafted else style
                            console.print(text, style=s, end="", highlight=False)
                        continue
                    console.print(chunk.text, style=style, end="", highlight=False)
            r = stream.result
    except TandemError as e:
        raise fail(e) from None
    console.print()
    assert r is not None
    conf = "n/a" if r.confidence is None else f"{r.confidence:.3f}"
    timings = ", ".join(f"{k} {v:.1f} ms" for k, v in r.timings.items() if k != "gamma")
    err_console.print(
        f"[dim]tiers {', '.join(t.value for t in r.tiers)}; {r.reason}; confidence {conf}; "
        f"finish {r.finish_reason}; {timings}[/dim]",
        highlight=False,
    )
    if r.speculation is not None:
        s = r.speculation
        rate = "n/a" if s["acceptance"] is None else f"{s['acceptance']:.0%}"
        err_console.print(
            f"[dim]speculative: {s['rounds']} verify rounds, {s['accepted']}/{s['drafted']} "
            f"drafted tokens accepted ({rate}, underlined), mean γ {r.timings['gamma']:.1f}"
            f"{', then streamed' if s['fallback'] else ''}[/dim]",
            highlight=False,
        )


@app.command()
def gateway(
    policy: Annotated[Path, typer.Option(help="Policy YAML with generation tasks.")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    max_concurrent: Annotated[
        int, typer.Option(help="Generations at once; more wait in the queue.")
    ] = 8,
    max_queued: Annotated[
        int,
        typer.Option(
            help="Requests waiting for a generation slot (first come, first served); one "
            "more gets 429. 0: no queue."
        ),
    ] = 64,
    queue_timeout_s: Annotated[
        float,
        typer.Option(help="Longest wait for a slot, in seconds; past it the request gets 429."),
    ] = 30.0,
    write_timeout_s: Annotated[
        float,
        typer.Option(help="A stream whose client takes nothing this long (s) is closed."),
    ] = 30.0,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body; more gets 413.")] = (
        1 << 20
    ),
    insecure: Annotated[
        bool,
        typer.Option(
            help="Allow a non-loopback address: the gateway has no authentication, and a "
            "client's tags drive the policy's rules."
        ),
    ] = False,
    log_format: LogFormatOption = "text",
    log_level: LogLevelOption = None,
) -> None:
    """An OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /v1/models) in
    front of the router, for processes on the device that do not speak Python; /health (live),
    /ready (models loaded and warmed, else 503) and /metrics (Prometheus) on the same port. Past
    --max-concurrent generations, requests queue (at most --max-queued, each for at most
    --queue-timeout-s) as llama.cpp's server does; only then are they refused with 429."""
    import ipaddress

    from tandem.edge.gateway import GatewayLimits, serve
    from tandem.runtime.errors import ConfigError

    setup_logging(log_format, log_level)

    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    try:
        if not (loopback or insecure):
            raise ConfigError(
                f"--host {host} is reachable from other hosts, and the gateway has no "
                "authentication (any client could use the models, and its tags drive the "
                "policy's rules): bind a loopback address, or pass --insecure"
            )
        limits = GatewayLimits(
            max_concurrent=max_concurrent,
            max_body_bytes=max_body_bytes,
            max_queued=max_queued,
            queue_timeout_s=queue_timeout_s,
            write_timeout_s=write_timeout_s,
        )
        serve(policy, host=host, port=port, limits=limits)
    except TandemError as e:
        raise fail(e) from None
