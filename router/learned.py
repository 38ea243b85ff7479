"""Learned routers: a small model that predicts whether escalating will fix the edge's answer.
(Over 500 lines: the features are defined here twice, in numpy and as the ONNX graph, beside
the file that carries them and its loader, and the three must change together.)

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
the same graph from its initializers in a jitted kernel
(:func:`tandem.kernels.router_mlp.router_score_row`, tested against ONNX Runtime);
:meth:`LearnedRouter.score_batch` runs ONNX Runtime. Rows holding NaN or +inf (or no finite
logit) score NaN and are never accepted.

Fitting lives in :mod:`tandem.router.learned_fit` (:func:`fit_router`, :class:`RouterWeights`,
re-exported here); training from examples and judging against the confidence gates in
:mod:`tandem.router.learned_train` (:func:`~tandem.router.learned_train.train_router`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tandem.kernels.router_mlp import (
    LOGP_FLOOR,
    LSE_CLIP,
    mlp_score_row,
    n_router_features,
    router_features,
    router_score_row,
)
from tandem.router.learned_fit import (  # noqa: F401 - fit_router: the learned router's API
    FittedRouter,
    RouterWeights,
    fit_router,
)
from tandem.runtime.errors import ConfigError

ROUTER_FORMAT = 1  # bump when the graph layout or the feature definitions change
OPSET = 17
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
        return n_router_features(self.n_classes, self.top_k, self.uses_logits, self.hidden_dim)

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
    """(N, F) float64 features of (N, C) logits, in the order the ONNX graph builds them
    (:func:`tandem.kernels.router_mlp.router_features`); invalid rows (see
    :func:`invalid_rows`, or a non-finite hidden vector) are all NaN. With C = 3, top_k = 1:
    ``[[2, 1, 0]]`` gives p_top 0.665, margin 0.421, entropy 0.758 (0.832 nats / log 3),
    logp_top -0.408, logsumexp 2.408."""
    x = np.atleast_2d(np.asarray(logits, dtype=np.float64))
    if x.shape[1] != spec.n_classes:
        raise ValueError(f"the router reads {spec.n_classes} classes, got logits {x.shape}")
    h = None
    if spec.uses_hidden:
        if hidden is None:
            raise ValueError("this router reads the edge model's hidden vector: pass hidden")
        h = np.atleast_2d(np.asarray(hidden, dtype=np.float64))
        if h.shape != (len(x), spec.hidden_dim):
            raise ValueError(f"hidden must be ({len(x)}, {spec.hidden_dim}), got {h.shape}")
    return router_features(x, spec.top_k, spec.uses_logits, h)


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
        self._w = self.weights.kernel_args()
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
        return router_score_row(logits_row, hidden_row, *self._row_args)

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
        return mlp_score_row(f, *self._w)

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
