"""Routing policy files: YAML, validated once by pydantic, trusted afterwards. (Over 500 lines:
one schema, every key of a policy file with its validation, in the one place a reader checks a
file against.)

.. code-block:: yaml

    version: 1
    escalation_log: {path: escalations.sqlite}    # optional; relative to this file
    metrics: {bind: "127.0.0.1:9101"}             # optional: /metrics /health /ready
    tracing: {otlp_endpoint: "http://collector:4318/v1/traces"}  # optional: OpenTelemetry
    tasks:
      digits:
        local: {path: edge-int8.onnx, labels: ["0", "1", ...]}
        cloud: {endpoint: "tcp://127.0.0.1:5555", model: digits-cloud}
        # with CurveZMQ: cloud: {..., server_key: keys/worker.key, client_key: keys/robot.key_secret}
        gate: {metric: max_prob, threshold: 0.8}   # escalate when max_prob < 0.8
        rules:                                     # first matching tag wins
          - {tag: private, route: local}           # never leaves the device
          - {tag: critical, route: cloud}          # always escalates
        budget: {escalations_per_s: 50, burst: 100}
        deadline_ms: 50
        # co-evolution (README "Co-evolution"): all optional
        # local: {..., store: models/digits, watch_s: 5}   # versions tandem evolve publishes
        # gate: {metric: max_prob, threshold: 0.72, temperature: 0.98}  # tandem calibrate
        # gate: {type: learned, model: router.onnx, threshold: 0.87}    # tandem router train
        # tiers: [{cloud: {...}, gate: {metric: max_prob, threshold: 0.9}}]
        # audit_rate: 0.02, shadow: {gate: {...}}, drift: {window: 1000}, calibration: {...}
      sort:                                        # a generation task
        kind: generate
        local: {path: edge-q8_0.gguf}              # llama.cpp on the device
        cloud: {endpoint: "tcp://127.0.0.1:5555", model: sort-moe}
        gate: {metric: token_min, threshold: 0.5}  # escalate when a token's p < 0.5
        mode: probe                                # upfront | probe | midstream
        probe_tokens: 8
        handoff: continue                          # the cloud continues the edge's text

Relative paths are resolved against the policy file's folder. Unknown keys are errors.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from tandem.runtime.config import ConfigPath, StrictModel, load_config, validate_config
from tandem.runtime.manifest import (
    EnvVarName,
    HttpUrl,
    check_file_or_server,
    check_server_options,
)
from tandem.runtime.tracing import TracingSpec

_ENDPOINT = re.compile(r"^(tcp://[^:/\s]+:\d{1,5}|ipc://\S+|inproc://\S+)$")


def _between_0_and_1(v: float) -> float:
    if not 0.0 <= v <= 1.0:
        raise ValueError("must be between 0 and 1")
    return v


Probability = Annotated[float, AfterValidator(_between_0_and_1)]


class Route(StrEnum):
    LOCAL = "local"
    CLOUD = "cloud"


class GateMetric(StrEnum):
    """What the gate compares with its threshold. ``max_prob`` and ``margin`` escalate when
    below it; ``entropy`` (normalised by log C into [0, 1]) escalates when above it."""

    MAX_PROB = "max_prob"
    MARGIN = "margin"
    ENTROPY = "entropy"


class GateSpec(StrictModel):
    """A confidence gate on the edge model's output row. ``temperature`` (set by
    ``tandem calibrate``): the logits are divided by it before the statistic is taken, so
    ``max_prob`` is a calibrated probability (temperature scaling, Guo et al. 2017)."""

    type: Literal["confidence"] = "confidence"
    metric: GateMetric = GateMetric.MAX_PROB
    threshold: Probability
    temperature: float = Field(default=1.0, gt=0.0, le=1000.0)


class LearnedGateSpec(StrictModel):
    """A learned router (``tandem router train``): an ONNX model that maps the edge model's
    outputs (and the features its metadata names) to the probability that the edge's answer
    stands, i.e. that escalating would not change it for the better. Accepts when that
    probability is >= ``threshold``, like ``max_prob``."""

    type: Literal["learned"]
    model: ConfigPath
    threshold: Probability


def _tag(key: str, default: str) -> Callable[[Any], str]:
    """A discriminated union's tag: ``key`` of a dict (a file's) or a model (already built),
    ``default`` when it is absent or not a string (the plain member then reports the error)."""

    def tag(v: Any) -> str:
        t = v.get(key, default) if isinstance(v, dict) else getattr(v, key, default)
        return t if isinstance(t, str) else default

    return tag


AnyGate = Annotated[
    Annotated[GateSpec, Tag("confidence")] | Annotated[LearnedGateSpec, Tag("learned")],
    Discriminator(_tag("type", "confidence")),
]


class Interval(StrictModel):
    """An expected value with its confidence interval (bootstrap, 95% unless said)."""

    expected: Probability
    low: Probability
    high: Probability


class CalibrationRecord(StrictModel):
    """What ``tandem calibrate`` (or ``tandem evolve``) wrote, and why: provenance for review,
    and the baseline the drift alarm compares live traffic with. ``score_quantiles``: the gate
    score's deciles (10%..90%) on the calibration data."""

    date: str = Field(min_length=1)  # ISO 8601, UTC
    objective: str = Field(min_length=1)  # e.g. "max_escalation=0.2"
    data: dict[str, str | int] = Field(default_factory=dict)  # source, sha256, rows
    models: dict[str, str] = Field(default_factory=dict)  # edge / cloud versions
    escalation_rate: Interval
    accuracy: Interval | None = None
    score_quantiles: list[float] = Field(default_factory=list, max_length=99)


