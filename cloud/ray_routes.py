"""How the Ray ingress (:mod:`tandem.cloud.ray_ingress`) reaches each model: the deployments
that serve it (:class:`ModelRoute`), and for one request, checked against the wire's limits,
the call that sends it to them (an :data:`Attempt`, which the ingress makes again if a replica
dies under it). An ``experts`` request for experts of several shards is split — each shard gets
its experts' rows — sent to all at once, and joined again in the request's order."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tandem.cloud.config import LimitsSpec
from tandem.cloud.ray_replica import ERROR, RESULT
from tandem.runtime.errors import BadRequest, UnknownModel
from tandem.runtime.wire import Envelope


@dataclass(frozen=True)
class Target:
    """One deployment the ingress forwards to: its name, handle and (a shard) experts."""

    name: str
    handle: Any  # ray.serve.handle.DeploymentHandle
    experts: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ModelRoute:
    """How one model is reached: one deployment of the whole model, or its expert shards.
    ``info``: what ``health`` reports for it (the replicas' ``describe``)."""

    model: str
    targets: tuple[Target, ...]
    info: dict[str, Any]

    @property
    def sharded(self) -> bool:
        return self.targets[0].experts is not None

    def owners(self) -> dict[int, int]:
        """expert id → index of the target that hosts it (shards only)."""
        return {e: i for i, t in enumerate(self.targets) for e in t.experts or ()}


Attempt = Callable[[float | None], Awaitable[Any]]  # (budget_s) → the replica's answer


def _route(routes: dict[str, ModelRoute], p: Any, what: str) -> ModelRoute:
    if not isinstance(p, dict) or not isinstance(p.get("model"), str):
        raise BadRequest(f"{what} payload must be a map with a 'model' string")
    route = routes.get(p["model"])
    if route is None:
        raise UnknownModel(f"no model {p['model']!r} here; serving: {', '.join(routes)}")
    return route


def check_size(rows: Any, what: str, lim: LimitsSpec) -> np.ndarray:
    """``rows`` if it is an array of 1 to ``lim.max_rows`` rows and at most
    ``lim.max_request_bytes``; else :class:`BadRequest`."""
    if not isinstance(rows, np.ndarray):
        raise BadRequest(f"{what} needs an array shaped (N, ...)")
    if rows.ndim == 0 or len(rows) == 0:
        raise BadRequest(f"inputs must be shaped (N, ...) with at least one row, got {rows.shape}")
    if len(rows) > lim.max_rows or rows.nbytes > lim.max_request_bytes:
        raise BadRequest(
            f"request of {len(rows)} rows, {rows.nbytes} bytes; this worker takes at most "
            f"{lim.max_rows} rows and {lim.max_request_bytes} bytes per request: split it"
        )
    return rows


def infer_attempt(routes: dict[str, ModelRoute], env: Envelope, lim: LimitsSpec) -> Attempt:
    """How to send an ``infer`` request to its model's deployment (checked here)."""
    route = _route(routes, env.payload, "infer")
    if route.sharded:
        raise BadRequest(f"model {route.model!r} is served here as expert shards: send it experts")
    rows = check_size(env.payload.get("inputs"), "infer payload's 'inputs'", lim)
    handle = route.targets[0].handle

    async def attempt(budget_s: float | None) -> Any:
        return await _awaited(handle.infer.remote(rows, budget_s))

    return attempt


def experts_attempt(routes: dict[str, ModelRoute], env: Envelope, lim: LimitsSpec) -> Attempt:
    """An expert-shard request: to the shard that hosts its experts, or split over the
    shards that do and joined again in its order."""
    route = _route(routes, env.payload, "experts")
    p = env.payload
    n_experts = int(route.info.get("n_experts", 0))
    experts, counts = p.get("experts"), p.get("counts")
    if not (
        n_experts
        and isinstance(experts, list)
        and isinstance(counts, list)
        and len(experts) == len(counts) <= n_experts  # bounded before any loop over them
        and all(type(v) is int and v >= 0 for v in (*experts, *counts))
    ):
        raise BadRequest(
            "experts payload: {model, experts: [int], counts: [int], rows: array}, one "
            f"count per expert, at most {n_experts} (an MoE model)"
        )
    rows = check_size(p.get("rows"), "experts payload's 'rows'", lim)
    if sum(counts) != len(rows):
        raise BadRequest(f"counts add up to {sum(counts)}, rows has {len(rows)}")
    if not route.sharded:
        handle = route.targets[0].handle

        async def whole(budget_s: float | None) -> Any:
            return await _awaited(handle.experts.remote(experts, counts, rows, budget_s))

        return whole
    owners = route.owners()
    missing = [e for e in experts if e not in owners]
    if missing:
        raise BadRequest(f"experts {missing} of {route.model!r} are not hosted here")
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(int).tolist()
    parts: dict[int, list[int]] = {}  # target → positions in experts
    for i, e in enumerate(experts):
        parts.setdefault(owners[e], []).append(i)

    async def split(budget_s: float | None) -> Any:
        calls = []
        for t, idx in parts.items():
            sub = np.concatenate([rows[starts[i] : starts[i + 1]] for i in idx])
            sub_e, sub_c = [experts[i] for i in idx], [counts[i] for i in idx]
            handle = route.targets[t].handle
            calls.append(_awaited(handle.experts.remote(sub_e, sub_c, sub, budget_s)))
        answers = await asyncio.gather(*calls)
        for kind, value in answers:
            if kind == ERROR:
                return kind, value
        out: np.ndarray | None = None
        for (_, value), idx in zip(answers, parts.values(), strict=True):
            got = value["rows"]
            if out is None:
                out = np.empty((len(rows), *got.shape[1:]), got.dtype)
            at = 0
            for i in idx:
                n = counts[i]
                out[starts[i] : starts[i] + n] = got[at : at + n]
                at += n
        return RESULT, {"rows": out, "version": answers[0][1]["version"]}

    return split


async def _awaited(response: Any) -> Any:
    """Await a Serve response; if the wait is cancelled (the deadline), cancel the call too,
    off this loop (``DeploymentResponse.cancel`` may wait for the handle's own loop)."""
    try:
        return await response
    except asyncio.CancelledError:
        asyncio.get_running_loop().run_in_executor(None, response.cancel)
        raise
