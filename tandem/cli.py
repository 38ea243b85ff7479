"""The ``tandem`` command. Thin: it parses, calls one library function, prints.

This module is the composition root, so it imports the edge, cloud and bench layers — lazily,
inside each command, to keep ``tandem --help`` and ``tandem cloud serve`` start-up fast.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from tandem import __version__
from tandem.runtime.errors import TandemError

if TYPE_CHECKING:
    from tandem.bench.scenario import Scenario

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
policy_app = typer.Typer(help="Check routing policy files.", no_args_is_help=True)
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


def _fail(e: TandemError) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {e.message}", highlight=False, soft_wrap=True)
    return typer.Exit(code=1)


@app.command()
def version() -> None:
    """Print Tandem's version."""
    console.print(__version__)


@app.command()
def demo(
    models_dir: Annotated[
        Path | None, typer.Option(help="Where the reference models live (default: user cache).")
    ] = None,
    rebuild: Annotated[bool, typer.Option(help="Rebuild the models even if cached.")] = False,
    deadline_ms: Annotated[float, typer.Option(help="Per-request deadline.")] = 200.0,
    target_recovery: Annotated[
        float, typer.Option(help="Share of the edge→cloud gap the threshold must recover on calib.")
    ] = 0.9,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the report here.")
    ] = None,
    cloud_model: Annotated[
        str, typer.Option(help="Escalate to digits-cloud (dense CNN) or digits-moe (MoE experts).")
    ] = "digits-cloud",
) -> None:
    """Build the reference models if missing, start a cloud worker process, route the held-out
    corrupted digits through EdgeRuntime and print what routing bought."""
    from tandem.demo import print_report, run_demo

    try:
        report = run_demo(
            models_dir=models_dir,
            rebuild=rebuild,
            deadline_ms=deadline_ms,
            target_recovery=target_recovery,
            cloud_model=cloud_model,
            progress=lambda msg: err_console.print(f"[dim]· {msg}[/dim]", highlight=False),
        )
    except TandemError as e:
        raise _fail(e) from None
    print_report(report, console)
    if json_out:
        json_out.write_text(json.dumps(report.to_json(), indent=2) + "\n")
        console.print(f"report written to {json_out}")


@models_app.command("build")
def models_build(
    out: Annotated[Path | None, typer.Option(help="Output folder (default: user cache).")] = None,
    seed: Annotated[int, typer.Option(help="Data split and training seed.")] = 0,
    force: Annotated[bool, typer.Option(help="Rebuild even if already built.")] = False,
    moe: Annotated[bool, typer.Option(help="Also train the MoE classifier (digits-moe).")] = False,
    llm: Annotated[
        bool,
        typer.Option(
            help="Instead: train the language models (a small Llama for the edge, a Mixtral "
            "MoE for the cloud) on the sorting task, with GGUF exports. A few minutes."
        ),
    ] = False,
    speculative: Annotated[
        bool,
        typer.Option(
            help="Instead: train the speculative-decoding pair (spec-edge, spec-cloud and "
            "spec-edge-distilled) on the long sorting task (answers of 32-40 tokens), with GGUF "
            "exports. About ten minutes."
        ),
    ] = False,
    chat: Annotated[
        bool,
        typer.Option(
            help="Instead: the pair with a real tokenizer — a byte-level BPE trained here, a "
            "ChatML template, a random Qwen2 directory (chat-cloud) and its GGUF exports "
            "(chat-edge q8_0, chat-cloud-f32). Seconds."
        ),
    ] = False,
) -> None:
    """Train the edge MLP (int8 ONNX) and the cloud CNN (fp32 ONNX) on corrupted digits, and
    with --moe an MoE classifier served on Tandem's MoE kernels; or with --llm the reference
    language models, with --speculative the speculative-decoding ones, with --chat the pair
    with a real tokenizer and chat template."""
    say = lambda m: err_console.print(f"[dim]· {m}[/dim]", highlight=False)  # noqa: E731
    try:
        if chat:
            from tandem.reference.chat_pair import build_chat_pair

            for name, path in build_chat_pair(out, force=force, say=say).items():
                console.print(f"{name:15} {path}", highlight=False, soft_wrap=True)
            return
        if speculative:
            from tandem.reference.spec_models import build_spec_models

            console.print(f"models in {build_spec_models(out, force=force, say=say)}")
            return
        if llm:
            from tandem.reference.lm_models import build_llm_models

            paths = build_llm_models(out, force=force, progress=say)
            for name, path in paths.items():
                console.print(f"{name:14} {path}", highlight=False, soft_wrap=True)
            return
        from tandem.reference.models import build_reference_models

        d = build_reference_models(out, seed=seed, force=force, moe=moe, progress=say)
    except TandemError as e:
        raise _fail(e) from None
    console.print(f"models in {d}")


