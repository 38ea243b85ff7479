"""Co-evolution, what ``tandem evolve`` runs: distil a task's escalation log into a new edge
model, validate it on held-out data, recalibrate its gate and publish it into the task's model
store — or roll the store back. (Over 500 lines: the composition for both kinds of task,
classifiers and language models, which share the log, store, manifest and objective lookups.)

This module is the composition root of co-evolution: it opens the escalation log
(:mod:`tandem.edge.escalation_log`), hands plain arrays to the distillation jobs in
:mod:`tandem.cloud.evolve` (classifiers) and :mod:`tandem.cloud.evolve_lm` (language models),
picks the new threshold with :mod:`tandem.router.calibrate`, and writes the
:class:`~tandem.runtime.model_store.ModelStore`. :func:`evolve_task` and
:func:`rollback_task` are what the command calls; Python code can call them the same way.
"""

from __future__ import annotations

import datetime as dt
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tandem.runtime.errors import ConfigError
from tandem.runtime.manifest import sha256_file

Progress = Callable[[str], None]
DIGITS_HOLDOUT = "digits-calib"  # --holdout for the reference digits task: its calib split
DEFAULT_TARGET = "recovery=0.8"


@dataclass
class EvolveOutcome:
    """What one ``tandem evolve`` run did: ``accepted`` (validation passed), ``published``
    (the new version's name, None when rejected or a dry run) and the full report."""

    task: str
    accepted: bool
    published: str | None
    report: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- shared steps
def _task(policy_path: Path, task: str) -> tuple[Any, Any]:
    from tandem.router.policy import load_policy

    policy = load_policy(policy_path)
    if task not in policy.tasks:
        raise ConfigError(
            f"{policy_path}: no task {task!r} (tasks: {', '.join(sorted(policy.tasks))})"
        )
    return policy, policy.tasks[task]


def _store(policy_path: Path, task: str, tp: Any) -> Any:
    from tandem.runtime.model_store import ModelStore

    if tp.local.store is None:
        raise ConfigError(
            f"{policy_path}: tasks.{task}.local.store: tandem evolve publishes versioned models "
            "into a model store; set it to a folder (e.g. store: models/{task})"
        )
    return ModelStore(tp.local.store)


def rollback_task(policy_path: str | Path, task: str) -> Any:
    """Make the task's previous model version current again; returns it
    (:class:`~tandem.runtime.model_store.ModelVersion`)."""
    policy_path = Path(policy_path)
    _, tp = _task(policy_path, task)
    return _store(policy_path, task, tp).rollback()


def _log_records(policy_path: Path, policy: Any, log_path: Path | None, task: str) -> list[Any]:
    from tandem.edge.escalation_log import EscalationLog

    path = log_path or (policy.escalation_log.path if policy.escalation_log else None)
    if path is None:
        raise ConfigError(
            f"{policy_path}: escalation_log: no log to distil; set escalation_log.path in the "
            "policy or give --log FILE"
        )
    if not Path(path).is_file():
        raise ConfigError(f"{path}: no escalation log there (escalation_log.path / --log)")
    with EscalationLog(path) as lg:
        return list(lg.records(task))


def _manifest_beside(model: Path) -> Any:
    from tandem.runtime.manifest import load_manifest

    try:
        return load_manifest(model.parent)
    except ConfigError:
        return None


def _entry_for(manifest: Any, file: Path) -> Any:
    return next((m for m in manifest.models if m.file == file.name), None) if manifest else None


# ---------------------------------------------------------------------------- classifiers
def _base_fp32(base: Path | None, store: Any, local: Path) -> tuple[Path, str]:
    """The fp32 ONNX graph to start from, and where it was found: ``--base``, the current
    store version's ``fp32.onnx``, the policy's model when fp32, or the manifest's
    ``<name>-fp32`` entry beside it."""
    from tandem.cloud.evolve import is_quantized

    if base is not None:
        if not base.is_file():
            raise ConfigError(f"--base: no such file {base}")
        return base, "--base"
    cur = store.current()
    if cur is not None and (p := cur.extra("fp32.onnx")) is not None:
        return p, f"store {cur.version} fp32.onnx"
    if not is_quantized(local):
        return local, "local.path"
    manifest = _manifest_beside(local)
    entry = _entry_for(manifest, local)
    if entry is not None:
        fp32 = next((m for m in manifest.models if m.name == f"{entry.name}-fp32"), None)
        if fp32 is not None and fp32.file:
            return local.parent / fp32.file, f"manifest {fp32.name}"
    raise ConfigError(
        f"{local}: an int8 model, and no fp32 graph to train from was found (no fp32.onnx in "
        f"the store, no '<name>-fp32' entry in {local.parent / 'manifest.json'}); give --base "
        "FILE.onnx (the fp32 export of the edge model)"
    )


