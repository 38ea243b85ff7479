"""Tandem's cloud side on Ray Serve: each model (or expert shard of an MoE model) of a models
directory runs as a Ray Serve deployment whose replicas Serve starts, restarts and autoscales
(:class:`~tandem.cloud.ray_replica.ModelReplica`), and one ingress process speaks Tandem's wire
protocol in front of them (:class:`~tandem.cloud.ray_ingress.RayIngress`), so edges and
clients reach Ray Serve exactly as they reach a worker.

Each deployment is its own Serve application of the same name, so one model can be deployed
again (a new version, another scale) without touching the others. Serve's HTTP proxies are
off by default (``proxy_location: Disabled``): traffic comes in through the ingress.

.. code-block:: python

    config = load_ray_config("ray.yaml")
    start_ray(config)                 # ray.init (local, or ray_address) and serve.start
    routes = deploy(config)           # serve.run of every deployment, replicas warmed up
    RayIngress(config, routes).serve()

or ``tandem cloud ray-serve --config ray.yaml``. See docs/ray.md for a cluster of several
nodes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from tandem.cloud.loading import check_security
from tandem.cloud.ray_config import DeploymentSpec, RayServeConfig, deployment_name
from tandem.cloud.ray_ingress import RayIngress
from tandem.cloud.ray_replica import ModelReplica
from tandem.cloud.ray_routes import ModelRoute, Target
from tandem.runtime.errors import ConfigError, TandemError

log = logging.getLogger(__name__)

DESCRIBE_TIMEOUT_S = 60.0  # for a replica's first answer once Serve says it is running


def start_ray(config: RayServeConfig) -> None:
    """Connect to the Ray cluster at ``ray_address``, or start a local one (no dashboard);
    start Serve on it (its controller, no HTTP proxy unless ``proxy_location`` asks). A
    process already connected to Ray (a test's cluster) stays on it."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        if config.ray_address is not None:
            ray.init(address=config.ray_address, log_to_driver=False)
        else:
            ray.init(num_cpus=config.local_num_cpus, include_dashboard=False, log_to_driver=False)
    serve.start(proxy_location=config.proxy_location)


def deployment_options(config: RayServeConfig, spec: DeploymentSpec) -> dict[str, Any]:
    """``Deployment.options`` for one deployment spec: its scale, per-replica bounds and
    resources."""
    opts: dict[str, Any] = {
        "max_ongoing_requests": spec.max_ongoing_requests,
        "max_queued_requests": spec.max_queued_requests,
        "ray_actor_options": {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus},
    }
    if spec.autoscaling is not None:
        a = spec.autoscaling
        opts["autoscaling_config"] = {
            "min_replicas": a.min_replicas,
            "max_replicas": a.max_replicas,
            "initial_replicas": max(a.min_replicas, 1),
            "target_ongoing_requests": a.target_ongoing_requests,
            "upscale_delay_s": a.upscale_delay_s,
            "downscale_delay_s": a.downscale_delay_s,
        }
    else:
        opts["num_replicas"] = spec.num_replicas or 1
    return opts


def deploy(config: RayServeConfig) -> dict[str, ModelRoute]:
    """Run every deployment of ``config`` (Serve on an initialised Ray: :func:`start_ray`),
    wait until each one's replicas are up (loaded, digests checked, warmed up), and return
    how the ingress reaches each model. :class:`TandemError` if a deployment cannot start."""
    from ray import serve

    targets = []
    for i, spec in enumerate(config.deployments):
        name = deployment_name(config, i)
        app = (
            serve.deployment(ModelReplica, name=name)
            .options(**deployment_options(config, spec))
            .bind(
                config.worker_config(spec),
                max_batch_rows=spec.batching.max_batch_rows,
                batch_wait_timeout_s=spec.batching.batch_wait_timeout_s,
                max_reply_bytes=config.limits.max_message_bytes,
            )
        )
        targets.append(serve.RunTarget(app, name=name, route_prefix=None))
    try:
        handles = serve.run_many(targets)
    except Exception as e:  # Serve says why in its message (a replica's constructor raised...)
        raise TandemError(f"Ray Serve could not start the deployments: {e}") from e
    by_model: dict[str, list[tuple[Target, dict[str, Any]]]] = {}
    for i, (spec, handle) in enumerate(zip(config.deployments, handles, strict=True)):
        name = deployment_name(config, i)
        info = handle.describe.remote().result(timeout_s=DESCRIBE_TIMEOUT_S)
        experts = tuple(spec.experts) if spec.experts is not None else None
        by_model.setdefault(spec.model, []).append((Target(name, handle, experts), info))
    routes = {}
    for model, parts in by_model.items():
        info = dict(parts[0][1])
        if parts[0][0].experts is not None:
            info["shards"] = {t.name: list(t.experts or ()) for t, _ in parts}
            hosted = sorted(e for t, _ in parts for e in t.experts or ())
            info["experts"] = hosted
            if any(e >= info["n_experts"] for e in hosted):
                raise ConfigError(
                    f"model {model!r} has {info['n_experts']} experts; the shards name {hosted}"
                )
        routes[model] = ModelRoute(model, tuple(t for t, _ in parts), info)
    log.info(
        "deployed on Ray Serve: %s",
        ", ".join(deployment_name(config, i) for i in range(len(config.deployments))),
    )
    return routes


def undeploy(config: RayServeConfig) -> None:
    """Delete the Serve applications of ``config`` (their replicas stop)."""
    from ray import serve

    for i in range(len(config.deployments)):
        serve.delete(deployment_name(config, i))


def serve_ray(
    config: RayServeConfig,
    ready: Callable[[str], None] | None = None,
    *,
    keep_deployments: bool = False,
) -> int:
    """Start Ray (or join it), deploy, serve the ingress until SIGTERM/SIGINT, then delete the
    deployments (unless ``keep_deployments``: another ingress may still use them) and return
    the exit code."""
    check_security(config.security_config())  # before anything starts: fail fast
    start_ray(config)
    routes = deploy(config)
    try:
        return RayIngress(config, routes).serve(ready)
    finally:
        if not keep_deployments:
            undeploy(config)