@models_app.command("add")
def models_add(
    name: Annotated[str, typer.Option(help="The name clients ask for (a policy's cloud.model).")],
    models_dir: Annotated[
        Path, typer.Option(help="The worker's models directory (created if missing).")
    ],
    model: Annotated[
        Path | None,
        typer.Argument(
            help="An ONNX file, a GGUF file or a transformers model directory (with "
            "config.json); leave out with --url.",
            show_default=False,
        ),
    ] = None,
    url: Annotated[
        str | None, typer.Option(help="An OpenAI-compatible server's base URL (http://host:port).")
    ] = None,
    server_model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="With --url: the model id to ask the server for (default: the first it lists).",
        ),
    ] = None,
    api_key_env: Annotated[
        str | None,
        typer.Option(
            help="With --url: the NAME of the environment variable holding the API key (read "
            "for the check and when serving; never the key itself); it must be set now."
        ),
    ] = None,
    continue_final_message: Annotated[
        bool,
        typer.Option(
            help="With --url: continue a chat handed over mid-answer with vLLM's "
            "continue_final_message (off: the server answers with a new assistant turn)."
        ),
    ] = False,
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="Force the kind: onnx, gguf, transformers or openai (default: detected).",
        ),
    ] = None,
    labels: Annotated[
        str | None, typer.Option(help="ONNX: class names in output order, comma-separated.")
    ] = None,
    labels_file: Annotated[
        Path | None, typer.Option(help="ONNX: class names in output order, one per line.")
    ] = None,
    version: Annotated[
        str | None,
        typer.Option(
            help="Default: the first 12 hex digits of the sha256 (a server: its model id)."
        ),
    ] = None,
    description: Annotated[str, typer.Option(help="Free text kept in the manifest.")] = "",
    replace: Annotated[
        bool, typer.Option(help="Replace a model already registered under this name.")
    ] = False,
) -> None:
    """Register a model in a models directory's manifest.json, so `tandem cloud serve` serves it.

    Four kinds, detected from MODEL (or forced with --format): an ONNX file (input/output spec
    read from it), a GGUF file (llama.cpp; it starts with b'GGUF'), a transformers model
    directory (with config.json; sha256 over its files), or, with --url instead of MODEL, an
    OpenAI-compatible server (vLLM, llama.cpp's server...). A file or directory is copied into
    the models directory unless it is already inside it. Each is checked first: it loads and
    answers one row (ONNX) or generates one token (the others); a model that fails is refused
    with the reason and nothing is written.
    """
    from tandem.runtime.errors import ConfigError
    from tandem.runtime.registry import add_model, read_labels_file

    try:
        if labels is not None and labels_file is not None:
            raise ConfigError("give --labels or --labels-file, not both")
        names = [s.strip() for s in labels.split(",")] if labels is not None else None
        if labels_file is not None:
            names = read_labels_file(labels_file)
        added = add_model(
            models_dir,
            model,
            name=name,
            format=fmt,
            url=url,
            model=server_model,
            api_key_env=api_key_env,
            continue_final_message=continue_final_message,
            labels=names,
            version=version,
            description=description,
            replace=replace,
        )
    except TandemError as e:
        raise _fail(e) from None
    entry = added.entry
    verb = "replaced" if added.replaced else "registered"
    console.print(
        f"{verb} {entry.name}@{entry.version} ({entry.format}) in {added.manifest_path}",
        highlight=False,
        soft_wrap=True,
    )
    if entry.url is not None:
        key = f"${entry.api_key_env}" if entry.api_key_env else "none"
        console.print(f"  url     {entry.url}", highlight=False, soft_wrap=True)
        console.print(f"  model   {entry.model}", highlight=False, soft_wrap=True)
        console.print(f"  api key {key}", highlight=False)
    else:
        source = f" (copied from {added.copied_from})" if added.copied_from else ""
        kind = "directory" if entry.format == "transformers" else "file"
        console.print(
            f"  {kind:<7} {entry.file}{source}, {entry.size_bytes} bytes",
            highlight=False,
            soft_wrap=True,
        )
        console.print(f"  sha256  {entry.sha256}", highlight=False)
    for key, spec in (("input", entry.input), ("output", entry.output)):
        if spec is not None:
            shape = ", ".join("?" if d is None else str(d) for d in spec.shape)
            console.print(f"  {key:<7} {spec.name} {spec.dtype} [{shape}]", highlight=False)
    if entry.format == "onnx":
        shown = "none (answers carry the class index)"
        if entry.labels:
            shown = ", ".join(entry.labels[:10]) + (", ..." if len(entry.labels) > 10 else "")
        classes = "?" if added.n_classes is None else added.n_classes
        console.print(f"  classes {classes}; labels: {shown}", highlight=False, soft_wrap=True)


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
) -> None:
    """Serve the models of a models directory on a ZeroMQ ROUTER socket until SIGTERM/SIGINT."""
    from tandem.cloud.config import load_worker_config
    from tandem.cloud.worker import CloudWorker

    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        cfg = load_worker_config(config)
        if bind:
            cfg = cfg.model_copy(update={"bind": bind})
        if insecure:
            cfg = cfg.model_copy(update={"insecure": True})
        worker = CloudWorker(cfg)
    except TandemError as e:
        raise _fail(e) from None

    def ready(endpoint: str) -> None:
        if ready_file:
            tmp = ready_file.with_suffix(".tmp")
            tmp.write_text(endpoint)
            tmp.replace(ready_file)
        if not quiet:
            err_console.print(f"serving {', '.join(worker.backends)} on {endpoint}")

    try:
        code = worker.serve(ready)
    except TandemError as e:
        raise _fail(e) from None
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
    from tandem.runtime.errors import ConfigError

    try:
        if (client_key is None) != (server_key is None):
            raise ConfigError("give both --client-key and --server-key (Curve), or neither")
        curve = (client_key, server_key) if client_key and server_key else None
        with CloudClient(endpoint, curve=curve) as client:
            info = client.health(timeout_ms / 1e3)
    except TandemError as e:
        raise _fail(e) from None
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
        raise _fail(e) from None
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


