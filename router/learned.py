"""Learned routers: a small model that predicts whether escalating will fix the edge's answer.
(Over 500 lines: the features exist three times — numpy for training, a jitted row kernel,
the ONNX graph — and must change together; training and the comparison that judges them sit
beside them. Splitting off fit/compare into ``learned_train.py`` would be the first cut.)

Training target per request: *benefit* = the edge is wrong and the cloud is right (from the
escalation log, where the cloud's label is the ground truth: the two labels differ). The
router's score is P(the edge's answer stands) = 1 - P(benefit) in [0, 1], and a request is
accepted when the score is >= the threshold: the convention of the ``max_prob`` gate, so
:mod:`tandem.router.calibrate` (``routing_curve``, ``pick_threshold``,
``escalation_for_recovery``) applies unchanged.

A router is one ONNX file. For a classifier it takes the edge model's raw logits (N, C), and
the hidden embedding (N, H) when it uses one, and computes its features inside the graph
(:data:`CLASSIFY_FEATURES`): top-k softmax probabilities, margin, normalised entropy, top-k
log-probabilities, log-sum-exp, optionally every class's log-probability; these are
standardised and go through logistic regression or a one-hidden-layer MLP. For a language
model it takes :func:`token_features` (N, 6) of the probe's token log-probabilities. The
file's ``metadata_props`` hold the feature spec (JSON), a version and the training provenance.

The edge scores one row per request, and the routing budget is p99 < 20 µs a row: an ONNX
Runtime ``run`` costs more than that from Python, so :meth:`LearnedRouter.score_row` evaluates
the same graph from its initializers in a jitted function (tested against ONNX Runtime);
:meth:`LearnedRouter.score_batch` runs ONNX Runtime. Rows holding NaN or +inf (or no finite
logit) score NaN and are never accepted.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numba
import numpy as np

from tandem.runtime.errors import ConfigError

ROUTER_FORMAT = 1  # bump when the graph layout or the feature definitions change
OPSET = 17
LOGP_FLOOR = -30.0  # log-probabilities are clipped here, so exp(-inf) * -inf never makes NaN
LSE_CLIP = 1e4  # |log-sum-exp of the logits| is clipped here
META_FORMAT = "tandem.router.format"
META_SPEC = "tandem.router.spec"
META_VERSION = "tandem.router.version"
META_PROVENANCE = "tandem.router.provenance"
CLASSIFY_FEATURES = ("p_top", "margin", "entropy", "logp_top", "logsumexp")
TOKEN_FEATURES = (
    "token_mean",  # mean token log-prob
    "token_min",  # lowest token log-prob
    "token_quantile",  # the spec's quantile of the token log-probs
    "first_entropy",  # first token's entropy / log(n_vocab); 0 when unknown
    "has_first_entropy",  # 1 when the first entropy is known
    "log_length",  # log(1 + probe tokens)
)
# weights in the graph: standardisation, then layer 0 (and layer 1 for an MLP)
_W = ("router_mean", "router_inv_std", "router_w0", "router_b0", "router_w1", "router_b1")


@dataclass(frozen=True)
class FeatureSpec:
    """What a router reads. ``kind``: ``classify`` (logits rows) or ``generate`` (token
    statistics). ``top_k``: sorted probabilities and log-probabilities kept; ``uses_logits``:
    also every class's log-probability in class order (lets the router learn classes the edge
    gets wrong); ``uses_hidden``: also the edge model's hidden vector (``hidden_tensor`` of the
    edge ONNX graph, ``hidden_dim`` wide; see :func:`expose_hidden`)."""

    kind: Literal["classify", "generate"] = "classify"
    n_classes: int = 0
    top_k: int = 3
    uses_logits: bool = False
    uses_hidden: bool = False
    hidden_dim: int = 0
    hidden_tensor: str | None = None
    token_quantile: float = 0.1

    def __post_init__(self) -> None:
        if self.kind == "classify":
            if self.n_classes < 2:
                raise ValueError(f"a classify router needs n_classes >= 2, got {self.n_classes}")
            if not 1 <= self.top_k <= self.n_classes:
                raise ValueError(f"top_k must be in 1..{self.n_classes}, got {self.top_k}")
            if self.uses_hidden != (self.hidden_dim > 0):
                raise ValueError("uses_hidden needs hidden_dim > 0, and hidden_dim needs it")
        elif self.kind == "generate":
            if self.uses_hidden or self.uses_logits:
                raise ValueError("a generate router reads token statistics only")
            if not 0.0 <= self.token_quantile <= 1.0:
                raise ValueError("token_quantile must be in [0, 1]")
        else:
            raise ValueError(f"kind must be 'classify' or 'generate', got {self.kind!r}")

    @property
    def n_features(self) -> int:
        if self.kind == "generate":
            return len(TOKEN_FEATURES)
        return 2 * self.top_k + 3 + self.n_classes * self.uses_logits + self.hidden_dim

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FeatureSpec:
        return cls(**json.loads(text))


# ---------------------------------------------------------------------------- features (numpy)
def invalid_rows(logits: np.ndarray) -> np.ndarray:
    """(N,) bool: rows holding NaN or +inf, or no finite logit (as the confidence kernel)."""
    x = np.asarray(logits)
    return np.isnan(x).any(1) | np.isposinf(x).any(1) | np.isneginf(x).all(1)


def classify_features(
    logits: np.ndarray, spec: FeatureSpec, hidden: np.ndarray | None = None
) -> np.ndarray:
    """(N, F) float64 features of (N, C) logits, in the order the ONNX graph builds them;
    invalid rows (see :func:`invalid_rows`, or a non-finite hidden vector) are all NaN. With
    C = 3, top_k = 1: ``[[2, 1, 0]]`` gives p_top 0.665, margin 0.421, entropy 0.758 (0.832 nats
    / log 3), logp_top -0.408, logsumexp 2.408."""
    x = np.atleast_2d(np.asarray(logits, dtype=np.float64))
    if x.shape[1] != spec.n_classes:
        raise ValueError(f"the router reads {spec.n_classes} classes, got logits {x.shape}")
    bad = invalid_rows(x)
    parts_h: list[np.ndarray] = []
    if spec.uses_hidden:
        if hidden is None:
            raise ValueError("this router reads the edge model's hidden vector: pass hidden")
        h = np.atleast_2d(np.asarray(hidden, dtype=np.float64))
        if h.shape != (len(x), spec.hidden_dim):
            raise ValueError(f"hidden must be ({len(x)}, {spec.hidden_dim}), got {h.shape}")
        bad = bad | ~np.isfinite(h).all(1)
        parts_h = [np.where(bad[:, None], 0.0, h)]
    x = np.where(bad[:, None], 0.0, x)
    m = x.max(1, keepdims=True)
    lse = m + np.log(np.exp(x - m).sum(1, keepdims=True))
    lp = x - lse
    p = np.exp(lp)
    lpc = np.maximum(lp, LOGP_FLOOR)
    p_sorted = -np.sort(-p, axis=1)
    k = spec.top_k
    parts = [
        p_sorted[:, :k],
        p_sorted[:, :1] - p_sorted[:, 1:2],
        -(p * lpc).sum(1, keepdims=True) / math.log(spec.n_classes),
        -np.sort(-lpc, axis=1)[:, :k],
        np.clip(lse, -LSE_CLIP, LSE_CLIP),
    ]
    if spec.uses_logits:
        parts.append(lpc)
    f = np.concatenate(parts + parts_h, axis=1)
    f[bad] = np.nan
    return f


def token_features(
    logprobs: Any, first_entropy: float | None = None, n_vocab: int = 0, quantile: float = 0.1
) -> np.ndarray:
    """(6,) features of a probe (see :data:`TOKEN_FEATURES`): log-probs clipped at
    :data:`LOGP_FLOOR`; a probe with no tokens reads 0 for the three log-prob statistics (the
    model ended at once: nothing to doubt). E.g. ``token_features([-0.1, -2.0], 1.0, 100)`` is
    mean -1.05, min -2.0, 10% quantile -1.81, entropy 1/log(100) = 0.217, 1, log(3) = 1.099.
    Any NaN log-prob makes every feature NaN (never accepted)."""
    lp = np.maximum(np.asarray(logprobs, dtype=np.float64).reshape(-1), LOGP_FLOOR)
    if np.isnan(lp).any():
        return np.full(len(TOKEN_FEATURES), np.nan)
    has_h = first_entropy is not None and n_vocab >= 2 and math.isfinite(first_entropy)
    stats = (lp.mean(), lp.min(), np.quantile(lp, quantile)) if len(lp) else (0.0, 0.0, 0.0)
    return np.array(
        [
            *stats,
            first_entropy / math.log(n_vocab) if has_h else 0.0,  # type: ignore[operator]
            float(has_h),
            math.log1p(len(lp)),
        ]
    )


# ---------------------------------------------------------------------------- the row kernel
@numba.njit(cache=True, nogil=True)
def _mlp_score(f, mean, inv_std, w0, b0, w1, b1, two_layers):  # pragma: no cover - jitted
    """sigmoid(-z) of standardised features ``f`` through one or two dense layers."""
    n_f, n_h = w0.shape
    z = 0.0
    if two_layers:
        for j in range(n_h):
            a = b0[j]
            for i in range(n_f):
                a += (f[i] - mean[i]) * inv_std[i] * w0[i, j]
            if a > 0.0:
                z += a * w1[j, 0]
        z += b1[0]
    else:
        z = b0[0]
        for i in range(n_f):
            z += (f[i] - mean[i]) * inv_std[i] * w0[i, 0]
    z = min(max(z, -700.0), 700.0)
    return 1.0 / (1.0 + math.exp(z))


@numba.njit(cache=True, nogil=True)
def _classify_row_score(
    row, hidden, k, uses_logits, mean, inv_std, w0, b0, w1, b1, two_layers
):  # pragma: no cover - jitted
    """The router's score of one logits row (and hidden vector; empty when unused):
    :func:`classify_features` then :func:`_mlp_score`."""
    f = np.empty(mean.shape[0])
    c = row.shape[0]
    m = -math.inf
    for j in range(c):
        x = row[j]
        if not x < math.inf:  # NaN or +inf
            return math.nan
        m = max(m, x)
    if m == -math.inf:
        return math.nan
    for j in range(hidden.shape[0]):
        if not math.isfinite(hidden[j]):
            return math.nan
    s = 0.0
    for j in range(c):
        s += math.exp(row[j] - m)
    lse = m + math.log(s)
    ent = 0.0
    for j in range(c):
        lp = row[j] - lse
        ent -= math.exp(lp) * max(lp, LOGP_FLOOR)
    # top-k (at least the top 2, for the margin) by repeated selection: k is small
    base = k + 2 + k + 1
    if uses_logits:
        for j in range(c):
            f[base + j] = max(row[j] - lse, LOGP_FLOOR)
        base += c
    for j in range(hidden.shape[0]):
        f[base + j] = hidden[j]
    prev_v = math.inf
    prev_i = -1
    p1 = 0.0
    for t in range(max(k, 2)):
        best_v = -math.inf
        best_i = -1
        for j in range(c):  # the largest after (prev_v, prev_i) in (value desc, index asc)
            v = row[j]
            if (v < prev_v or (v == prev_v and j > prev_i)) and (best_i < 0 or v > best_v):
                best_v = v
                best_i = j
        lp = best_v - lse
        p = math.exp(lp)
        if t == 0:
            p1 = p
        elif t == 1:
            f[k] = p1 - p
        if t < k:
            f[t] = p
            f[k + 2 + t] = max(lp, LOGP_FLOOR)
        prev_v, prev_i = best_v, best_i
    f[k + 1] = ent / math.log(c)
    f[k + 2 + k] = min(max(lse, -LSE_CLIP), LSE_CLIP)
    return _mlp_score(f, mean, inv_std, w0, b0, w1, b1, two_layers)


# ---------------------------------------------------------------------------- the weights
@dataclass(frozen=True)
class RouterWeights:
    """A trained router in the graph's layout: ``mean``/``inv_std`` standardise the (F,)
    features; ``layers`` are (W (in, out), b (out,)) with ReLU between; the last layer's one
    output is the logit of P(benefit)."""

    mean: np.ndarray
    inv_std: np.ndarray
    layers: tuple[tuple[np.ndarray, np.ndarray], ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.layers) <= 2 or self.layers[-1][0].shape[1] != 1:
            raise ValueError("a router has one or two dense layers ending in one output")

    def scores(self, features: np.ndarray) -> np.ndarray:
        """(N,) P(edge stands) of (N, F) features in float64 (NaN rows stay NaN)."""
        a = (np.asarray(features, np.float64) - self.mean) * self.inv_std
        for i, (w, b) in enumerate(self.layers):
            a = a @ w + b
            if i < len(self.layers) - 1:
                a = np.maximum(a, 0.0)
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + np.exp(np.clip(a[:, 0], -700, 700)))

    def digest(self) -> str:
        h = hashlib.sha256()
        for a in (self.mean, self.inv_std, *(t for layer in self.layers for t in layer)):
            h.update(np.ascontiguousarray(a, np.float32).tobytes())
        return h.hexdigest()


# ---------------------------------------------------------------------------- training
@dataclass
class FittedRouter:
    """The outcome of :func:`fit_router`: the weights, which candidate won and by how much
    (``candidates``: name -> validation AUROC of the score against benefit), and the fitted
    scikit-learn estimator (on standardised features) the weights came from."""

    weights: RouterWeights
    model: str
    candidates: dict[str, float]
    rows: int
    estimator: Any = field(repr=False, default=None)


def _candidates(model: str, seed: int) -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    out: dict[str, Any] = {}
    if model in ("auto", "logistic"):
        for c in (0.1, 1.0, 10.0):
            out[f"logistic(C={c:g})"] = LogisticRegression(C=c, max_iter=2000)
    if model in ("auto", "mlp"):
        for width, alpha in ((16, 0.1), (32, 0.01)):
            out[f"mlp({width}, alpha={alpha:g})"] = MLPClassifier(
                (width,), alpha=alpha, max_iter=200, random_state=seed
            )
    if not out:
        raise ValueError(f"model must be auto, logistic or mlp, got {model!r}")
    return out


def _weights(est: Any, mean: np.ndarray, inv_std: np.ndarray) -> RouterWeights:
    if hasattr(est, "coefs_"):  # MLPClassifier: relu hidden layers, logistic output
        if est.activation != "relu" or len(est.coefs_) != 2:
            raise ValueError("the router graph takes one ReLU hidden layer")
        layers = tuple(
            (w.astype(np.float64), b.astype(np.float64))
            for w, b in zip(est.coefs_, est.intercepts_, strict=True)
        )
    else:
        layers = ((est.coef_.T.astype(np.float64), est.intercept_.astype(np.float64)),)
    return RouterWeights(mean, inv_std, layers)


def _auroc(scores: np.ndarray, benefit: np.ndarray) -> float:
    """AUROC of ``-scores`` as a detector of ``benefit`` (NaN scores rank as least sure);
    NaN when only one class is present."""
    from sklearn.metrics import roc_auc_score

    b = np.asarray(benefit, bool)
    if b.all() or not b.any():
        return math.nan
    s = np.nan_to_num(np.asarray(scores, np.float64), nan=-np.inf)
    return float(roc_auc_score(b, -np.clip(s, -1e300, 1e300)))


def fit_router(
    features: np.ndarray,
    benefit: np.ndarray,
    *,
    model: Literal["auto", "logistic", "mlp"] = "auto",
    validation_share: float = 0.25,
    seed: int = 0,
) -> FittedRouter:
    """Fit a router on (N, F) features and (N,) benefit labels. The candidates (logistic
    regression at three strengths; with ``model`` auto or mlp, one-hidden-layer MLPs) are
    compared by AUROC on a stratified ``validation_share`` of the rows, and the best is refit
    on every row (logistic regression wins ties). Rows with NaN features are left out.
    :class:`ValueError` when fewer than 4 rows of either class remain."""
    f = np.asarray(features, np.float64)
    b = np.asarray(benefit, bool)
    keep = np.isfinite(f).all(1)
    f, b = f[keep], b[keep]
    pos = int(b.sum())
    if min(pos, len(b) - pos) < 4:
        raise ValueError(
            f"need at least 4 rows where escalating helped and 4 where it did not; "
            f"got {pos} and {len(b) - pos}"
        )
    mean = f.mean(0)
    sd = f.std(0)
    inv_std = np.where(sd > 1e-12, 1.0 / np.where(sd > 1e-12, sd, 1.0), 1.0)
    z = (f - mean) * inv_std
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split

    i_fit, i_val = train_test_split(
        np.arange(len(b)), test_size=validation_share, stratify=b, random_state=seed
    )
    cands = _candidates(model, seed)
    scores: dict[str, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for name, est in cands.items():
            est.fit(z[i_fit], b[i_fit])
            scores[name] = _auroc(est.predict_proba(z[i_val])[:, 0], b[i_val])
        best = max(scores, key=lambda n: (np.nan_to_num(scores[n], nan=-1.0), n.startswith("l")))
        est = cands[best]
        est.fit(z, b)
    return FittedRouter(_weights(est, mean, inv_std), best, scores, len(b), est)


def data_digest(*arrays: np.ndarray | None) -> str:
    """sha256 over the arrays a router was trained on (dtype, shape and bytes of each)."""
    h = hashlib.sha256()
    for a in arrays:
        if a is None:
            h.update(b"none")
            continue
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------- ONNX export
def _graph(spec: FeatureSpec, w: RouterWeights) -> Any:
    from onnx import TensorProto, helper, numpy_helper

    f32 = TensorProto.FLOAT
    nodes: list[Any] = []
    inits = [
        numpy_helper.from_array(np.asarray(a, np.float32), name)
        for name, a in zip(
            _W, (w.mean, w.inv_std, *(t for layer in w.layers for t in layer)), strict=False
        )
    ]

    def const(name: str, value: Any, dtype: Any = np.float32) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def node(op: str, inputs: list[str], out: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def any_true(mask: str, out: str) -> str:  # (N, K) bool -> (N,) float, 1 where any
        return node(
            "ReduceMax", [node("Cast", [mask], f"{out}_f", to=f32)], out, axes=[1], keepdims=0
        )

    if spec.kind == "classify":
        c, k = spec.n_classes, spec.top_k
        inputs = [helper.make_tensor_value_info("logits", f32, ["N", c])]
        x = "logits"
        lsm = node("LogSoftmax", [x], "logp", axis=1)
        p = node("Exp", [lsm], "p")
        lpc = node("Max", [lsm, const("logp_floor", LOGP_FLOOR)], "logp_clipped")
        nodes.append(
            helper.make_node(
                "TopK", [p, const("k2", [max(k, 2)], np.int64)], ["p_sorted", "p_idx"], axis=1
            )
        )
        nodes.append(
            helper.make_node(
                "TopK", [lpc, const("k", [k], np.int64)], ["logp_top", "lp_idx"], axis=1
            )
        )
        zero, one, two = (const(f"i{i}", [i], np.int64) for i in (0, 1, 2))
        ax = const("axis1", [1], np.int64)
        p_top = node("Slice", ["p_sorted", zero, const("kk", [k], np.int64), ax], "p_top")
        margin = node(
            "Sub",
            [
                node("Slice", ["p_sorted", zero, one, ax], "p1"),
                node("Slice", ["p_sorted", one, two, ax], "p2"),
            ],
            "margin",
        )
        plogp = node("ReduceSum", [node("Mul", [p, lpc], "plogp"), ax], "sum_plogp", keepdims=1)
        ent = node("Mul", [plogp, const("neg_inv_logc", -1.0 / math.log(c))], "entropy")
        lse = node(
            "Sub",
            [
                node("ReduceMax", [x], "max_logit", axes=[1], keepdims=1),
                node("ReduceMax", [lsm], "max_logp", axes=[1], keepdims=1),
            ],
            "lse",
        )
        lse = node("Clip", [lse, const("lse_lo", -LSE_CLIP), const("lse_hi", LSE_CLIP)], "lse_c")
        parts = [p_top, margin, ent, "logp_top", lse] + ([lpc] if spec.uses_logits else [])
        bad_nan_inf = any_true(
            node(
                "Or",
                [node("IsNaN", [x], "isnan"), node("IsInf", [x], "isposinf", detect_negative=0)],
                "nan_or_posinf",
            ),
            "bad_any",
        )
        all_neginf = node(
            "ReduceMin",
            [node("Cast", [node("IsInf", [x], "isneginf", detect_positive=0)], "neginf_f", to=f32)],
            "bad_all",
            axes=[1],
            keepdims=0,
        )
        bad = node("Add", [bad_nan_inf, all_neginf], "bad_sum")
        if spec.uses_hidden:
            inputs.append(helper.make_tensor_value_info("hidden", f32, ["N", spec.hidden_dim]))
            parts.append("hidden")
            h_bad = any_true(
                node(
                    "Or",
                    [node("IsNaN", ["hidden"], "h_isnan"), node("IsInf", ["hidden"], "h_isinf")],
                    "h_nonfinite",
                ),
                "h_bad",
            )
            bad = node("Add", [bad, h_bad], "bad_sum_h")
        feats = node("Concat", parts, "features", axis=1)
    else:
        inputs = [helper.make_tensor_value_info("token_features", f32, ["N", spec.n_features])]
        feats = "token_features"
        bad = any_true(node("IsNaN", [feats], "t_isnan"), "bad_sum")
    a = node("Mul", [node("Sub", [feats, _W[0]], "centred"), _W[1]], "standardised")
    a = node("Gemm", [a, _W[2], _W[3]], "layer0")
    if len(w.layers) == 2:
        a = node("Gemm", [node("Relu", [a], "hidden0"), _W[4], _W[5]], "layer1")
    score = node("Sigmoid", [node("Neg", [a], "neg_logit")], "p_stand_2d")
    score = node(
        "Squeeze",
        [score, ax if spec.kind == "classify" else const("axis1", [1], np.int64)],
        "p_stand_raw",
    )
    is_bad = node("Greater", [bad, const("zero_f", 0.0)], "invalid")
    node("Where", [is_bad, const("nan", np.nan), score], "p_stand")
    out = [helper.make_tensor_value_info("p_stand", f32, ["N"])]
    return helper.make_graph(nodes, "tandem_router", inputs, out, inits)


def export_router(
    fitted: FittedRouter | RouterWeights,
    spec: FeatureSpec,
    path: str | Path,
    *,
    provenance: dict[str, Any] | None = None,
) -> str:
    """Write the router to ``path`` as ONNX (opset :data:`OPSET`) with its spec, version and
    ``provenance`` (data source and digest, rows, date, model...) in ``metadata_props``;
    check that ONNX Runtime loads it and return its version (``r1-`` + 12 hex digits of the
    weights' digest)."""
    import onnx
    from onnx import helper

    w = fitted.weights if isinstance(fitted, FittedRouter) else fitted
    if len(w.mean) != spec.n_features:
        raise ValueError(f"weights take {len(w.mean)} features, the spec {spec.n_features}")
    version = f"r{ROUTER_FORMAT}-{w.digest()[:12]}"
    prov = {"date": datetime.now(UTC).isoformat(timespec="seconds"), **(provenance or {})}
    if isinstance(fitted, FittedRouter):
        prov.setdefault("model", fitted.model)
        prov.setdefault("rows", fitted.rows)
        prov.setdefault("validation_auroc", fitted.candidates)
    m = helper.make_model(
        _graph(spec, w),
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="tandem",
        doc_string="Tandem learned router: P(the edge's answer stands) per row",
    )
    m.ir_version = 8
    helper.set_model_props(
        m,
        {
            META_FORMAT: str(ROUTER_FORMAT),
            META_SPEC: spec.to_json(),
            META_VERSION: version,
            META_PROVENANCE: json.dumps(prov, sort_keys=True, default=str),
        },
    )
    onnx.checker.check_model(m, full_check=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(m.SerializeToString())
    load_router(tmp)  # refuses a file it could not serve
    tmp.replace(path)
    return version


# ---------------------------------------------------------------------------- the runtime
class LearnedRouter:
    """A router file loaded for serving: :meth:`score_row` (one request, jitted from the
    graph's initializers), :meth:`score_batch` (ONNX Runtime), :meth:`score_tokens`
    (language models). Thread-safe. Accept a request when its score is >= the threshold."""

    def __init__(self, path: Path, model: Any, threads: int = 1) -> None:
        import onnxruntime as ort
        from onnx import numpy_helper

        self.path = path
        meta = {p.key: p.value for p in model.metadata_props}
        if meta.get(META_FORMAT) != str(ROUTER_FORMAT) or META_SPEC not in meta:
            raise ConfigError(
                f"{path}: not a Tandem router of format {ROUTER_FORMAT} (metadata "
                f"{META_FORMAT!r} is {meta.get(META_FORMAT)!r}); train one with "
                f"`tandem router train`"
            )
        try:
            self.spec = FeatureSpec.from_json(meta[META_SPEC])
            self.provenance: dict[str, Any] = json.loads(meta.get(META_PROVENANCE, "{}"))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{path}: bad router metadata {META_SPEC!r}: {e}") from None
        self.version = meta.get(META_VERSION, "?")
        w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
        n_f = self.spec.n_features
        two = _W[4] in w
        shapes_ok = (
            all(n in w for n in _W[:4])
            and w[_W[0]].shape == w[_W[1]].shape == (n_f,)
            and w[_W[2]].shape[0] == n_f
            and w[_W[3]].shape == w[_W[2]].shape[1:]
            and (not two or (w[_W[4]].shape == (w[_W[2]].shape[1], 1) and w[_W[5]].shape == (1,)))
            and (two or w[_W[2]].shape[1] == 1)
        )
        if not shapes_ok:
            raise ConfigError(
                f"{path}: router weights do not match its spec ({n_f} features: "
                f"{', '.join(f'{n}{w[n].shape}' for n in _W if n in w)})"
            )
        self._w = (
            w[_W[0]],
            w[_W[1]],
            w[_W[2]],
            w[_W[3]],
            w[_W[4]] if two else np.zeros((1, 1)),
            w[_W[5]] if two else np.zeros(1),
            two,
        )
        self.weights = RouterWeights(
            w[_W[0]],
            w[_W[1]],
            ((w[_W[2]], w[_W[3]]),) + (((w[_W[4]], w[_W[5]]),) if two else ()),
        )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as e:
            raise ConfigError(f"{path}: ONNX Runtime cannot load this router: {e}") from None
        self._input_names = [i.name for i in self.session.get_inputs()]
        self._no_hidden = np.zeros(0, np.float32)
        self._row_args = (self.spec.top_k, self.spec.uses_logits, *self._w)
        self.warm_up()

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def n_classes(self) -> int:
        return self.spec.n_classes

    @property
    def uses_hidden(self) -> bool:
        return self.spec.uses_hidden

    def check_classes(self, n_classes: int, *, task: str) -> None:
        """:class:`ConfigError` naming the file when the edge model has another class count."""
        if self.kind != "classify" or n_classes != self.n_classes:
            raise ConfigError(
                f"task {task!r}: router {self.path} was trained for a {self.kind} model with "
                f"{self.n_classes} classes; this model has {n_classes}"
            )

    def warm_up(self) -> None:
        """Compile the row kernel and run ONNX Runtime once, off the request path."""
        if self.kind == "classify":
            row = np.zeros(self.n_classes, np.float32)
            h = np.zeros(self.spec.hidden_dim, np.float32) if self.uses_hidden else None
            self.score_row(row, h)
            self.score_batch(row[None], None if h is None else h[None])
        else:
            self.score_tokens([-0.5], 1.0, 100)

    def score_row(self, logits_row: np.ndarray, hidden_row: np.ndarray | None = None) -> float:
        """P(the edge's answer stands) for one (C,) logits row (and (H,) hidden vector when
        the router uses one); NaN for an invalid row. About 1 µs (jitted)."""
        if logits_row.shape != (self.spec.n_classes,):
            raise ValueError(
                f"router {self.path.name}: expected ({self.n_classes},) logits, "
                f"got {logits_row.shape}"
            )
        if self.uses_hidden:
            if hidden_row is None or hidden_row.shape != (self.spec.hidden_dim,):
                raise ValueError(
                    f"router {self.path.name} reads a ({self.spec.hidden_dim},) "
                    f"hidden vector, got {getattr(hidden_row, 'shape', None)}"
                )
        else:
            hidden_row = self._no_hidden
        return _classify_row_score(logits_row, hidden_row, *self._row_args)

    def score_batch(self, logits: np.ndarray, hidden: np.ndarray | None = None) -> np.ndarray:
        """(N,) scores of (N, C) logits (and (N, H) hidden) in ONNX Runtime, float64."""
        if self.kind != "classify":
            raise ValueError(f"router {self.path.name} scores token statistics: score_tokens")
        x = np.ascontiguousarray(logits, np.float32)
        if x.ndim != 2 or x.shape[1] != self.spec.n_classes:
            raise ValueError(
                f"router {self.path.name}: expected (N, {self.n_classes}) logits, got {x.shape}"
            )
        feeds = {"logits": x}
        if self.uses_hidden:
            if hidden is None or hidden.shape != (len(x), self.spec.hidden_dim):
                raise ValueError(
                    f"router {self.path.name} reads (N, {self.spec.hidden_dim}) "
                    f"hidden vectors, got {getattr(hidden, 'shape', None)}"
                )
            feeds["hidden"] = np.ascontiguousarray(hidden, np.float32)
        return self.session.run(None, feeds)[0].astype(np.float64)

    def score_batch_reference(
        self, logits: np.ndarray, hidden: np.ndarray | None = None
    ) -> np.ndarray:
        """:meth:`score_batch` in numpy float64 from the graph's initializers (the test
        reference for both the jitted row path and ONNX Runtime)."""
        return self.weights.scores(classify_features(logits, self.spec, hidden))

    def score_tokens(
        self, logprobs: Any, first_entropy: float | None = None, n_vocab: int = 0
    ) -> float:
        """P(the edge's answer stands) from a probe's token log-probs (a generate router)."""
        if self.kind != "generate":
            raise ValueError(f"router {self.path.name} scores classifier logits: score_row")
        f = token_features(logprobs, first_entropy, n_vocab, self.spec.token_quantile)
        if np.isnan(f).any():
            return math.nan
        return _mlp_score(f, *self._w)

    def score_token_features(self, features: np.ndarray) -> np.ndarray:
        """(N,) scores of (N, 6) :func:`token_features` rows, in ONNX Runtime."""
        x = np.ascontiguousarray(features, np.float32)
        return self.session.run(None, {"token_features": x})[0].astype(np.float64)


def load_router(
    path: str | Path, *, n_classes: int | None = None, threads: int = 1
) -> LearnedRouter:
    """Load a router file; :class:`ConfigError` naming the file when it is missing, not a
    Tandem router, inconsistent, or (with ``n_classes``) made for another class count."""
    import onnx

    p = Path(path)
    try:
        model = onnx.load(p)
    except FileNotFoundError:
        raise ConfigError(f"{p}: router file not found") from None
    except Exception as e:
        raise ConfigError(f"{p}: not an ONNX file ({type(e).__name__}: {e})") from None
    r = LearnedRouter(p, model, threads)
    if n_classes is not None and (r.kind != "classify" or r.n_classes != n_classes):
        raise ConfigError(
            f"{p}: router made for a {r.kind} model with {r.n_classes} classes, expected a "
            f"classify model with {n_classes}"
        )
    return r


# ---------------------------------------------------------------------------- the hidden vector
_DENSE = ("Gemm", "MatMul", "MatMulInteger")
_QUANTIZE = ("DynamicQuantizeLinear", "QuantizeLinear")


def expose_hidden(
    edge_onnx: str | Path, tensor_name: str | None, out_path: str | Path
) -> tuple[Path, str, int]:
    """Copy the edge model with ``tensor_name`` (None: the input of the last dense layer before
    the first output, read past a quantize step) added as a second graph output, so the runtime
    gets logits and the hidden vector from one run; the first output is unchanged. Returns
    (the new file, the tensor's name, its width), the width measured by running one row."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    src = Path(edge_onnx)
    m = onnx.load(src)
    producer = {o: n for n in m.graph.node for o in n.output}
    if tensor_name is None:
        name, seen = m.graph.output[0].name, 0
        while name in producer and producer[name].op_type not in _DENSE and seen < 64:
            name, seen = producer[name].input[0], seen + 1
        if name not in producer:
            raise ConfigError(
                f"{src}: no dense layer (Gemm/MatMul) before the first output; "
                f"name the hidden tensor"
            )
        tensor_name = producer[name].input[0]
        while tensor_name in producer and producer[tensor_name].op_type in _QUANTIZE:
            tensor_name = producer[tensor_name].input[0]
    elif tensor_name not in producer:
        raise ConfigError(f"{src}: no node computes a tensor named {tensor_name!r}")
    if tensor_name not in (o.name for o in m.graph.output):
        m.graph.output.append(
            helper.make_tensor_value_info(tensor_name, onnx.TensorProto.FLOAT, None)
        )
    out = Path(out_path)
    out.write_bytes(m.SerializeToString())
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in inp.shape]
    h = sess.run([tensor_name], {inp.name: np.zeros(shape, np.float32)})[0]
    if h.ndim != 2:
        raise ConfigError(f"{src}: tensor {tensor_name!r} is {h.shape}, not (N, H)")
    return out, tensor_name, int(h.shape[1])


# ---------------------------------------------------------------------------- comparison
@dataclass(frozen=True)
class GateScore:
    """One router on a held-out split: CPT(target) (the escalation rate needed to recover
    ``target`` of the edge→cloud accuracy gap) and the AUROC of its score for benefit."""

    name: str
    cpt: float
    auroc: float


def confidence_scores(logits: np.ndarray, temperature: float = 1.0) -> dict[str, np.ndarray]:
    """The confidence gates' scores with higher = more confident: max_prob, margin and
    1 - normalised entropy, of ``logits / temperature``."""
    from tandem.kernels.confidence import confidence

    x = np.asarray(logits, np.float64) / temperature
    s = confidence(x)
    return {
        "max_prob": s.max_prob,
        "margin": s.margin,
        "entropy": 1.0 - s.entropy / math.log(x.shape[1]),
    }


def compare_gates(
    scores: dict[str, np.ndarray],
    edge_correct: np.ndarray,
    cloud_correct: np.ndarray,
    target: float = 0.8,
) -> list[GateScore]:
    """Score each router on the same rows, plus ``oracle`` (escalates exactly the rows the
    cloud fixes, first): the floor no router can beat."""
    from tandem.router.calibrate import escalation_for_recovery, routing_curve

    e, c = np.asarray(edge_correct, bool), np.asarray(cloud_correct, bool)
    benefit = ~e & c
    out = []
    oracle = np.where(benefit, np.arange(len(e)) / (2.0 * max(len(e), 1)), 1.0)
    for name, s in {**scores, "oracle": oracle}.items():
        curve = routing_curve(s, e, c)
        out.append(GateScore(name, escalation_for_recovery(curve, target), _auroc(s, benefit)))
    return out


# ---------------------------------------------------------------------------- train and compare
@dataclass(frozen=True)
class RouterExamples:
    """Rows a classify router trains or is judged on: the edge's (N, C) logits, whether the
    edge and the cloud were right (from the escalation log: edge label == cloud label, and
    the cloud is right by definition), and the edge's (N, H) hidden vectors when used."""

    logits: np.ndarray
    edge_correct: np.ndarray
    cloud_correct: np.ndarray
    hidden: np.ndarray | None = None

    @property
    def benefit(self) -> np.ndarray:
        return ~np.asarray(self.edge_correct, bool) & np.asarray(self.cloud_correct, bool)

    def __len__(self) -> int:
        return len(self.logits)

    def take(self, idx: np.ndarray) -> RouterExamples:
        h = None if self.hidden is None else self.hidden[idx]
        return RouterExamples(self.logits[idx], self.edge_correct[idx], self.cloud_correct[idx], h)

    def split(self, holdout_share: float, seed: int = 0) -> tuple[RouterExamples, RouterExamples]:
        """(train, holdout), stratified on benefit."""
        from sklearn.model_selection import train_test_split

        b = self.benefit
        strat = b if min(b.sum(), (~b).sum()) >= 2 else None
        i_tr, i_ho = train_test_split(
            np.arange(len(self)), test_size=holdout_share, stratify=strat, random_state=seed
        )
        return self.take(np.sort(i_tr)), self.take(np.sort(i_ho))


@dataclass
class RouterReport:
    """What :func:`train_router` did: the file, the chosen model, every gate on the held-out
    rows (``gates``: the confidence gates, ``learned``, ``oracle``), and the learned router's
    CPT minus the best confidence gate's with a 95% bootstrap interval (negative: better)."""

    path: str
    version: str
    model: str
    candidates: dict[str, float]
    rows_train: int
    rows_holdout: int
    gates: list[GateScore]
    best_gate: str
    cpt_difference: float
    cpt_difference_ci: tuple[float, float]
    threshold: float
    target: float

    @property
    def learned(self) -> GateScore:
        return next(g for g in self.gates if g.name == "learned")

    @property
    def better(self) -> bool:
        """The learned router needs fewer escalations and the interval excludes zero."""
        return self.cpt_difference_ci[1] < 0

    def verdict(self) -> str:
        d, (lo, hi) = self.cpt_difference * 100, (x * 100 for x in self.cpt_difference_ci)
        if self.better:
            how = "better than"
        elif self.cpt_difference_ci[0] > 0:
            how = "worse than"
        else:
            how = "not measurably better than"
        return (
            f"the learned router is {how} the best confidence gate ({self.best_gate}): "
            f"CPT({self.target:.0%}) {d:+.1f} points (95% CI {lo:+.1f} to {hi:+.1f}) on "
            f"{self.rows_holdout} held-out rows"
        )

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["better"] = self.better
        d["verdict"] = self.verdict()
        return d


def _cpt(s: np.ndarray, e: np.ndarray, c: np.ndarray, target: float) -> float:
    from tandem.router.calibrate import escalation_for_recovery, routing_curve

    return escalation_for_recovery(routing_curve(s, e, c), target)


def cpt_difference(
    a: np.ndarray,
    b: np.ndarray,
    edge_correct: np.ndarray,
    cloud_correct: np.ndarray,
    *,
    target: float = 0.8,
    resamples: int = 300,
    seed: int = 0,
) -> tuple[float, tuple[float, float]]:
    """CPT(target) of scores ``a`` minus that of ``b`` on the same rows, and its 95% paired
    bootstrap interval (rows resampled together for both)."""
    e, c = np.asarray(edge_correct, bool), np.asarray(cloud_correct, bool)
    diff = _cpt(a, e, c, target) - _cpt(b, e, c, target)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(resamples):
        i = rng.integers(0, len(e), len(e))
        if c[i].mean() > e[i].mean():
            boots.append(_cpt(a[i], e[i], c[i], target) - _cpt(b[i], e[i], c[i], target))
    if not boots:
        return diff, (math.nan, math.nan)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return diff, (float(lo), float(hi))


def train_router(
    train: RouterExamples,
    holdout: RouterExamples,
    out: str | Path,
    *,
    top_k: int = 3,
    uses_logits: bool = False,
    hidden_tensor: str | None = None,
    model: Literal["auto", "logistic", "mlp"] = "auto",
    seed: int = 0,
    temperature: float = 1.0,
    target: float = 0.8,
    provenance: dict[str, Any] | None = None,
) -> RouterReport:
    """Fit a classify router on ``train``, export it to ``out``, and compare it on
    ``holdout`` with the confidence gates (of ``logits / temperature``) by CPT(``target``)
    and AUROC. ``threshold``: the lowest score threshold whose routed accuracy on the holdout
    recovers 90% of the gap (a starting point; ``tandem calibrate`` picks it to your target)."""
    from tandem.router.calibrate import pick_threshold, routing_curve

    c = train.logits.shape[1]
    hd = 0 if train.hidden is None else train.hidden.shape[1]
    spec = FeatureSpec(
        n_classes=c,
        top_k=min(top_k, c),
        uses_logits=uses_logits,
        uses_hidden=hd > 0,
        hidden_dim=hd,
        hidden_tensor=hidden_tensor,
    )
    fitted = fit_router(
        classify_features(train.logits, spec, train.hidden), train.benefit, model=model, seed=seed
    )
    prov = {
        "sha256": data_digest(train.logits, train.edge_correct, train.cloud_correct, train.hidden),
        **(provenance or {}),
        "rows": len(train),
        "seed": seed,
    }
    version = export_router(fitted, spec, out, provenance=prov)
    router = load_router(out, n_classes=c)
    learned = router.score_batch(holdout.logits, holdout.hidden)
    gates = confidence_scores(holdout.logits, temperature)
    results = compare_gates(
        {**gates, "learned": learned}, holdout.edge_correct, holdout.cloud_correct, target
    )
    best = min((g for g in results if g.name in gates), key=lambda g: g.cpt)
    diff, ci = cpt_difference(
        learned,
        gates[best.name],
        holdout.edge_correct,
        holdout.cloud_correct,
        target=target,
        seed=seed,
    )
    curve = routing_curve(learned, holdout.edge_correct, holdout.cloud_correct)
    return RouterReport(
        path=str(out),
        version=version,
        model=fitted.model,
        candidates=fitted.candidates,
        rows_train=len(train),
        rows_holdout=len(holdout),
        gates=results,
        best_gate=best.name,
        cpt_difference=diff,
        cpt_difference_ci=ci,
        threshold=pick_threshold(curve, 0.9),
        target=target,
    )
