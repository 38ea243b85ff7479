"""Co-evolution for classifiers: distil the cloud's answers from the escalation log into a new
edge model, and say whether it is better than the one the edge runs.
(Over 500 lines: one job whose steps — graph conversion, row selection, distillation,
held-out metrics — share one set of array conventions; each step is a public function.)

The steps :func:`distil_classifier` takes (``tandem evolve`` composes them with the log, the
router's threshold search and the model store):

1. :func:`onnx_to_torch` turns the edge's fp32 ONNX graph (a plain MLP: ``Gemm``,
   ``MatMul`` + ``Add``, ``Relu``, ``Tanh``, ``Sigmoid``, ``Flatten``, ``Identity``) back into a
   ``torch.nn.Sequential`` with the same weights: the student starts where the edge is.
2. :func:`select_rows` leaves out the log rows the cloud itself was unsure of (its max
   probability below ``min_cloud_confidence``) and those that look out of distribution (the
   Mahalanobis distance of the student's penultimate features from the training data's, beyond
   the training data's own ``ood_percentile``).
3. :func:`distil` trains on the cloud's soft labels, ``KL(softmax(cloud/T) ||
   softmax(student/T)) · T²`` (Hinton et al. 2015), with a share of every batch replayed from
   the original training data (cross-entropy on its labels) so the model does not forget.
4. The student is exported to fp32 ONNX and quantized to int8 (the file the edge runs), and
   both the current and the new int8 model are scored on a held-out set
   (:func:`classifier_metrics`: accuracy, ECE, NLL); :func:`judge` rejects the new one when it
   is worse on accuracy or on calibration beyond the tolerances.

Arrays in, files and plain dicts out: nothing here reads the log or writes the store.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tandem.kernels.confidence import confidence_reference
from tandem.runtime.calibration import expected_calibration_error, fit_temperature
from tandem.runtime.errors import ConfigError

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

SUPPORTED_OPS = ("Gemm", "MatMul", "Add", "Relu", "Tanh", "Sigmoid", "Flatten", "Identity")
ECE_BINS = 15
# a 64-32-10 MLP: one thread is faster than two on a shared 2-core machine (no hand-off)
TRAIN_THREADS = 1
MAHALANOBIS_RIDGE = 1e-3  # added to the feature covariance's diagonal (dead ReLU units)


# ---------------------------------------------------------------------------- the edge graph
@dataclass(frozen=True)
class TorchMLP:
    """An ONNX MLP as torch: ``model`` maps (N, ``in_features``) to (N, C) scores; the names
    are the graph's, so the exported student is a drop-in replacement."""

    model: Any  # torch.nn.Sequential
    input_name: str
    output_name: str
    in_features: int