def _print_quantized(r) -> None:
    console.print(
        f"{r.method}: {r.source} ({r.bytes_before / 1e6:.2f} MB) -> {r.output} "
        f"({r.bytes_after / 1e6:.2f} MB, {r.ratio:.2f}x the size)",
        highlight=False,
        soft_wrap=True,
    )
    if r.accuracy_before is not None and r.accuracy_after is not None:
        delta = (r.accuracy_after - r.accuracy_before) * 100
        console.print(
            f"held-out accuracy ({r.eval_items} items): {r.accuracy_before:.2%} -> "
            f"{r.accuracy_after:.2%} ({delta:+.1f} points)",
            highlight=False,
        )
    else:
        console.print("held-out accuracy: not measured (no evaluation data given)")


def _load_rows(spec: str, what: str):
    """``digits`` (the bundled corrupted-digits split) or an .npy/.npz file."""
    import numpy as np

    from tandem.runtime.errors import ConfigError

    if spec == "digits":
        from tandem.reference.digits import load_workload

        w = load_workload(0)
        return (w.calib.x, w.calib.y) if what == "calibration" else (w.test.x, w.test.y)
    path = Path(spec)
    try:
        with np.load(path, allow_pickle=False) as data:
            if isinstance(data, np.ndarray):
                return data, None
            return data["x"], data["y"] if "y" in data.files else None
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(
            f"--{what} {spec}: expected 'digits', an .npy of inputs or an .npz with arrays x "
            f"(and y: labels): {e}"
        ) from None


