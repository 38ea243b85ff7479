"""The output side of ``tandem bench run``: PNG figures, the self-contained HTML report and the
comparison of two results files, on a realistic synthetic results dict (schema tandem-bench/1)."""

from __future__ import annotations

import copy
import json
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console

from tandem.bench.compare import Row, compare, load_results, print_compare
from tandem.bench.html_report import write_html
from tandem.bench.plots import write_plots
from tandem.runtime.errors import ConfigError

PLOTS = ("latency_cdf", "accuracy_escalation", "latency_vs_rtt", "throughput_vs_p99")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- a realistic results dict --------------------------------------------------------------


def _tier(
    rng: np.random.Generator,
    median_ms: float,
    sigma: float,
    n: int,
    total: int,
    seconds: float,
    accuracy: float | None,
) -> dict[str, Any]:
    """TIERSTATS from log-normal latencies: the CDF as ~60 points, like the HDR histogram's."""
    lat = np.sort(rng.lognormal(np.log(median_ms), sigma, n))
    qs = np.percentile(lat, [50, 90, 95, 99, 99.9])
    fractions = np.concatenate([np.linspace(0.01, 0.9, 40), 1 - np.geomspace(0.1, 0.001, 19)])
    cdf = [[float(np.quantile(lat, f)), float(f)] for f in fractions] + [[float(lat[-1]), 1.0]]
    return {
        "count": n,
        "share": n / total,
        "throughput": n / seconds,
        "accuracy": accuracy,
        "latency_ms": {
            "p50": float(qs[0]),
            "p90": float(qs[1]),
            "p95": float(qs[2]),
            "p99": float(qs[3]),
            "p99.9": float(qs[4]),
            "max": float(lat[-1]),
            "mean": float(lat.mean()),
        },
        "cdf": cdf,
    }


def _level(
    rng: np.random.Generator,
    label: str,
    profile: str,
    delay_ms: float,
    with_llm: bool,
    stable: bool,
) -> dict[str, Any]:
    seconds = 15.0
    counts = {"edge": 2200, "cloud": 520, "edge-degraded": 80}
    total = sum(counts.values())
    rtt = 2 * delay_ms
    tiers = {
        "edge": _tier(rng, 3.1, 0.35, counts["edge"], total, seconds, 0.968),
        "cloud": _tier(rng, 9.0 + rtt, 0.45, counts["cloud"], total, seconds, 0.981),
        "edge-degraded": _tier(rng, 60.0 + rtt, 0.3, counts["edge-degraded"], total, seconds, 0.71),
    }
    everything = _tier(rng, 3.6, 0.8, total, total, seconds, 0.955)
    throughput = total / seconds
    windows = [
        {
            "t_s": 5.0 * (i + 1),
            "n": int(throughput * 5 * (1 + d)),
            "throughput": throughput * (1 + d),
            "p99_ms": everything["latency_ms"]["p99"] * (1 + 2 * d),
        }
        for i, d in enumerate([0.12, -0.04, 0.02, 0.01, -0.015] if stable else [0.3, -0.2, 0.15])
    ]
    level: dict[str, Any] = {
        "label": label,
        "network": {
            "profile": profile,
            "delay_ms": delay_ms,
            "jitter_ms": delay_ms / 10,
            "bandwidth": None if profile == "lan" else "20mbit",
            "rtt_ms": rtt,
            "outages": [] if stable else [[4.0, 5.5]],
        },
        "load": {"mode": "closed", "concurrency": 4},
        "stable": stable,
        "stability_pct": 10.0,
        "windows": windows,
        "used_windows": [2, 3, 4] if stable else [0, 1, 2],
        "duration_s": seconds,
        "requests": total,
        "throughput": throughput,
        "escalation_rate": (counts["cloud"] + counts["edge-degraded"]) / total,
        "accuracy": 0.955,
        "errors": {} if stable else {"DeadlineExceeded": 3, "Unavailable": 1},
        "all": everything,
        "tiers": tiers,
        "split_ms": {
            "local": {"mean": 3.2, "p50": 3.0, "p99": 7.1},
            "gate": {"mean": 0.02, "p50": 0.018, "p99": 0.05},
            "network": {"mean": rtt + 0.4, "p50": rtt + 0.3, "p99": rtt * 1.3 + 1},
            "cloud_queue": {"mean": 0.8, "p50": 0.5, "p99": 4.2},
            "cloud_compute": {"mean": 5.1, "p50": 4.9, "p99": 9.8},
        },
        "llm": None,
    }
    if with_llm:
        ttft = _tier(rng, 42.0, 0.4, 400, 400, seconds, None)["latency_ms"]
        itl = _tier(rng, 11.0, 0.3, 30000, 30000, seconds, None)["latency_ms"]
        level["llm"] = {
            "ttft_ms": ttft,
            "itl_ms": itl,
            "tokens_per_s": 2000.0,
            "tokens_per_s_per_stream": 88.0,
            "output_tokens": 30000,
            "drafted": 24000,
            "accepted": 17500,
            "acceptance": 17500 / 24000,
            "tokens_by_tier": {"edge": 21000, "cloud": 8200, "edge-degraded": 800},
        }
    return level