def onnx_to_torch(path: str | Path) -> TorchMLP:
    """The fp32 ONNX MLP at ``path`` as a ``torch.nn.Sequential`` with the same weights.

    Only a chain of :data:`SUPPORTED_OPS` whose weights are initializers converts; any other
    op (a convolution, an int8 ``MatMulInteger``) is a :class:`ConfigError` naming the op, the
    node and the file."""
    import onnx
    import torch
    from onnx import numpy_helper
    from torch import nn

    path = Path(path)
    try:
        graph = onnx.load(str(path)).graph
    except Exception as e:
        raise ConfigError(f"{path}: not a readable ONNX model ({e})") from None
    inits = {t.name: numpy_helper.to_array(t).astype(np.float32) for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1 or len(graph.output) < 1:
        raise ConfigError(f"{path}: expected one input and an output, got {len(inputs)} inputs")
    current = inputs[0].name
    layers: list[Any] = []
    in_features: int | None = None

    def refuse(node: Any, why: str) -> ConfigError:
        return ConfigError(
            f"{path}: node {node.name or '?'!r} (op {node.op_type}) {why}; tandem evolve "
            f"converts plain MLP graphs only ({', '.join(SUPPORTED_OPS)}): give the fp32 "
            "export of such a model with --base"
        )

    for node in graph.node:
        op, ins = node.op_type, list(node.input)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if op not in SUPPORTED_OPS:
            raise refuse(node, "is not supported")
        if current not in ins:
            raise refuse(node, f"does not read the chain's tensor {current!r}")
        if op in ("Gemm", "MatMul"):
            weight = inits.get(ins[1]) if len(ins) > 1 else None
            if ins[0] != current or weight is None or weight.ndim != 2:
                raise refuse(node, "has no 2-D weight initializer as its second input")
            if attrs.get("transA", 0):
                raise refuse(node, "has transA=1")
            w = weight if attrs.get("transB", 0) else weight.T  # (out, in)
            lin = nn.Linear(w.shape[1], w.shape[0])
            bias = np.zeros(w.shape[0], np.float32)
            if op == "Gemm" and len(ins) > 2 and ins[2]:
                if ins[2] not in inits:
                    raise refuse(node, "has a bias that is not an initializer")
                bias = np.array(np.broadcast_to(inits[ins[2]] * attrs.get("beta", 1.0), bias.shape))
            with torch.no_grad():
                lin.weight.copy_(
                    torch.from_numpy(np.ascontiguousarray(w * attrs.get("alpha", 1.0)))
                )
                lin.bias.copy_(torch.from_numpy(np.ascontiguousarray(bias, np.float32)))
            in_features = in_features or w.shape[1]
            layers.append(lin)
        elif op == "Add":
            other = ins[1] if ins[0] == current else ins[0]
            if not layers or not isinstance(layers[-1], nn.Linear) or other not in inits:
                raise refuse(node, "is not a bias added to a MatMul's output")
            b = inits[other].reshape(-1)
            if b.shape != tuple(layers[-1].bias.shape):
                raise refuse(node, f"adds a bias of shape {b.shape}")
            with torch.no_grad():
                layers[-1].bias.add_(torch.from_numpy(b))
        elif op == "Flatten":
            if attrs.get("axis", 1) != 1:
                raise refuse(node, "flattens on an axis other than 1")
            layers.append(nn.Flatten())
        else:
            act = {"Relu": nn.ReLU, "Tanh": nn.Tanh, "Sigmoid": nn.Sigmoid, "Identity": nn.Identity}
            layers.append(act[op]())
        current = node.output[0]
    if current != graph.output[0].name or in_features is None:
        raise ConfigError(f"{path}: the chain of supported ops does not end at the model output")
    return TorchMLP(
        nn.Sequential(*layers).eval(), inputs[0].name, graph.output[0].name, in_features
    )


def is_quantized(path: str | Path) -> bool:
    """True when the ONNX graph at ``path`` holds int8 ops (not a graph to train from)."""
    import onnx

    ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
    return bool(ops & {"MatMulInteger", "DynamicQuantizeLinear", "QLinearMatMul", "QuantizeLinear",
                       "DequantizeLinear", "ConvInteger", "QLinearConv"})  # fmt: skip


def export_onnx(mlp: TorchMLP, path: str | Path) -> Path:
    """Write ``mlp`` as fp32 ONNX (opset 17, dynamic batch) under its graph's names, with the
    TorchScript exporter (no onnxscript dependency, as the reference models)."""
    import torch

    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            mlp.model.eval(),
            (torch.zeros(1, mlp.in_features),),
            str(path),
            input_names=[mlp.input_name],
            output_names=[mlp.output_name],
            dynamic_axes={mlp.input_name: {0: "batch"}, mlp.output_name: {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    return path


# ---------------------------------------------------------------------------- log rows
class EscalationRow(Protocol):
    """What distillation reads of an escalation-log row
    (:class:`tandem.edge.escalation_log.EscalationRecord` has it)."""

    request_id: str
    input: np.ndarray | None
    cloud_output: np.ndarray | None


@dataclass(frozen=True)
class LogRows:
    """Rows that can be distilled: inputs (N, D) and the cloud's outputs (N, C), logits or
    probabilities. ``skipped``: rows of the task that could not be, by reason
    (``no_input``: logged with ``store_inputs: false``; ``no_cloud_answer``)."""

    request_ids: list[str]
    x: np.ndarray
    cloud: np.ndarray
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.request_ids)


def rows_from_log(records: Iterable[EscalationRow]) -> LogRows:
    """Gather the distillable rows of ``records`` (one task's), counting the rest."""
    ids, xs, cs = [], [], []
    skipped = {"no_input": 0, "no_cloud_answer": 0, "not_finite": 0}
    for r in records:
        if r.input is None:
            skipped["no_input"] += 1
        elif r.cloud_output is None:
            skipped["no_cloud_answer"] += 1
        elif not (np.isfinite(r.input).all() and np.isfinite(r.cloud_output).all()):
            skipped["not_finite"] += 1  # NaN/inf in the input or the cloud's answer
        else:
            ids.append(r.request_id)
            xs.append(np.asarray(r.input, np.float32).reshape(-1))
            cs.append(np.asarray(r.cloud_output, np.float32).reshape(-1))
    shapes = {(x.shape, c.shape) for x, c in zip(xs, cs, strict=True)}
    if len(shapes) > 1:
        raise ConfigError(f"escalation log: rows of one task have different shapes {shapes}")
    if not ids:
        return LogRows([], np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), skipped)
    return LogRows(ids, np.stack(xs), np.stack(cs), skipped)


def log_probs(out: np.ndarray) -> np.ndarray:
    """Log-probabilities of (N, C) model outputs: rows already probabilities (non-negative,
    summing to 1) are taken as such, anything else as logits."""
    out = np.asarray(out, np.float64)
    if out.size and out.min() >= 0 and np.allclose(out.sum(axis=1), 1.0, atol=1e-3):
        return np.log(np.clip(out, 1e-12, 1.0))
    z = out - out.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


# ---------------------------------------------------------------------------- row selection
@dataclass(frozen=True)
class Selection:
    """Which log rows distillation uses (``keep``) and why the others were left out."""

    keep: np.ndarray  # bool (N,)
    left_out: dict[str, int]
    ood_threshold: float | None  # Mahalanobis distance; None: no training data to compare


def penultimate(mlp: TorchMLP, x: np.ndarray) -> np.ndarray:
    """The student's features: the input of its last linear layer, for ``x``."""
    import torch
    from torch import nn

    layers = list(mlp.model)
    last = max(i for i, m in enumerate(layers) if isinstance(m, nn.Linear))
    with torch.no_grad():
        return nn.Sequential(*layers[:last])(torch.from_numpy(x)).numpy().astype(np.float64)


def select_rows(
    mlp: TorchMLP,
    rows: LogRows,
    *,
    train_x: np.ndarray | None,
    min_cloud_confidence: float = 0.5,
    ood_percentile: float = 99.5,
) -> Selection:
    """Leave out rows whose cloud max probability is below ``min_cloud_confidence`` and rows
    whose features lie further (Mahalanobis) from the training data's than
    ``ood_percentile`` % of the training data itself does (off without ``train_x``)."""
    cloud_p = np.exp(log_probs(rows.cloud)).max(axis=1)
    unsure = cloud_p < min_cloud_confidence
    ood = np.zeros(len(rows), bool)
    threshold = None
    if train_x is not None and len(rows) and ood_percentile < 100:
        ref = penultimate(mlp, train_x)
        mean = ref.mean(axis=0)
        cov = np.cov(ref, rowvar=False) + MAHALANOBIS_RIDGE * np.eye(ref.shape[1])
        prec = np.linalg.inv(cov)

        def dist(f: np.ndarray) -> np.ndarray:
            d = f - mean
            return np.sqrt(np.einsum("ij,jk,ik->i", d, prec, d))

        threshold = float(np.percentile(dist(ref), ood_percentile))
        ood = dist(penultimate(mlp, rows.x)) > threshold
    keep = ~unsure & ~ood
    left_out = {
        "cloud_unsure": int(unsure.sum()),
        "out_of_distribution": int((ood & ~unsure).sum()),
    }
    return Selection(keep, left_out, threshold)


# ---------------------------------------------------------------------------- distillation
@dataclass(frozen=True)
class DistilConfig:
    """How :func:`distil` trains. ``replay_share``: the share of every batch drawn from the
    original training data (0 without it); ``temperature``: T of the soft labels."""

    epochs: int = 60
    temperature: float = 2.0
    replay_share: float = 0.5
    lr: float = 3e-3
    weight_decay: float = 1e-4
    batch_size: int = 128
    seed: int = 0


def distil(
    mlp: TorchMLP,
    x: np.ndarray,
    teacher: np.ndarray,
    *,
    replay: tuple[np.ndarray, np.ndarray] | None,
    config: DistilConfig,
    progress: Progress | None = None,
) -> list[dict[str, float]]:
    """Train ``mlp.model`` in place on the cloud's outputs ``teacher`` for inputs ``x``
    (KL at temperature T, times T²), mixed with ``replay`` = (x, labels) batches; AdamW with a
    cosine schedule, on :data:`TRAIN_THREADS` torch threads. Returns the mean losses of every
    epoch."""
    import torch
    from torch.nn import functional as F

    say = progress or log.info
    if len(x) == 0:
        raise ConfigError("nothing to distil: no log row is left after selection")
    t = config.temperature
    share = config.replay_share if replay is not None and len(replay[0]) else 0.0
    n_rep = round(config.batch_size * share)
    n_log = max(1, config.batch_size - n_rep)
    steps_per_epoch = math.ceil(len(x) / n_log)
    gen = torch.Generator().manual_seed(config.seed)
    xs = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    soft_t = torch.softmax(torch.from_numpy(log_probs(teacher).astype(np.float32)) / t, dim=1)
    rx = ry = None
    if n_rep:
        assert replay is not None
        rx = torch.from_numpy(np.ascontiguousarray(replay[0], np.float32))
        ry = torch.from_numpy(np.asarray(replay[1], np.int64))
    model = mlp.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs * steps_per_epoch)
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    history = []
    try:
        for epoch in range(config.epochs):
            perm = torch.randperm(len(xs), generator=gen)
            sums = {"kl": 0.0, "replay_ce": 0.0}
            for i in range(0, len(xs), n_log):
                b = perm[i : i + n_log]
                student = F.log_softmax(model(xs[b]) / t, dim=1)
                kl = F.kl_div(student, soft_t[b], reduction="batchmean") * t * t
                loss = kl * (1 - share)
                if rx is not None and ry is not None:
                    r = torch.randint(len(rx), (n_rep,), generator=gen)
                    ce = F.cross_entropy(model(rx[r]), ry[r])
                    loss = loss + share * ce
                    sums["replay_ce"] += float(ce.detach())
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                sums["kl"] += float(kl.detach())
            means = {k: v / steps_per_epoch for k, v in sums.items()}
            history.append(means)
            say(
                f"epoch {epoch + 1}/{config.epochs}: KL·T² {means['kl']:.4f}"
                + (f", replay CE {means['replay_ce']:.4f}" if n_rep else "")
            )
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return history