@quantize_app.command("onnx")
def quantize_onnx_cmd(
    model: Annotated[Path, typer.Argument(help="The fp32 ONNX model.")],
    out: Annotated[
        Path | None, typer.Option("-o", "--out", help="Default: MODEL-int8.onnx.")
    ] = None,
    int8: Annotated[bool, typer.Option("--int8", help="Quantize to int8 (the only type).")] = True,
    static: Annotated[
        bool, typer.Option(help="Static (weights and activations) instead of dynamic.")
    ] = False,
    calibration: Annotated[
        str | None,
        typer.Option(help="Static: calibration inputs: 'digits', X.npy, or an .npz with x."),
    ] = None,
    eval_data: Annotated[
        str | None,
        typer.Option("--eval", help="Held-out data: 'digits' or an .npz with x and y (labels)."),
    ] = None,
) -> None:
    """int8 with ONNX Runtime (dynamic, or static with calibration); prints the size before
    and after and the change in held-out accuracy."""
    from tandem.runtime.errors import ConfigError
    from tandem.runtime.quantize import quantize_onnx

    try:
        if not int8:
            raise ConfigError("only --int8 is supported for ONNX models")
        calib = _load_rows(calibration, "calibration")[0] if calibration else None
        ev = _load_rows(eval_data, "eval") if eval_data else None
        if ev is not None and ev[1] is None:
            raise ConfigError(f"--eval {eval_data}: needs labels (an .npz with x and y)")
        dst = out or model.with_name(f"{model.stem}-int8{'-static' if static else ''}.onnx")
        report = quantize_onnx(
            model, dst, method="static" if static else "dynamic", calibration=calib, eval_data=ev
        )
    except TandemError as e:
        raise _fail(e) from None
    _print_quantized(report)


@quantize_app.command("gguf")
def quantize_gguf_cmd(
    hf_dir: Annotated[Path, typer.Argument(help="A transformers Llama/Mixtral directory.")],
    out: Annotated[
        Path | None, typer.Option("-o", "--out", help="Default: HF_DIR.QTYPE.gguf beside it.")
    ] = None,
    q8_0: Annotated[bool, typer.Option("--q8_0", help="8-bit blocks (the default).")] = False,
    f16: Annotated[bool, typer.Option("--f16", help="16-bit floats.")] = False,
    eval_items: Annotated[
        int, typer.Option(help="Held-out sorting-task items to score before and after (0: skip).")
    ] = 200,
) -> None:
    """A transformers model with a Tandem tokenizer to GGUF; prints the size before and after
    and the change in held-out accuracy (transformers before, llama.cpp after)."""
    from tandem.reference.lm_task import sorting_accuracy
    from tandem.runtime.errors import ConfigError
    from tandem.runtime.quantize import quantize_gguf

    try:
        if q8_0 and f16:
            raise ConfigError("give one of --q8_0 and --f16")
        qtype = "f16" if f16 else "q8_0"
        dst = out or hf_dir.with_name(f"{hf_dir.name}.{qtype}.gguf")
        report = quantize_gguf(
            hf_dir,
            dst,
            qtype=qtype,
            eval_items=eval_items,
            score=sorting_accuracy,
            progress=lambda m: err_console.print(f"[dim]· {m}[/dim]", highlight=False),
        )
    except TandemError as e:
        raise _fail(e) from None
    _print_quantized(report)


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
        raise _fail(e) from None
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
) -> None:
    """An OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /v1/models) in
    front of the router, for processes on the device that do not speak Python. Past
    --max-concurrent generations, requests queue (at most --max-queued, each for at most
    --queue-timeout-s) as llama.cpp's server does; only then are they refused with 429."""
    import ipaddress

    from tandem.edge.gateway import serve
    from tandem.runtime.errors import ConfigError

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
        serve(
            policy,
            host=host,
            port=port,
            max_concurrent=max_concurrent,
            max_body_bytes=max_body_bytes,
            max_queued=max_queued,
            queue_timeout_s=queue_timeout_s,
        )
    except TandemError as e:
        raise _fail(e) from None


@policy_app.command("check")
def policy_check(files: Annotated[list[Path], typer.Argument(help="Policy YAML files.")]) -> None:
    """Validate policy files: prints OK, or every error with its key path and what was expected."""
    from tandem.router.policy import load_policy

    bad = 0
    for f in files:
        try:
            load_policy(f)
        except TandemError as e:
            bad += 1
            typer.echo(e.message, err=True)
        else:
            typer.echo(f"{f}: OK")
    raise typer.Exit(code=1 if bad else 0)