def _pareto(points: list[dict[str, Any]]) -> list[int]:
    def dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
        no_worse = (
            a["accuracy"] >= b["accuracy"]
            and a["escalation_rate"] <= b["escalation_rate"]
            and a["p95_ms"] <= b["p95_ms"]
        )
        return no_worse and a != b

    return [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]


def make_results(description: str = "Digits over three links.") -> dict[str, Any]:
    """Two levels (the second with LLM metrics and not stable), three tiers each, a threshold
    sweep of 20 points, an RTT sweep over 3 profiles and a closed-loop load sweep with a knee."""
    rng = np.random.default_rng(7)
    levels = [
        _level(rng, "lan c=4", "lan", 0.25, with_llm=False, stable=True),
        _level(rng, "4g c=4", "4g", 40.0, with_llm=True, stable=False),
    ]
    points = []
    for i, t in enumerate(np.linspace(0.5, 0.99, 20)):
        esc = float(0.02 + 0.6 * (t - 0.5) ** 1.6 / 0.49**1.6)
        acc = float(
            0.905
            + 0.075 * (1 - np.exp(-esc / 0.12))
            + (0.004 if i % 4 == 1 else 0.0)
            - (0.006 if i % 5 == 3 else 0.0)
        )
        points.append(
            {
                "threshold": round(float(t), 3),
                "accuracy": acc,
                "escalation_rate": esc,
                "p95_ms": 6.0 + 60 * esc + (4.0 if i % 3 == 2 else 0.0),
            }
        )
    pareto = _pareto(points)
    chosen = min(
        (i for i, p in enumerate(points) if p["accuracy"] >= 0.95),
        key=lambda i: points[i]["escalation_rate"],
    )
    load_x = [1, 2, 4, 8, 16, 32]
    load_thr = [48.0, 93.0, 176.0, 236.0, 248.0, 251.0]
    load_p99 = [9.5, 10.4, 12.8, 21.0, 58.0, 131.0]
    return {
        "schema": "tandem-bench/1",
        "scenario": {
            "name": "digits-links",
            "file": "examples/bench/digits-links.yaml",
            "description": description,
            "task": "digits",
            "kind": "classify",
            "load_mode": "closed",
            "raw": {"name": "digits-links", "task": "digits"},
        },
        "machine": {
            "cpu": "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz",
            "cores": 2,
            "python": "3.11.2",
            "platform": "Linux-6.1.0-x86_64-with-glibc2.36",
            "packages": {"tandem-infer": "0.1.0", "numpy": "2.1.3", "onnxruntime": "1.20.1"},
            "git": "71aeaae",
        },
        "started_at": "2026-11-26T12:00:00Z",
        "duration_s": 96.5,
        "levels": levels,
        "threshold_sweep": {
            "metric": "max_prob",
            "method": "trace",
            "current": 0.8,
            "points": points,
            "pareto": pareto,
            "target": {"accuracy": 0.95},
            "chosen": chosen,
            "edge_only": {"accuracy": 0.905, "p95_ms": 5.6},
            "cloud_only": {"accuracy": 0.981, "p95_ms": 16.2},
        },
        "rtt_sweep": [
            {
                "profile": name,
                "rtt_ms": rtt,
                "level": lv,
                "p50_ms": {
                    "edge": 3.1,
                    "cloud": 9.0 + rtt,
                    "edge-degraded": None,
                    "all": 3.5 + rtt / 20,
                },
                "p95_ms": {
                    "edge": 5.4,
                    "cloud": 14.0 + rtt * 1.1,
                    "edge-degraded": 70.0 + rtt,
                    "all": 12.0 + rtt / 2,
                },
            }
            for name, rtt, lv in (("lan", 0.5, 0), ("wifi", 8.0, 0), ("4g", 80.0, 1))
        ],
        "load_sweep": {
            "mode": "closed",
            "x": "concurrency",
            "points": [
                {"x": float(x), "level": 0, "throughput": t, "p99_ms": p}
                for x, t, p in zip(load_x, load_thr, load_p99, strict=True)
            ],
            "knee": 2,
        },
    }