class DriftSpec(StrictModel):
    """The drift alarm: over each ``window`` requests, the live escalation rate and the gate
    score's distribution are tested against the task's ``calibration`` record (without one,
    against the first window); an alarm needs a p-value below ``alpha`` (Bonferroni-corrected
    over the tests), so a steady stream raises one about once in 1/alpha windows."""

    window: int = Field(default=1000, ge=50, le=1_000_000)
    alpha: float = Field(default=1e-4, gt=0.0, lt=0.5)


class ShadowSpec(StrictModel):
    """A second gate that runs beside the active one and only records what it would have
    decided (``EdgeRuntime.stats()``, the escalation log); ``tandem calibrate --compare``
    reports both on the same traffic."""

    gate: AnyGate


class RuleSpec(StrictModel):
    tag: str = Field(min_length=1)
    route: Route


class BudgetSpec(StrictModel):
    """Token bucket on escalations: ``escalations_per_s`` refill, at most ``burst`` saved up."""

    escalations_per_s: float = Field(gt=0)
    burst: int | None = Field(default=None, ge=1)


class LocalModelSpec(StrictModel):
    """The on-device model: any ONNX classifier whose first output is (N, C) scores."""

    path: ConfigPath
    version: str | None = None  # default: first 12 hex digits of the file's sha256
    output: Literal["logits", "probabilities"] = "logits"
    labels: list[str] | None = None
    threads: int = Field(default=1, ge=0)
    # a model store (`tandem evolve` publishes versions there): when it holds a current
    # version, the runtime serves that one instead of `path`, with its calibration
    store: ConfigPath | None = None
    # seconds between checks of the store for a new current version (hot swap); None: only
    # when EdgeRuntime.reload_models() is called
    watch_s: float | None = Field(default=None, gt=0.0, le=86_400.0)


def _zmq_endpoint(v: str) -> str:
    if not _ENDPOINT.match(v):
        raise ValueError("must be a ZeroMQ endpoint like tcp://host:port or ipc:///path")
    return v


Endpoint = Annotated[str, AfterValidator(_zmq_endpoint)]


class CloudTargetSpec(StrictModel):
    """Where escalations go: one worker (``endpoint``) or several serving the same model
    (``endpoints``: each request goes to the one with the fewest outstanding requests and
    fails over to another inside its deadline). With CurveZMQ: ``server_key`` is the workers'
    public key file (NAME.key) and ``client_key`` this client's secret key file
    (NAME.key_secret, which holds its public half too); both or neither."""

    endpoint: Endpoint | None = None
    endpoints: list[Endpoint] | None = Field(default=None, min_length=1, max_length=64)
    model: str = Field(min_length=1)
    server_key: ConfigPath | None = None
    client_key: ConfigPath | None = None
    # rows per request from infer_batch: at most the workers' limits.max_rows
    max_rows: int = Field(default=1024, ge=1)

    @model_validator(mode="after")
    def _one_of(self) -> CloudTargetSpec:
        if (self.endpoint is None) == (self.endpoints is None):
            raise ValueError("give either 'endpoint' (one worker) or 'endpoints' (a list)")
        if self.endpoints is not None and len(set(self.endpoints)) != len(self.endpoints):
            raise ValueError("'endpoints' lists a worker twice")
        if (self.server_key is None) != (self.client_key is None):
            raise ValueError("give both 'server_key' and 'client_key' (CurveZMQ), or neither")
        return self

    @property
    def curve_keys(self) -> tuple[Path, Path] | None:
        """``(client secret key file, server public key file)`` for :class:`CloudClient`."""
        if self.client_key is None or self.server_key is None:
            return None
        return self.client_key, self.server_key

    @property
    def all_endpoints(self) -> list[str]:
        return [self.endpoint] if self.endpoint is not None else list(self.endpoints or [])