@bench_app.command("run")
def bench_run(
    scenario: Annotated[
        str, typer.Argument(help="A scenario YAML file, or a bundled one's name (see `scenarios`).")
    ],
    out: Annotated[
        Path | None,
        typer.Option(help="Results folder (default: the scenario's, or bench-results/NAME)."),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the results JSON here.")
    ] = None,
    plots: Annotated[bool, typer.Option(help="Write PNG plots and the HTML report.")] = True,
) -> None:
    """Run a scenario: start what it needs, measure every level until stable, print the
    summary, write results.json, PNG plots and report.html."""
    from tandem.bench.scenario import find_scenario, load_scenario

    try:
        path = find_scenario(scenario)
        sc = load_scenario(path)
    except TandemError as e:
        raise _fail(e) from None
    _bench(sc, str(path), out, json_out, plots)


def _bench(sc: Scenario, file: str, out: Path | None, json_out: Path | None, plots: bool) -> None:
    import signal
    import sys

    from rich.markup import escape

    from tandem.bench.runner import run_scenario, write_outputs
    from tandem.bench.summary import print_summary

    if plots and sc.output.plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise _fail(
                TandemError(
                    "plots need matplotlib: pip install 'tandem-infer[bench]', or pass --no-plots"
                )
            ) from None

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # unwinds: the workers and relays this run started are stopped

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    out = out or sc.output.dir or Path("bench-results") / str(sc.name)
    say = lambda m: err_console.print(f"[dim]· {escape(m)}[/dim]", highlight=False)  # noqa: E731
    with err_console.status("starting") as status:

        def tick(label: str):
            def show(t: dict) -> None:
                p99 = "–" if t["p99_ms"] is None else f"{t['p99_ms']:.3g} ms"
                status.update(
                    f"{escape(label)} · {t['phase']} · {t['requests']} answers · "
                    f"{t['rate']:.0f}/s · p99 {p99}"
                )

            return show

        try:
            results = run_scenario(sc, out, file=file, say=say, tick=tick)
        except TandemError as e:
            raise _fail(e) from None
    written = write_outputs(results, out, json_out, plots=plots and sc.output.plots,
                            html=sc.output.html)  # fmt: skip
    print_summary(results, console if sys.stdout.isatty() else Console(width=160))
    for p in written:
        console.print(f"wrote {p}", highlight=False, soft_wrap=True)


@bench_app.command("scenarios")
def bench_scenarios() -> None:
    """List the bundled scenarios (run one with `tandem bench run NAME`)."""
    from tandem.bench.scenario import bundled_scenarios, load_scenario

    for name, path in bundled_scenarios().items():
        sc = load_scenario(path)
        console.print(f"[bold]{name:14}[/bold] {sc.description}", highlight=False)
        console.print(f"{'':14} [dim]{path}[/dim]", highlight=False, soft_wrap=True)


@bench_app.command("compare")
def bench_compare(
    a: Annotated[Path, typer.Argument(help="Baseline results JSON.")],
    b: Annotated[Path, typer.Argument(help="New results JSON.")],
    noise_pct: Annotated[
        float, typer.Option(help="Smallest change flagged, whatever the windows' own spread.")
    ] = 10.0,
) -> None:
    """Compare two results files: every figure as a ratio B/A, flagged where the change is
    beyond run-to-run noise."""
    from tandem.bench.compare import compare, load_results, print_compare

    try:
        try:
            rows = compare(load_results(a), load_results(b), noise_pct=noise_pct)
        except (TypeError, AttributeError, KeyError, ValueError) as e:  # the right schema name,
            raise TandemError(  # but not what `tandem bench run` writes
                f"{a} or {b}: not a valid tandem-bench/1 results file ({type(e).__name__}: {e})"
            ) from None
    except TandemError as e:
        raise _fail(e) from None
    print_compare(rows, console)


@bench_app.command(
    "netem",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def bench_netem(ctx: typer.Context) -> None:
    """A loopback relay that adds delay, jitter, a bandwidth limit and outages between clients
    and a worker (no privileges). `tandem bench netem --help` for its options."""
    from tandem.bench.netem import main as netem_main

    netem_main(ctx.args)


def main() -> None:
    # torch's OpenMP threads spin while they wait; on a small shared machine that costs 4-12x
    # per training or decode step (FACTS). Set before torch is imported; the user's value wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    app()


if __name__ == "__main__":
    main()