# ---------------------------------------------------------------------------- validation
@dataclass(frozen=True)
class HoldoutMetrics:
    """A model's held-out figures: top-1 accuracy, expected calibration error (max-prob,
    :data:`ECE_BINS` equal-width bins) and mean negative log-likelihood (nats)."""

    accuracy: float
    ece: float  # after temperature scaling (cross-fitted)
    ece_raw: float  # at T = 1
    nll: float  # at T = 1
    n: int


def classifier_metrics(logits: np.ndarray, y: np.ndarray) -> HoldoutMetrics:
    """:class:`HoldoutMetrics` of (N, C) scores (logits or probabilities) against labels.
    ``ece`` is measured after temperature scaling, as the gate serves the model: cross-fitted
    (T fitted on one half of the rows, ECE measured on the other, and the other way round),
    so a model is not judged on a temperature fitted to the rows it is scored on;
    ``ece_raw`` at T = 1."""
    lp = log_probs(logits)
    y = np.asarray(y, np.int64)
    halves = np.array_split(np.random.default_rng(0).permutation(len(y)), 2)
    ece = 0.0
    for fit, score in (halves, halves[::-1]):
        t = fit_temperature(lp[fit], y[fit]) if len(fit) else 1.0
        z = lp[score] / t
        p = np.exp(z - z.max(axis=1, keepdims=True))
        ece += (
            len(score)
            / len(y)
            * expected_calibration_error(p / p.sum(1, keepdims=True), y[score], ECE_BINS)
        )
    return HoldoutMetrics(
        accuracy=float((lp.argmax(axis=1) == y).mean()),
        ece=ece,
        ece_raw=expected_calibration_error(np.exp(lp), y, ECE_BINS),
        nll=float(-lp[np.arange(len(y)), y].mean()),
        n=len(y),
    )


