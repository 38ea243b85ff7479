"""``tandem models`` and ``tandem quantize``: the reference models, your own, and smaller copies of them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tandem.cli.common import (
    console,
    err_console,
    fail,
    models_app,
    quantize_app,
)
from tandem.runtime.errors import TandemError


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
        raise fail(e) from None
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
        raise fail(e) from None
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
        raise fail(e) from None
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
        raise fail(e) from None
    _print_quantized(report)
