"""``tandem evolve``: the command; the work is :mod:`tandem.evolution`'s."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from tandem.cli.common import app, console, err_console, fail
from tandem.evolution import DIGITS_HOLDOUT, EvolveOutcome, evolve_task, rollback_task
from tandem.runtime.errors import TandemError


@app.command()
def evolve(
    policy: Annotated[Path, typer.Argument(help="The routing policy file.")],
    task: Annotated[str, typer.Option(help="The task whose edge model evolves.")],
    rollback: Annotated[
        bool, typer.Option(help="Make the previous model version current again, and stop.")
    ] = False,
    dry_run: Annotated[bool, typer.Option(help="Distil and validate; publish nothing.")] = False,
    log: Annotated[
        Path | None, typer.Option(help="Escalation log (default: the policy's escalation_log).")
    ] = None,
    train_data: Annotated[
        Path | None,
        typer.Option(
            help="Original training data replayed: .npz with x, y (classifiers) or .jsonl of "
            '{"prompt", "answer"} lines (language models).'
        ),
    ] = None,
    holdout: Annotated[
        str | None,
        typer.Option(
            help="Held-out set: .npz with x, y (optional cloud outputs: cloud), or "
            f"{DIGITS_HOLDOUT} (the reference digits' calib split, the default there)."
        ),
    ] = None,
    base: Annotated[
        Path | None,
        typer.Option(
            help="fp32 ONNX (classifier) or transformers folder (language model) to "
            "start from, when the store and the manifest have none."
        ),
    ] = None,
    cloud_model: Annotated[
        Path | None, typer.Option(help="ONNX cloud model run here on the held-out set.")
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(
            help="Threshold objective, as tandem calibrate takes it: recovery=F, "
            "max-escalation=R, accuracy-within=POINTS or cost:KEY=V,... (default: the task's "
            "calibration objective, else recovery=0.8)."
        ),
    ] = None,
    epochs: Annotated[int, typer.Option(help="Distillation epochs over the log.")] = 60,
    temperature: Annotated[float, typer.Option(help="Soft-label temperature T.")] = 2.0,
    replay_share: Annotated[
        float, typer.Option(help="Share of each batch replayed from --train-data.")
    ] = 0.5,
    lr: Annotated[
        float, typer.Option(help="Peak learning rate (AdamW; classifiers and language models).")
    ] = 3e-3,
    min_cloud_confidence: Annotated[
        float, typer.Option(help="Leave out rows whose cloud max-prob is below this.")
    ] = 0.5,
    ood_percentile: Annotated[
        float, typer.Option(help="Leave out rows further out than this % of the training data.")
    ] = 99.5,
    tolerance: Annotated[
        float, typer.Option(help="Held-out accuracy points the new model may lose.")
    ] = 0.5,
    ece_tolerance: Annotated[
        float, typer.Option(help="Held-out ECE the new model may gain (absolute).")
    ] = 0.01,
    steps: Annotated[int, typer.Option(help="Language models: fine-tuning steps.")] = 200,
    holdout_share: Annotated[
        float, typer.Option(help="Language models: share of the log's pairs held out.")
    ] = 0.2,
    keep: Annotated[
        int, typer.Option(min=1, help="Versions the store keeps (the current one always).")
    ] = 10,
    seed: Annotated[int, typer.Option(help="Seed of the distillation run.")] = 0,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the report here.")
    ] = None,
) -> None:
    """Distil the task's escalation log into a new edge model, validate it on held-out data,
    recalibrate its gate and publish it to the task's model store (local.store), where a
    running EdgeRuntime hot-swaps to it. Exits 2 when the new model is rejected."""
    try:
        if rollback:
            mv = rollback_task(policy, task)
            console.print(f"{task}: current version is now {mv.version} ({mv.path})")
            return
        out = evolve_task(
            policy, task, log=log, train_data=train_data, holdout=holdout, base=base,
            cloud_model=cloud_model, target=target, dry_run=dry_run, epochs=epochs,
            temperature=temperature, replay_share=replay_share, lr=lr, seed=seed,
            min_cloud_confidence=min_cloud_confidence, ood_percentile=ood_percentile,
            tolerance=tolerance, ece_tolerance=ece_tolerance, steps=steps,
            holdout_share=holdout_share, keep=keep,
            progress=lambda m: err_console.print(f"[dim]· {m}[/dim]", highlight=False),
        )  # fmt: skip
    except TandemError as e:
        raise fail(e) from None
    if json_out:
        doc = {"accepted": out.accepted, "published": out.published, **out.report}
        json_out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    _print(out)
    if not out.accepted:
        raise typer.Exit(code=2)


def _print(out: EvolveOutcome) -> None:
    r = out.report
    hold = r.get("holdout", {})
    b, a = hold.get("before", {}), hold.get("after", {})
    for key in sorted(set(b) & set(a) - {"n"}):
        console.print(f"{key:>12}: {b[key]:.4f} -> {a[key]:.4f}")
    routing = r.get("routing", {})
    if "before" in routing:
        for when in ("before", "after"):
            g = routing[when]
            console.print(
                f"{when:>12}: threshold {g['threshold']:.3f} (T {g['temperature']:.2f}) escalates "
                f"{g['escalation_rate']['expected']:.1%}, routed accuracy "
                f"{g['routed_accuracy']['expected']:.4f} ({routing['objective']})"
            )
    console.print(f"rows: {r.get('rows')}")
    if not out.accepted:
        for why in r.get("verdict", {}).get("reasons", []):
            console.print(f"[red]rejected:[/red] {why}")
        console.print("nothing published")
    elif out.published:
        console.print(f"{out.task}: published {out.published} (now current)")
    else:
        console.print(f"{out.task}: accepted; dry run, nothing published")