class TierSpec(StrictModel):
    """One more escalation tier after the task's ``cloud`` (a FrugalGPT cascade): ``gate`` is
    applied to the answer of the tier before, and the request goes on to this tier's ``cloud``
    when that answer is not accepted."""

    cloud: CloudTargetSpec
    gate: GateSpec


class TaskPolicy(StrictModel):
    """A classification task: an ONNX model on the device, a gate on its output row."""

    kind: Literal["classify"] = "classify"
    local: LocalModelSpec
    cloud: CloudTargetSpec | None = None  # no cloud: every request answers on the device
    gate: AnyGate
    # more tiers after `cloud`, each with the gate on the answer of the tier before
    tiers: list[TierSpec] = Field(default_factory=list, max_length=4)
    rules: list[RuleSpec] = Field(default_factory=list)
    budget: BudgetSpec | None = None
    deadline_ms: int = Field(default=100, ge=1, le=3_600_000)
    # share of the requests the gate decides that go to the cloud whatever it says (reason
    # "audit"): an unbiased labelled sample in the log for `tandem calibrate`/`router train`
    audit_rate: Probability = 0.0
    shadow: ShadowSpec | None = None
    drift: DriftSpec | None = None
    calibration: CalibrationRecord | None = None

    @model_validator(mode="after")
    def _cloud_rules_need_cloud(self) -> TaskPolicy:
        if self.cloud is None and any(r.route is Route.CLOUD for r in self.rules):
            raise ValueError("a rule routes to the cloud but the task has no cloud target")
        if self.cloud is None and self.tiers:
            raise ValueError("'tiers' come after the task's 'cloud' target, which is missing")
        return self


class TokenGateMetric(StrEnum):
    """What a generation task's gate compares with its threshold, from the local model's token
    log-probabilities (as probabilities, so thresholds are in [0, 1]):

    * ``token_mean``: exp(mean token log-prob), the geometric-mean token probability;
    * ``token_min``: the lowest token probability;
    * ``token_quantile``: the ``quantile``-quantile of the token probabilities (Gupta et al.,
      ICLR 2024: a low quantile routes better than the length-biased mean);
    * ``first_entropy``: the entropy of the first token's distribution, normalised by
      log(vocabulary size) into [0, 1] — escalates when *above* the threshold.

    The three token metrics escalate when below the threshold.
    """

    TOKEN_MEAN = "token_mean"
    TOKEN_MIN = "token_min"
    TOKEN_QUANTILE = "token_quantile"
    FIRST_ENTROPY = "first_entropy"


class TokenGateSpec(StrictModel):
    metric: TokenGateMetric = TokenGateMetric.TOKEN_MIN
    threshold: Probability
    quantile: Probability = 0.1  # for token_quantile


class EscalationMode(StrEnum):
    """When a generation task decides.

    * ``upfront``: after the prompt, on the first token's distribution, before anything is
      shown (the cheapest probe: one token);
    * ``probe``: generate ``probe_tokens`` locally (held back), then finish locally or escalate;
    * ``midstream``: stream local tokens at once; when the confidence over the last ``window``
      tokens drops below the threshold, the cloud takes over;
    * ``speculative``: decide as ``probe`` does; an escalated answer is drafted by the local
      model and verified by the cloud model (speculative decoding: the cloud's answer, fewer
      cloud passes and round trips; see :class:`SpeculativeSpec`).
    """

    UPFRONT = "upfront"
    PROBE = "probe"
    MIDSTREAM = "midstream"
    SPECULATIVE = "speculative"


class Handoff(StrEnum):
    """What the cloud gets when it takes over: ``continue`` — the prompt plus the answer so
    far, and it goes on from there; ``restart`` — the prompt alone (in ``midstream`` the
    stream then says so with a chunk marked ``restart``)."""

    CONTINUE = "continue"
    RESTART = "restart"