def onnx_outputs(path: str | Path, x: np.ndarray) -> np.ndarray:
    """The first output of the ONNX model at ``path`` for ``x`` (ONNX Runtime, CPU)."""
    from tandem.runtime.backends.onnx import OnnxBackend

    return np.asarray(OnnxBackend(path, threads=0).predict(np.ascontiguousarray(x, np.float32)))


def gate_scores(outputs: np.ndarray, metric: str, temperature: float = 1.0) -> np.ndarray:
    """The confidence gate's statistic of (N, C) outputs at ``temperature``, oriented so that
    higher is more confident (what :func:`tandem.router.calibrate.routing_curve` takes):
    ``max_prob``, ``margin``, or ``1 - entropy / log C`` for ``entropy``."""
    stats = confidence_reference((log_probs(outputs) / temperature).astype(np.float32))
    if metric == "max_prob":
        return stats.max_prob
    if metric == "margin":
        return stats.margin
    if metric == "entropy":
        return 1.0 - stats.entropy / math.log(np.shape(outputs)[1])
    raise ConfigError(f"gate metric: expected max_prob, margin or entropy, got {metric!r}")


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    reasons: list[str]


SIGNIFICANCE = 0.05  # a drop in held-out accuracy must be this unlikely by chance to reject


def worse(
    before_right: np.ndarray, after_right: np.ndarray, tolerance: float, what: str = "accuracy"
) -> str | None:
    """Why the new model is worse than the current one on the same held-out rows, or None.
    Worse: its accuracy is more than ``tolerance`` (a fraction) lower **and** a one-sided
    exact sign test on the rows where the two disagree puts the drop below
    :data:`SIGNIFICANCE` — so a few rows of a small held-out set flipping by chance do not
    reject a model (e.g. 2 of 70 is p 0.5), while a real drop does."""
    from scipy.stats import binomtest

    a, b = np.asarray(before_right, bool), np.asarray(after_right, bool)
    lost, won = int((a & ~b).sum()), int((~a & b).sum())
    drop = (lost - won) / max(1, len(a))
    if drop <= tolerance:
        return None
    p = binomtest(lost, lost + won, 0.5, alternative="greater").pvalue if lost + won else 1.0
    if p >= SIGNIFICANCE and tolerance >= 0:  # a negative tolerance demands a gain: as stated
        return None
    return (
        f"{what} {b.mean():.4f} is below the current model's {a.mean():.4f} by more than "
        f"{tolerance * 100:g} points ({lost} held-out rows lost, {won} won: p {p:.2g})"
    )


