"""``tandem bench run``: one scenario, end to end (set-up in :mod:`tandem.bench.setup`, the
sweeps in :mod:`tandem.bench.sweeps`).

1. **Set up** what the scenario names: the items (bundled digits or sorting prompts, or your
   ``.npy`` / ``.jsonl``), the policy (the reference one for a bundled task — its gate
   threshold calibrated on the calibration split as ``tandem demo`` does — or yours), and the
   cloud (worker processes started on loopback, or running workers by address).
2. **Measure** every level — each network profile × each load point — on a fresh
   :class:`~tandem.edge.EdgeRuntime`: a netem relay (:mod:`tandem.bench.netem`) is started
   between the runtime and the workers for the level (its outages count from the level's
   start), and :func:`tandem.bench.load.run_level` drives the runtime's own ``infer`` /
   ``generate`` until the stability rule holds.
3. **Derive** the sweeps: gate threshold → accuracy / escalation rate / p95 (classifiers: each
   item's edge and cloud outcome replayed at every threshold, latency the mixture of the first
   level's measured edge and cloud latency distributions), RTT → latency per tier, and load →
   throughput and p99 with its knee.

The results are one JSON-able dict (schema ``tandem-bench/1``, see ``docs`` in the README).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import platform
import subprocess
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from tandem.bench.load import LevelRun, Tick, run_level
from tandem.bench.ports import free_ports
from tandem.bench.report import json_safe, level_json
from tandem.bench.scenario import LinkSpec, Scenario
from tandem.bench.setup import Say, Setup, classify_call, generate_call, setup
from tandem.bench.sweeps import load_sweep, rtt_sweep, threshold_sweep
from tandem.runtime.errors import TandemError
from tandem.runtime.machine import machine

SCHEMA = "tandem-bench/1"
PACKAGES = (
    "tandem-infer", "numpy", "onnxruntime", "pyzmq", "msgpack", "numba", "torch",
    "llama_cpp_python", "transformers", "hdrhistogram", "matplotlib",
)  # fmt: skip


# ---------------------------------------------------------------------- levels
def link_of(p: str | LinkSpec | None) -> Any:
    """The netem :class:`LinkProfile` for a scenario profile (None: no relay)."""
    from tandem.bench.link import LinkProfile, profile

    if p is None:
        return None
    if isinstance(p, str):
        return profile(p)
    bw = None if p.bandwidth_mbit is None else p.bandwidth_mbit * 1e6 / 8
    return LinkProfile(p.name, p.delay_ms, p.jitter_ms, bw, p.down)


def network_json(link: Any, outages: list[tuple[float, float]]) -> dict[str, Any]:
    if link is None:
        return {"profile": "none", "delay_ms": 0.0, "jitter_ms": 0.0, "bandwidth": None,
                "rtt_ms": 0.0, "outages": []}  # fmt: skip
    bw = None if link.bandwidth is None else f"{link.bandwidth * 8 / 1e6:g} Mbit/s"
    return {
        "profile": link.name,
        "delay_ms": link.delay_ms,
        "jitter_ms": link.jitter_ms,
        "bandwidth": bw,
        "down": link.down,
        "rtt_ms": 2 * link.delay_ms,
        "outages": [list(o) for o in outages],
    }


@contextlib.contextmanager
def relays(
    endpoints: list[str],
    link: Any,
    outages: list[tuple[float, float]],
    seed: int,
    log: Path,
) -> Iterator[tuple[list[str], Callable[[], None]]]:
    """Listen endpoints for a relay per worker, and a function that starts them (call it
    when the level starts: outages count from then). No link: the workers' own endpoints."""
    if link is None:
        yield endpoints, lambda: None
        return
    from tandem.bench.netem import start_relay

    listens = [f"tcp://127.0.0.1:{p}" for p in free_ports(len(endpoints))]
    with contextlib.ExitStack() as stack:
        f = stack.enter_context(log.open("ab"))

        def start() -> None:  # each relay is stopped when the level's block ends
            for target, listen in zip(endpoints, listens, strict=True):
                h = start_relay(target, link, listen, outages=outages, seed=seed, stderr=f)
                stack.enter_context(h)

        yield listens, start