class GenerationModelSpec(StrictModel):
    """The on-device language model: a GGUF file (llama.cpp), a transformers directory, or an
    OpenAI-compatible server on the device (``format: openai``, e.g. llama.cpp's
    ``llama-server`` on the robot) named by ``url`` instead of ``path``: ``model`` is the model
    id to ask it for (default: the first it lists) and ``api_key_env`` the *name* of the
    environment variable holding its API key (unset: no key). A server gives token
    log-probabilities but no entropy and no logits, so it cannot draft (mode
    ``speculative``)."""

    format: Literal["gguf", "transformers", "openai"] = "gguf"
    path: ConfigPath | None = Field(default=None, validate_default=True)  # not for openai
    url: HttpUrl | None = Field(default=None, validate_default=True)  # openai only
    model: str | None = Field(default=None, min_length=1)  # openai only
    api_key_env: EnvVarName | None = None  # openai only
    version: str | None = None  # default: from the file's sha256 (openai: the model id)
    threads: int = Field(default=2, ge=0)
    # gguf only: tokens of context (prompt + answer); 0: the context the model was trained with
    n_ctx: int = Field(default=0, ge=0, le=1 << 17)
    # generations at once (gguf: llama.cpp contexts; transformers: KV caches); one more is
    # refused with Overloaded (the gateway: 429)
    parallel: int = Field(default=4, ge=1, le=256)
    # a Jinja chat template file (relative to this policy) to render chats with instead of the
    # model's own (the GGUF's tokenizer.chat_template, the tokenizer's); not for openai
    chat_template: ConfigPath | None = None
    # a model store, as for classification tasks (LocalModelSpec.store); not for openai
    store: ConfigPath | None = None
    watch_s: float | None = Field(default=None, gt=0.0, le=86_400.0)

    @field_validator("path")
    @classmethod
    def _path_unless_served(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        check_file_or_server(info.data.get("format"), v, server=False, noun="path")
        return v

    @field_validator("url")
    @classmethod
    def _url_if_served(cls, v: str | None, info: ValidationInfo) -> str | None:
        check_file_or_server(info.data.get("format"), v, server=True, noun="url")
        return v

    @model_validator(mode="after")
    def _server_fields_only_for_openai(self) -> GenerationModelSpec:
        check_server_options(self.format, {"model": self.model, "api_key_env": self.api_key_env})
        return self


class SpeculativeSpec(StrictModel):
    """Speculative decoding (``mode: speculative``). ``gamma``: draft tokens per verify round,
    ``auto`` (default) to choose each round from the measured acceptance rate, round trip,
    draft and verify times (at most ``max_gamma``; see
    :class:`tandem.runtime.speculative.GammaController`); with ``fallback``, ``auto`` streams the
    rest of an answer from the cloud, without drafting, when that is expected to be faster (a
    slow link). ``draft_top_k``: when sampling, the draft distribution sent with each draft
    token keeps its ``draft_top_k`` most likely tokens (the output distribution stays exactly
    the cloud model's). ``prior_acceptance``: the acceptance rate assumed before any is
    measured. Both models must share a vocabulary (the worker checks)."""

    gamma: int | Literal["auto"] = "auto"
    max_gamma: int = Field(default=8, ge=1, le=16)
    draft_top_k: int = Field(default=64, ge=1, le=4096)
    fallback: bool = True
    prior_acceptance: float = Field(default=0.7, gt=0.0, lt=1.0)

    @field_validator("gamma")
    @classmethod
    def _gamma_range(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 16:
            raise ValueError("expected 'auto' or an integer 1..16")
        return v


class TokenShadowSpec(StrictModel):
    """:class:`ShadowSpec` for a generation task: a second token gate."""

    gate: TokenGateSpec


class GenerateTaskPolicy(StrictModel):
    """A generation task: a language model on the device, a gate on its token confidence."""

    kind: Literal["generate"]
    local: GenerationModelSpec
    cloud: CloudTargetSpec | None = None
    gate: TokenGateSpec
    mode: EscalationMode = EscalationMode.PROBE
    probe_tokens: int = Field(default=8, ge=1, le=4096)
    window: int = Field(default=8, ge=1, le=4096)  # midstream: tokens the statistic spans
    handoff: Handoff = Handoff.CONTINUE
    max_tokens: int = Field(default=64, ge=1, le=1 << 16)  # default per request
    stop: list[str] = Field(default_factory=list, max_length=8)
    rules: list[RuleSpec] = Field(default_factory=list)
    budget: BudgetSpec | None = None
    # the cloud's part of an answer: whole answer, and until its first token
    deadline_ms: int = Field(default=30_000, ge=1, le=3_600_000)
    first_token_ms: int | None = Field(default=5_000, ge=1, le=3_600_000)
    speculative: SpeculativeSpec = SpeculativeSpec()
    audit_rate: Probability = 0.0  # as for classification tasks
    shadow: TokenShadowSpec | None = None
    drift: DriftSpec | None = None
    calibration: CalibrationRecord | None = None

    @model_validator(mode="after")
    def _consistent(self) -> GenerateTaskPolicy:
        if self.cloud is None and any(r.route is Route.CLOUD for r in self.rules):
            raise ValueError("a rule routes to the cloud but the task has no cloud target")
        if self.gate.metric is TokenGateMetric.FIRST_ENTROPY and self.mode is not (
            EscalationMode.UPFRONT
        ):
            raise ValueError("gate metric 'first_entropy' needs mode 'upfront'")
        return self


AnyTaskPolicy = Annotated[
    Annotated[TaskPolicy, Tag("classify")] | Annotated[GenerateTaskPolicy, Tag("generate")],
    Discriminator(_tag("kind", "classify")),
]


class EscalationLogSpec(StrictModel):
    """See :class:`tandem.edge.escalation_log.EscalationLog`: rows are queued in memory and
    written by a background thread in batches (one commit, one fsync, per batch)."""

    path: ConfigPath
    # "full": fsync at every batch commit, committed rows survive power loss; "normal":
    # committed rows survive a process crash, the last commits may be lost on power loss.
    synchronous: Literal["full", "normal"] = "full"
    store_inputs: bool = True
    # rows waiting for the writer, at most; more are dropped (counted in EdgeRuntime.stats())
    queue_rows: int = Field(default=10_000, ge=1, le=10_000_000)
    # bytes of arrays (inputs and outputs) waiting for the writer, at most
    queue_bytes: int = Field(default=64 << 20, ge=1 << 10, le=1 << 40)
    max_rows: int | None = Field(default=None, ge=1)  # keep at most this many, oldest go first
    max_age_s: float | None = Field(default=None, gt=0)  # delete rows older than this (by ts)


class ReloadSpec(StrictModel):
    """Watching the policy file (:mod:`tandem.edge.policy_reload`): a runtime started with
    ``EdgeRuntime.from_policy(path)`` checks the file every ``watch_s`` seconds (a stat, and a
    read when it changed) and applies a new, valid version without a restart: an atomic
    replace at the first check, an in-place write once unchanged for max(``watch_s``, 0.25) s;
    a bad one is refused and the old policy serves on. Without this section the file is not
    watched."""

    watch_s: float = Field(default=1.0, gt=0.0, le=3600.0)


def _http_bind(v: str) -> str:
    from tandem.runtime.errors import ConfigError
    from tandem.runtime.ops_http import parse_bind

    try:
        parse_bind(v)
    except ConfigError as e:  # as a ValueError: pydantic names the file and the key
        raise ValueError(e.message) from None
    return v


class MetricsSpec(StrictModel):
    """The runtime's Prometheus exporter (``EdgeRuntime.serve_metrics``): ``GET /metrics``,
    ``/health`` and ``/ready`` on ``bind`` (``HOST:PORT``, ``[IPV6]:PORT`` or ``:PORT``; port
    0: any free one), started with the runtime and closed with it. Without this section the
    runtime records no metrics unless asked (``EdgeRuntime(metrics=True)``)."""

    bind: Annotated[str, AfterValidator(_http_bind)] = "127.0.0.1:9101"


class Policy(StrictModel):
    version: Literal[1] = 1
    tasks: dict[str, AnyTaskPolicy] = Field(min_length=1)
    escalation_log: EscalationLogSpec | None = None
    metrics: MetricsSpec | None = None  # serve /metrics /health /ready; None: off
    reload: ReloadSpec | None = None  # watch the file and apply changes live; None: off
    # OpenTelemetry spans (tandem.runtime.tracing); None: off ({}: the OTEL_EXPORTER_OTLP_* endpoint)
    tracing: TracingSpec | None = None


def load_policy(path: str | Path) -> Policy:
    """Load and validate a policy file; raises :class:`~tandem.runtime.errors.ConfigError`
    naming every bad key."""
    p = Path(path)
    return load_config(p, Policy, base_dir=p.parent)


def policy_from_dict(data: dict, *, base_dir: str | Path = ".", source: str = "<policy>") -> Policy:
    return validate_config(data, Policy, source=source, base_dir=Path(base_dir))