def minimal_results() -> dict[str, Any]:
    """What a short run without sweeps, labels or LLM gives: one level, one tier."""
    r = make_results()
    level = r["levels"][0]
    level["tiers"] = {"edge": level["tiers"]["edge"]}
    level["split_ms"] = None
    level["accuracy"] = None
    level["windows"] = []
    level["used_windows"] = []
    r["levels"] = [level]
    r["threshold_sweep"] = r["rtt_sweep"] = r["load_sweep"] = None
    del r["machine"]["git"]
    return r


@pytest.fixture
def results() -> dict[str, Any]:
    return make_results()


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


# -- plots ---------------------------------------------------------------------------------


def test_every_plot_is_written_as_a_sane_png(results: dict[str, Any], tmp_path: Path) -> None:
    pngs = write_plots(results, tmp_path)
    assert sorted(pngs) == sorted(PLOTS)
    for name, path in pngs.items():
        assert path == tmp_path / f"{name}.png"
        width, height = _png_size(path)
        assert 700 <= width <= 2200 and 450 <= height <= 1600, (name, width, height)
        assert path.stat().st_size > 20_000, f"{name} looks empty"


def test_plots_only_for_the_data_present(tmp_path: Path) -> None:
    pngs = write_plots(minimal_results(), tmp_path)
    assert list(pngs) == ["latency_cdf"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latency_cdf.png"]
    _png_size(pngs["latency_cdf"])


def test_plots_survive_odd_values(results: dict[str, Any], tmp_path: Path) -> None:
    """Nulls inside sweeps, a target on escalation, an open-loop sweep, 5 levels, a ``$``."""
    results["scenario"]["name"] = "costs $5 $"
    results["levels"] = [copy.deepcopy(results["levels"][0]) for _ in range(5)]
    sweep = results["threshold_sweep"]
    sweep["target"] = {"escalation_rate": 0.2}
    sweep["chosen"] = None
    sweep["points"][3]["p95_ms"] = None
    results["rtt_sweep"][0]["p50_ms"]["cloud"] = None
    results["rtt_sweep"][0]["rtt_ms"] = 0.0
    results["load_sweep"].update(mode="open", x="rate", knee=None)
    pngs = write_plots(results, tmp_path)
    assert sorted(pngs) == sorted(PLOTS)


def test_plots_import_no_pyplot() -> None:
    """The figures use Figure + Agg directly: pyplot's global state stays untouched."""
    import subprocess
    import sys

    code = (
        "import sys, tempfile, pathlib\n"
        "import tandem.bench.plots, tandem.bench.html_report, tandem.bench.compare\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported eagerly'\n"
        "from tests.bench.test_bench_output import make_results\n"
        "tandem.bench.plots.write_plots(make_results(), pathlib.Path(tempfile.mkdtemp()))\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=90)


# -- HTML ----------------------------------------------------------------------------------


def test_html_is_self_contained_and_embeds_every_plot(
    results: dict[str, Any], tmp_path: Path
) -> None:
    pngs = write_plots(results, tmp_path)
    path = write_html(results, pngs, tmp_path / "report.html")
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert text.count("data:image/png;base64,") == len(pngs) == 4
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    assert "<script" not in text.lower()
    assert "<link" not in text.lower()
    for level in results["levels"]:
        assert level["label"] in text
    assert "not stable" in text
    assert "DeadlineExceeded" in text
    assert "Intel(R) Xeon(R) Platinum 8375C" in text and "71aeaae" in text
    assert "ttft" in text.lower() and "acceptance" in text.lower()


def test_html_escapes_user_text(tmp_path: Path) -> None:
    results = make_results(description="<script>alert(1)</script> & more")
    results["levels"][0]["label"] = 'lan <img src=x onerror="alert(2)">'
    results["levels"][0]["errors"] = {"<b>Boom</b>": 1}
    path = write_html(results, {}, tmp_path / "report.html")
    text = path.read_text(encoding="utf-8")
    assert "<script" not in text.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in text
    assert "<img" not in text
    assert "&lt;b&gt;Boom&lt;/b&gt;" in text


def test_html_marks_pareto_and_chosen_thresholds(results: dict[str, Any], tmp_path: Path) -> None:
    text = write_html(results, {}, tmp_path / "r.html").read_text(encoding="utf-8")
    text = text.split("<h2>Threshold sweep</h2>")[1].split("<h2>")[0]
    sweep = results["threshold_sweep"]
    rows = re.findall(r"<tr class=\"([^\"]*)\"[^>]*>\s*<td[^>]*>([0-9.]+)</td>", text)
    by_threshold = {float(t): cls for cls, t in rows}
    chosen = sweep["points"][sweep["chosen"]]["threshold"]
    assert "chosen" in by_threshold[chosen]
    pareto = {sweep["points"][i]["threshold"] for i in sweep["pareto"]}
    for p in sweep["points"]:
        assert ("pareto" in by_threshold[p["threshold"]]) == (p["threshold"] in pareto)
    assert len(pareto) < len(sweep["points"])  # the fixture has dominated points


def test_html_without_optional_parts(tmp_path: Path) -> None:
    results = minimal_results()
    pngs = write_plots(results, tmp_path)
    text = write_html(results, pngs, tmp_path / "report.html").read_text(encoding="utf-8")
    assert text.count("data:image/png;base64,") == 1
    assert "Threshold sweep" not in text and "LLM" not in text
    assert "digits-links" in text


# -- compare -------------------------------------------------------------------------------


def _row(rows: list[Row], level: str, metric: str) -> Row:
    found = [r for r in rows if r.level == level and r.metric == metric]
    assert len(found) == 1, (level, metric, [(r.level, r.metric) for r in rows])
    return found[0]


def test_compare_flags_a_doubled_p99_and_not_a_small_change(results: dict[str, Any]) -> None:
    b = copy.deepcopy(results)
    lan = b["levels"][0]
    lan["tiers"]["cloud"]["latency_ms"]["p99"] *= 2.0
    lan["tiers"]["edge"]["latency_ms"]["p99"] *= 1.03
    lan["throughput"] *= 1.5
    rows = compare(results, b)
    cloud = _row(rows, "lan c=4", "cloud p99")
    assert cloud.ratio == pytest.approx(2.0) and cloud.flag == "worse"
    edge = _row(rows, "lan c=4", "edge p99")
    assert edge.ratio == pytest.approx(1.03) and edge.flag == ""
    assert _row(rows, "lan c=4", "throughput").flag == "better"
    assert _row(rows, "lan c=4", "edge p50").flag == ""
    assert not [r for r in rows if r.flag == "warning"]


def test_compare_noise_comes_from_the_windows(results: dict[str, Any]) -> None:
    """The unstable 4g level's windows spread ~50%: a 30% change there is within noise."""
    b = copy.deepcopy(results)
    b["levels"][1]["tiers"]["cloud"]["latency_ms"]["p99"] *= 1.3
    b["levels"][0]["tiers"]["cloud"]["latency_ms"]["p99"] *= 1.3
    rows = compare(results, b)
    noisy = _row(rows, "4g c=4", "cloud p99")
    assert noisy.noise_pct > 40 and noisy.flag == ""
    quiet = _row(rows, "lan c=4", "cloud p99")
    assert quiet.noise_pct == pytest.approx(10.0) and quiet.flag == "worse"


def test_compare_fractions_and_llm(results: dict[str, Any]) -> None:
    b = copy.deepcopy(results)
    b["levels"][0]["accuracy"] = 0.90  # -5.5 points on ~2800 answers: real
    b["levels"][0]["escalation_rate"] *= 0.5
    b["levels"][1]["llm"]["ttft_ms"]["p95"] *= 0.4  # beyond the unstable level's ~86%
    b["levels"][1]["llm"]["tokens_per_s"] *= 1.02
    rows = compare(results, b)
    assert _row(rows, "lan c=4", "accuracy").flag == "worse"
    assert _row(rows, "lan c=4", "escalation rate").flag == "better"
    assert _row(rows, "4g c=4", "llm ttft p95").flag == "better"
    assert _row(rows, "4g c=4", "llm tokens/s").flag == ""
    assert not [r for r in rows if r.level == "lan c=4" and r.metric.startswith("llm")]


def test_compare_warns_about_unmatched_levels_machines_and_scenarios(
    results: dict[str, Any],
) -> None:
    b = copy.deepcopy(results)
    b["levels"][1]["label"] = "5g c=4"
    b["machine"]["cores"] = 16
    b["scenario"]["name"] = "other"
    del b["levels"][0]["tiers"]["edge-degraded"]
    rows = compare(results, b)
    notes = " | ".join(r.note for r in rows if r.flag == "warning")
    assert "4g c=4" in notes and "only in A" in notes
    assert "5g c=4" in notes and "only in B" in notes
    assert "machines differ" in notes and "scenarios differ" in notes
    assert {r.level for r in rows if r.flag != "warning"} == {"lan c=4"}
    gone = _row(rows, "lan c=4", "edge-degraded p99")
    assert gone.a is not None and gone.b is None and gone.ratio is None and gone.flag == ""


def test_compare_rejects_files_that_are_not_results(tmp_path: Path) -> None:
    bench = tmp_path / "bench-wire.json"
    bench.write_text(json.dumps({"benchmark": "wire", "machine": {}, "results": {}}))
    with pytest.raises(ConfigError, match="tandem-bench/1"):
        load_results(bench)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match=r"broken\.json"):
        load_results(broken)
    with pytest.raises(ConfigError, match="schema"):
        compare(make_results(), {"schema": "tandem-bench/0", "levels": []})
    good = tmp_path / "good.json"
    good.write_text(json.dumps(make_results()))
    assert load_results(good)["schema"] == "tandem-bench/1"


def test_print_compare_renders_a_table(results: dict[str, Any]) -> None:
    b = copy.deepcopy(results)
    b["levels"][0]["tiers"]["cloud"]["latency_ms"]["p99"] *= 2.0
    b["machine"]["cpu"] = "AMD EPYC 7R13"
    console = Console(record=True, width=140, color_system=None)
    print_compare(compare(results, b), console)
    out = console.export_text()
    assert "machines differ" in out
    lan = out.split("lan c=4", 1)[1].split("4g c=4", 1)[0]
    line = next(ln for ln in lan.splitlines() if "cloud p99" in ln)
    assert "worse" in line and "2.00" in line and "56.0 ms" in line


def test_compare_pairs_levels_in_order_when_no_label_matches(results: dict[str, Any]) -> None:
    """One scenario over two links (labels name the link): levels are compared in order."""
    b = copy.deepcopy(results)
    for lv in b["levels"]:
        lv["label"] = "other " + lv["label"]
    b["levels"][0]["tiers"]["cloud"]["latency_ms"]["p99"] *= 3.0
    rows = compare(results, b)
    assert any("compared in order" in r.note for r in rows if r.flag == "warning")
    row = _row(rows, "lan c=4 → other lan c=4", "cloud p99")
    assert row.ratio == pytest.approx(3.0) and row.flag == "worse"
    b["levels"].pop()  # a different number of levels: nothing is paired
    assert not [r for r in compare(results, b) if r.flag != "warning"]