def judge(
    before: HoldoutMetrics,
    after: HoldoutMetrics,
    *,
    before_right: np.ndarray,
    after_right: np.ndarray,
    accuracy_tolerance: float = 0.005,
    ece_tolerance: float = 0.01,
) -> Verdict:
    """Reject ``after`` when it is :func:`worse` in accuracy (``before_right``/``after_right``:
    each held-out row right or not; ``accuracy_tolerance`` a fraction: 0.005 = half a point),
    or its ECE is more than ``ece_tolerance`` above ``before``'s."""
    reasons = []
    why = worse(before_right, after_right, accuracy_tolerance)
    if why is not None:
        reasons.append(why)
    if after.ece > before.ece + ece_tolerance:
        reasons.append(
            f"ECE {after.ece:.4f} is above the current model's {before.ece:.4f} by more than "
            f"{ece_tolerance:g}"
        )
    return Verdict(not reasons, reasons)


# ---------------------------------------------------------------------------- the whole job
@dataclass(frozen=True)
class Candidate:
    """A distilled model in ``folder``: ``fp32`` and ``int8`` ONNX files, the held-out logits
    of the current and new int8 models, and the report."""

    fp32: Path
    int8: Path
    keep: np.ndarray  # bool per log row: used for distillation
    current_logits: np.ndarray
    new_logits: np.ndarray
    verdict: Verdict
    report: dict[str, Any]