def _npz(path: Path, what: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise ConfigError(f"{what} {path}: not a readable .npz ({e})") from None
    missing = {"x", "y"} - set(data)
    if missing:
        raise ConfigError(f"{what} {path}: expected arrays x and y, missing {sorted(missing)}")
    data["x"] = np.asarray(data["x"], np.float32).reshape(len(data["x"]), -1)
    data["y"] = np.asarray(data["y"], np.int64)
    return data


def _reference_digits(local: Path) -> Any:
    """The reference models' manifest when ``local`` is one of them (the digits workload)."""
    manifest = _manifest_beside(local)
    return manifest if manifest is not None and manifest.workload == "corrupted-digits" else None


def _data(
    train_data: Path | None, holdout: str | None, cloud_model: Path | None, local: Path
) -> tuple[Any, Any, np.ndarray | None, str]:
    """(train x/y or None, holdout x/y, the cloud's holdout outputs or None, holdout name)."""
    from tandem.cloud.evolve import onnx_outputs

    ref = _reference_digits(local)
    train = _npz(train_data, "--train-data") if train_data else None
    cloud = None
    if holdout is None and ref is None:
        raise ConfigError("--holdout: give a held-out set FILE.npz (x, y; optional cloud)")
    if holdout is None or holdout == DIGITS_HOLDOUT:
        from tandem.reference.digits import load_workload

        data = load_workload(ref.seed if ref is not None else 0)
        hold = {"x": data.calib.x, "y": data.calib.y}
        if train is None and ref is not None:
            train = {"x": data.train.x, "y": data.train.y}
        if cloud_model is None and ref is not None:
            entry = next((m for m in ref.models if m.name == "digits-cloud"), None)
            cloud_model = local.parent / entry.file if entry and entry.file else None
        name = DIGITS_HOLDOUT
    else:
        hold = _npz(Path(holdout), "--holdout")
        cloud = hold.get("cloud")
        name = str(holdout)
    if cloud is None and cloud_model is not None:
        cloud = onnx_outputs(cloud_model, hold["x"])
    t = None if train is None else (train["x"], train["y"])
    return t, (hold["x"], hold["y"]), cloud, name


def _routing(
    outputs: np.ndarray,
    y: np.ndarray,
    cloud_right: np.ndarray,
    metric: str,
    objective: Any,
    temperature: float,
) -> dict[str, Any]:
    """The threshold ``objective`` asks for on the held-out outputs at ``temperature`` (in the
    policy's convention for ``metric``), with the escalation rate and routed accuracy it gives
    and their bootstrap intervals (:func:`tandem.router.calibrate.choose_threshold`)."""
    from tandem.cloud.evolve import log_probs
    from tandem.router.calibrate import (
        accept_scores,
        choose_threshold,
        score_deciles,
        to_policy_threshold,
    )

    lp = log_probs(outputs)
    scores = accept_scores(lp, metric, temperature)
    choice = choose_threshold(scores, lp.argmax(axis=1) == y, cloud_right, objective)
    return {
        "threshold": to_policy_threshold(metric, choice.threshold),
        "temperature": temperature,
        "met": choice.met,
        "escalation_rate": choice.escalation_rate.as_dict(),
        "routed_accuracy": choice.accuracy.as_dict(),
        "score_quantiles": score_deciles(metric, scores),
    }


def _current_gate(tp: Any, store: Any) -> dict[str, Any] | None:
    cur = store.current()
    if cur is not None and cur.gate:
        return cur.gate
    if getattr(tp.gate, "type", "confidence") != "confidence":
        return None
    return {"threshold": tp.gate.threshold, "temperature": tp.gate.temperature}


def _evolve_classifier(
    policy_path: Path, policy: Any, tp: Any, task: str, o: dict[str, Any], say: Progress
) -> EvolveOutcome:
    from tandem.cloud.evolve import (
        DistilConfig,
        distil_classifier,
        log_probs,
        rows_from_log,
        sha256_ids,
    )
    from tandem.router.calibrate import fit_temperature

    t0 = time.perf_counter()
    store = _store(policy_path, task, tp)
    rows = rows_from_log(_log_records(policy_path, policy, o["log"], task))
    say(f"{task}: {len(rows)} distillable log rows; skipped {rows.skipped}")
    cur = store.current()
    current_model = cur.path if cur is not None else Path(tp.local.path)
    base, base_from = _base_fp32(o["base"], store, Path(tp.local.path))
    train, (hx, hy), cloud_out, hold_name = _data(
        o["train_data"], o["holdout"], o["cloud_model"], Path(tp.local.path)
    )
    if tp.gate.type != "confidence":
        say("the task's gate is a learned router: its threshold is left alone (retrain it)")
    metric = tp.gate.metric.value if tp.gate.type == "confidence" else "max_prob"
    objective = _objective(o["target"], tp)
    with tempfile.TemporaryDirectory(prefix="tandem-evolve-") as tmp:
        cand = distil_classifier(
            base, current_model, rows, holdout=(hx, hy), train=train, folder=Path(tmp),
            config=DistilConfig(**o["distil"]), min_cloud_confidence=o["min_cloud_confidence"],
            ood_percentile=o["ood_percentile"], accuracy_tolerance=o["tolerance"] / 100,
            ece_tolerance=o["ece_tolerance"], progress=say,
        )  # fmt: skip
        cloud_right = (
            np.ones(len(hy), bool) if cloud_out is None else np.argmax(cloud_out, axis=1) == hy
        )
        gates = {}
        for name, logits in (("before", cand.current_logits), ("after", cand.new_logits)):
            temp = fit_temperature(log_probs(logits), hy)
            gates[name] = _routing(logits, hy, cloud_right, metric, objective, temp)
        cur_gate = _current_gate(tp, store)
        report = {
            "task": task,
            "kind": "classify",
            "base": {"file": str(base), "found": base_from},
            "current_model": str(current_model),
            "parent": cur.version if cur is not None else None,
            **cand.report,
            "routing": {
                "objective": str(objective),
                "holdout": hold_name,
                "cloud_accuracy": float(cloud_right.mean()),
                "cloud_outputs": "given" if cloud_out is not None else "none: assumed right",
                "current_gate": cur_gate,
                **gates,
            },
            "provenance": {
                "log_rows_sha256": sha256_ids(
                    [i for i, k in zip(rows.request_ids, cand.keep, strict=True) if k]
                ),
                "rows": int(cand.keep.sum()),
                "parent": cur.version if cur is not None else None,
                "base_sha256": sha256_file(base),
            },
        }
        published = None
        if cand.verdict.accepted and not o["dry_run"]:
            new = gates["after"]
            gate = {"metric": metric, "threshold": new["threshold"],
                    "temperature": new["temperature"]}  # fmt: skip
            calibration = {
                "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "objective": str(objective),
                "data": {"source": hold_name, "rows": len(hy)},
                "models": {"parent": report["parent"] or "local.path"},  # + edge: publish's
                "escalation_rate": new["escalation_rate"],
                "accuracy": new["routed_accuracy"],
                "score_quantiles": new["score_quantiles"],
            }
            report["seconds"] = time.perf_counter() - t0
            confidence_gate = tp.gate.type == "confidence"  # a learned gate keeps its own
            mv = store.publish(
                cand.int8, gate=gate if confidence_gate else None,
                calibration=calibration if confidence_gate else None, report=report,
                extra_files={"fp32.onnx": cand.fp32},
            )  # fmt: skip
            store.prune(o["keep"])
            published = mv.version
    report["seconds"] = time.perf_counter() - t0
    return EvolveOutcome(task, cand.verdict.accepted, published, report)


def _objective(target: str | None, tp: Any) -> Any:
    """``--target``, else the objective the task was last calibrated for, else recovery=0.8
    (the gate's recovery semantics): a :class:`tandem.router.calibrate.Objective`."""
    from tandem.router.calibrate import parse_objective

    if target:
        return parse_objective(target)
    if tp.calibration is not None:
        return parse_objective(tp.calibration.objective)
    return parse_objective(DEFAULT_TARGET)


# ---------------------------------------------------------------------------- language models
LM_EVAL_ITEMS = 60  # held-out sorting items (over its difficulties) for the reference LM task


def _base_hf(base: Path | None, store: Any, local: Path) -> tuple[Path, str]:
    """The transformers folder to fine-tune: ``--base``, the current store version's ``hf``
    folder, or the manifest entry beside the GGUF file named without its ``-q8_0``/``-f16``."""
    if base is not None:
        return base, "--base"
    cur = store.current()
    if cur is not None and (p := cur.extra("hf")) is not None:
        return p, f"store {cur.version} hf"
    manifest = _manifest_beside(local)
    entry = _entry_for(manifest, local)
    if entry is not None:
        stem = entry.name.rsplit("-", 1)[0]
        hf = next((m for m in manifest.models if m.name == stem), None)
        if hf is not None and hf.format == "transformers" and hf.file:
            return local.parent / hf.file, f"manifest {hf.name}"
    raise ConfigError(
        f"{local}: no transformers folder to fine-tune was found (no hf folder in the store, no "
        f"transformers entry for it in {local.parent / 'manifest.json'}); give --base DIR"
    )


def _evolve_generator(
    policy_path: Path, policy: Any, tp: Any, task: str, o: dict[str, Any], say: Progress
) -> EvolveOutcome:
    from tandem.cloud.evolve import sha256_ids
    from tandem.cloud.evolve_lm import (
        LmDistilConfig,
        distil_generator,
        pairs_from_log,
        read_pairs,
        split_pairs,
    )

    t0 = time.perf_counter()
    if tp.local.format != "gguf":
        raise ConfigError(
            f"{policy_path}: tasks.{task}.local.format: tandem evolve publishes GGUF models; "
            f"got {tp.local.format!r}"
        )
    store = _store(policy_path, task, tp)
    got = pairs_from_log(
        _log_records(policy_path, policy, o["log"], task),
        min_cloud_confidence=o["min_cloud_confidence"],
    )
    say(f"{task}: {len(got.pairs)} (prompt, cloud answer) pairs; skipped {got.skipped}")
    train, hold = split_pairs(got.pairs, o["holdout_share"], o["distil"]["seed"])
    cur = store.current()
    current = cur.path if cur is not None else Path(tp.local.path)
    base, base_from = _base_hf(o["base"], store, Path(tp.local.path))
    evaluate = None
    manifest = _manifest_beside(Path(tp.local.path))
    if manifest is not None and manifest.workload == "sort-letters":
        from tandem.cloud.evolve_lm import Pair, greedy_answers, matches
        from tandem.reference.lm_task import DIFFICULTIES, held_out

        per = LM_EVAL_ITEMS // len(DIFFICULTIES)
        items = [it for d in DIFFICULTIES for it in held_out(d, per)]
        bench = [Pair(f"held-out:{i}", it.prompt, it.answer) for i, it in enumerate(items)]

        def evaluate(path: Path) -> dict[str, np.ndarray]:
            return {"sort_exact_match": matches(greedy_answers(path, bench), bench)}

    config = LmDistilConfig(
        steps=o["steps"], seed=o["distil"]["seed"], lr=o["distil"]["lr"],
        replay_share=o["distil"]["replay_share"],
    )  # fmt: skip
    replay = read_pairs(o["train_data"]) if o["train_data"] is not None else []
    with tempfile.TemporaryDirectory(prefix="tandem-evolve-") as tmp:
        cand = distil_generator(
            base, current, train, hold, folder=Path(tmp), config=config,
            tolerance=o["tolerance"] / 100, evaluate=evaluate, replay=replay, progress=say,
        )  # fmt: skip
        report = {
            "task": task,
            "kind": "generate",
            "base": {"folder": str(base), "found": base_from},
            "current_model": str(current),
            "parent": cur.version if cur is not None else None,
            **cand.report,
            "provenance": {
                "log_rows_sha256": sha256_ids([p.request_id for p in train]),
                "rows": len(train),
                "parent": cur.version if cur is not None else None,
            },
        }
        report["rows"]["skipped"] = got.skipped
        gate, calibration = _token_gate(tp, hold, cand.holdout_answers, _objective(o["target"], tp))
        report["routing"] = {"gate": gate, "calibration": calibration}
        published = None
        if cand.accepted and not o["dry_run"]:
            report["seconds"] = time.perf_counter() - t0
            mv = store.publish(
                cand.gguf, gate=gate, calibration=calibration, report=report,
                extra_files={"hf": cand.hf},
            )  # fmt: skip
            store.prune(o["keep"])
            published = mv.version
    report["seconds"] = time.perf_counter() - t0
    return EvolveOutcome(task, cand.accepted, published, report)


def _token_gate(
    tp: Any, hold: list[Any], answers: list[tuple[str, list[float]]], objective: Any
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The token gate's threshold for the new model, from its answers to the held-out pairs
    (the cloud's answer is the label, so the cloud is right on all of them): the gate's probe
    score over the first ``probe_tokens`` log-probs, as the live gate scores it. Only for the
    modes that decide on a probe (``probe``, ``speculative``); otherwise (None, None): the
    policy's threshold stays."""
    from tandem.router.calibrate import choose_threshold, score_deciles
    from tandem.router.policy import EscalationMode
    from tandem.router.routing import TokenGate

    if tp.mode not in (EscalationMode.PROBE, EscalationMode.SPECULATIVE) or len(hold) < 20:
        return None, None
    g = TokenGate(tp.gate)
    scores = np.array([g.probe_score(lp[: tp.probe_tokens]) for _, lp in answers])
    right = np.array([a == p.answer for (a, _), p in zip(answers, hold, strict=True)])
    choice = choose_threshold(scores, right, np.ones(len(right), bool), objective)
    gate = {"threshold": float(np.clip(round(choice.threshold, 6), 0.0, 1.0))}
    calibration = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "objective": str(objective),
        "data": {"source": "held-out log pairs (cloud answers as labels)", "rows": len(hold)},
        "models": {},  # the store names the edge version it publishes
        "escalation_rate": choice.escalation_rate.as_dict(),
        "accuracy": choice.accuracy.as_dict(),
        "score_quantiles": score_deciles(str(tp.gate.metric), scores),
    }
    return gate, calibration


# ---------------------------------------------------------------------------- the entry point
def evolve_task(
    policy_path: str | Path,
    task: str,
    *,
    log: str | Path | None = None,
    train_data: str | Path | None = None,
    holdout: str | None = None,
    base: str | Path | None = None,
    cloud_model: str | Path | None = None,
    target: str | None = None,
    dry_run: bool = False,
    epochs: int = 60,
    temperature: float = 2.0,
    replay_share: float = 0.5,
    lr: float = 3e-3,
    seed: int = 0,
    min_cloud_confidence: float = 0.5,
    ood_percentile: float = 99.5,
    tolerance: float = 0.5,
    ece_tolerance: float = 0.01,
    steps: int = 200,
    holdout_share: float = 0.2,
    keep: int = 10,
    progress: Progress | None = None,
) -> EvolveOutcome:
    """Distil task ``task``'s escalation log into a new edge model, validate it and (unless
    ``dry_run`` or rejected) publish it into the task's model store with its recalibrated
    gate. ``tolerance``: accuracy points the new model may lose; ``ece_tolerance``: ECE it
    may gain. Classifier options: ``epochs`` … ``ood_percentile``; language-model options:
    ``steps``, ``holdout_share`` (of the log's pairs, when no held-out set is given).
    ``keep``: versions the store keeps after a publication (the current one always)."""
    policy_path = Path(policy_path)
    say = progress or (lambda _m: None)
    policy, tp = _task(policy_path, task)
    opts = {
        "log": None if log is None else Path(log),
        "train_data": None if train_data is None else Path(train_data),
        "holdout": holdout,
        "base": None if base is None else Path(base),
        "cloud_model": None if cloud_model is None else Path(cloud_model),
        "target": target,
        "dry_run": dry_run,
        "distil": {
            "epochs": epochs,
            "temperature": temperature,
            "replay_share": replay_share,
            "lr": lr,
            "seed": seed,
        },
        "min_cloud_confidence": min_cloud_confidence,
        "ood_percentile": ood_percentile,
        "tolerance": tolerance,
        "ece_tolerance": ece_tolerance,
        "steps": steps,
        "holdout_share": holdout_share,
        "keep": keep,
    }
    if tp.kind == "generate":
        return _evolve_generator(policy_path, policy, tp, task, opts, say)
    return _evolve_classifier(policy_path, policy, tp, task, opts, say)