def run_levels(
    sc: Scenario, st: Setup, out: Path, say: Say, tick: Callable[[str], Tick | None]
) -> tuple[list[dict[str, Any]], list[LevelRun]]:
    from tandem.edge import EdgeRuntime
    from tandem.router.policy import policy_from_dict

    ld = sc.load
    outages = list(sc.network.outages)
    levels, runs = [], []
    make = classify_call if st.items.kind == "classify" else generate_call
    for prof in sc.network.profiles:
        link = link_of(prof)
        for point in ld.points:
            what = f"c={point:g}" if ld.mode == "closed" else f"{point:g}/s"
            label = f"{link.name if link else 'direct'} {what}"
            say(f"level {label}")
            with relays(st.endpoints, link, outages, sc.network.seed, out / "netem.log") as (
                eps,
                start,
            ):
                data = json.loads(json.dumps(st.policy))
                if eps and data["tasks"][st.task].get("cloud"):
                    data["tasks"][st.task]["cloud"]["endpoints"] = eps
                with EdgeRuntime(policy_from_dict(data, source=f"<{sc.name} policy>")) as rt:
                    edge_ops = rt.serve_metrics("127.0.0.1:0") if sc.output.metrics else None
                    start()
                    call = make(rt, st.task, st.items)
                    try:  # one request first, outside the load: a broken set-up says why
                        call(0)
                    except Exception as e:
                        why = (
                            e.message if isinstance(e, TandemError) else f"{type(e).__name__}: {e}"
                        )
                        raise TandemError(
                            f"level {label}: the first request failed: {why}"
                        ) from None
                    run = run_level(
                        call,
                        len(st.items),
                        mode=ld.mode,
                        point=point,
                        warmup_s=ld.warmup_s,
                        window_s=ld.window_s,
                        min_windows=ld.min_windows,
                        max_windows=ld.max_windows,
                        stable_windows=ld.stable_windows,
                        stability_pct=ld.stability_pct,
                        max_requests=ld.max_requests,
                        max_in_flight=ld.max_in_flight,
                        min_window_answers=ld.min_window_answers,
                        seed=ld.seed,
                        on_tick=tick(label),
                    )
                    if edge_ops is not None:
                        scrape_metrics(out / "metrics", edge_ops.url, st.ops, say)
            load: dict[str, Any] = {"mode": ld.mode}
            if ld.mode == "closed":
                load["concurrency"] = int(point)
            else:
                load["rate"] = point
                load["achieved_rate"] = (
                    run.stats.sent / run.stats.span_s if run.stats.span_s else 0.0
                )
            lvl = level_json(run, label=label, network=network_json(link, outages), load=load)
            lvl["stability_pct"] = ld.stability_pct
            levels.append(lvl)
            if not runs:  # the threshold sweep's latencies; the others' windows can go
                runs.append(run)
    return levels, runs


# ---------------------------------------------------------------------- the whole run
def machine_json() -> dict[str, Any]:
    """The machine, the package versions and the git revision, for the results file."""
    m = machine()
    m["platform"] = platform.platform()
    pk = {}
    for name in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            pk[name] = metadata.version(name)
    m["packages"] = pk
    m["git"] = None
    here = Path(__file__).resolve().parent
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        rev = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
        m["git"] = rev + ("-dirty" if dirty else "") if rev else None
    return m


def scrape_metrics(folder: Path, edge_url: str, worker_urls: list[str], say: Say) -> None:
    """``GET /metrics`` of the edge runtime and of each worker, into ``folder/edge.prom`` and
    ``folder/worker-N.prom`` (a later level overwrites an earlier one's)."""
    import urllib.request

    folder.mkdir(parents=True, exist_ok=True)
    names = {"edge.prom": edge_url, **{f"worker-{i}.prom": u for i, u in enumerate(worker_urls)}}
    for name, url in names.items():
        try:
            with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
                (folder / name).write_bytes(r.read())
        except OSError as e:
            raise TandemError(f"could not scrape {url}/metrics: {e}") from None
    say(f"metrics scraped into {folder}")


def run_scenario(
    sc: Scenario,
    out: Path,
    *,
    file: str | None = None,
    say: Say = lambda _: None,
    tick: Callable[[str], Tick | None] = lambda _: None,
) -> dict[str, Any]:
    """Run ``sc`` and return its results (schema ``tandem-bench/1``); logs go to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for log in ("worker.log", "netem.log"):  # this run's logs only
        (out / log).unlink(missing_ok=True)
    started = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        st = setup(sc, stack, out, say)
        levels, runs = run_levels(sc, st, out, say, tick)
        sweep = threshold_sweep(sc, st, runs[0], say)
    return {
        "schema": SCHEMA,
        "scenario": {
            "name": sc.name,
            "file": file,
            "description": sc.description,
            "task": sc.task.source,
            "kind": st.items.kind,
            "load_mode": sc.load.mode,
            "raw": sc.model_dump(mode="json", by_alias=True),
        },
        "machine": machine_json(),
        "started_at": started.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "duration_s": time.perf_counter() - t0,
        "levels": levels,
        "threshold_sweep": sweep,
        "rtt_sweep": rtt_sweep(levels),
        "load_sweep": load_sweep(sc, levels),
    }


def write_outputs(
    results: dict[str, Any],
    out: Path,
    json_out: Path | None = None,
    *,
    plots: bool = True,
    html: bool = True,
) -> list[Path]:
    """``out/results.json`` (and ``json_out``), then the PNG plots and ``report.html``; returns
    the files written. The JSON goes first: a failure drawing cannot lose the measurements."""
    text = json.dumps(json_safe(results), indent=1, allow_nan=False) + "\n"
    written = [out / "results.json"]
    written[0].write_text(text)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(text)
        written.append(json_out)
    if plots:
        from tandem.bench.html_report import write_html
        from tandem.bench.plots import write_plots

        pngs = write_plots(results, out)
        written += list(pngs.values())
        if html:
            written.append(write_html(results, pngs, out / "report.html"))
    return written