def distil_classifier(
    base_fp32: str | Path,
    current_model: str | Path,
    rows: LogRows,
    *,
    holdout: tuple[np.ndarray, np.ndarray],
    train: tuple[np.ndarray, np.ndarray] | None,
    folder: str | Path,
    config: DistilConfig = DistilConfig(),
    min_cloud_confidence: float = 0.5,
    ood_percentile: float = 99.5,
    accuracy_tolerance: float = 0.005,
    ece_tolerance: float = 0.01,
    progress: Progress | None = None,
) -> Candidate:
    """Distil ``rows`` into the MLP of ``base_fp32`` (with ``train`` replayed), export it to
    ``folder`` as fp32 and int8 ONNX, and judge the int8 model against ``current_model`` (the
    file the edge runs now) on ``holdout`` = (x, labels)."""
    from tandem.runtime.quantize import quantize_onnx

    say = progress or log.info
    folder = Path(folder)
    t0 = time.perf_counter()
    mlp = onnx_to_torch(base_fp32)
    if not len(rows):
        raise ConfigError(f"nothing to distil: the log holds no row with an input and a cloud "
                          f"answer (skipped: {rows.skipped})")  # fmt: skip
    if rows.x.shape[1] != mlp.in_features:
        raise ConfigError(
            f"{base_fp32}: the model takes {mlp.in_features} features, the log rows hold "
            f"{rows.x.shape[1]}"
        )
    sel = select_rows(
        mlp, rows, train_x=None if train is None else train[0],
        min_cloud_confidence=min_cloud_confidence, ood_percentile=ood_percentile,
    )  # fmt: skip
    used = int(sel.keep.sum())
    say(f"distilling {used} log rows ({', '.join(f'{k}: {v}' for k, v in sel.left_out.items())}"
        f" left out; replay {'on' if train is not None else 'off'})")  # fmt: skip
    losses = distil(
        mlp, rows.x[sel.keep], rows.cloud[sel.keep], replay=train, config=config, progress=say
    )
    fp32 = export_onnx(mlp, folder / "fp32.onnx")
    int8 = folder / "model.onnx"
    quantize_onnx(fp32, int8)
    hx, hy = holdout
    cur_logits, new_logits = onnx_outputs(current_model, hx), onnx_outputs(int8, hx)
    before, after = classifier_metrics(cur_logits, hy), classifier_metrics(new_logits, hy)
    verdict = judge(
        before, after, before_right=cur_logits.argmax(1) == hy,
        after_right=new_logits.argmax(1) == hy, accuracy_tolerance=accuracy_tolerance,
        ece_tolerance=ece_tolerance,
    )  # fmt: skip
    report = {
        "rows": {
            "used": used,
            "skipped": dict(rows.skipped),
            "left_out": sel.left_out,
            "ood_threshold": sel.ood_threshold,
            "replay_rows": 0 if train is None else len(train[0]),
        },
        "distil": {**asdict(config), "losses": losses},
        "holdout": {"rows": len(hy), "before": asdict(before), "after": asdict(after)},
        "verdict": asdict(verdict),
        "seconds": time.perf_counter() - t0,
    }
    return Candidate(fp32, int8, sel.keep, cur_logits, new_logits, verdict, report)


def sha256_ids(ids: Sequence[str]) -> str:
    """The provenance digest of the rows used: sha256 over the request ids, newline-joined."""
    import hashlib

    return hashlib.sha256("\n".join(ids).encode()).hexdigest()
