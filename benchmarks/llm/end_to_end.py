"""The LLM path, end to end: each Tandem figure beside its reference, measured in the same run.

``python -m benchmarks.llm [--quick] [--json PATH] [--only SECTION ...] [--threads T]
[--models-dir DIR] [--cache-dir DIR]`` (``python -m benchmarks.llm.end_to_end`` too)

Models: the reference pair from :func:`tandem.reference.lm_models.build_llm_models`
(``sort-edge``: Llama 0.8M, GGUF q8_0; ``sort-cloud``: Mixtral 6.6M, a transformers directory),
built and cached on first use, or the models directory ``--models-dir`` names. Every side runs
``--threads`` threads (default 2). Runs are interleaved and medians reported, so drift in the
machine's load hits both sides alike.

Each section is a module of its own, which says what it measures (``--help`` prints them all):
:mod:`~benchmarks.llm.edge_decode` (edge), :mod:`~benchmarks.llm.moe_vs_llama_cpp` (moe),
:mod:`~benchmarks.llm.concurrency`, :mod:`~benchmarks.llm.cascade` and
:mod:`~benchmarks.llm.streaming`; what they share is :mod:`benchmarks.llm.harness`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

from benchmarks.common import print_table, write_results
from benchmarks.llm import cascade, concurrency, edge_decode, moe_vs_llama_cpp, streaming
from benchmarks.llm.harness import QUICK, Bench, Sizes, resolve_models, say
from benchmarks.llm.llama_server import llama_server

__all__ = ["SECTIONS", "llama_server", "main"]  # llama_server: tests start one from here

# Each section: ``run(bench) -> (json, table rows)``, ``title(bench, json) -> (title, note)``,
# ``COLUMNS``; the module's docstring says what it measures.
SECTIONS: dict[str, ModuleType] = {
    "edge": edge_decode,
    "moe": moe_vs_llama_cpp,
    "concurrency": concurrency,
    "cascade": cascade,
    "streaming": streaming,
}


def description() -> str:
    """``--help``'s text: this module's docstring, then each section's."""
    parts = [(__doc__ or "").split("\n\nEach section is a module")[0]]
    parts += [(m.__doc__ or "").strip() for m in SECTIONS.values()]
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.llm",
        description=description(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="small sizes (about 2 minutes)")
    ap.add_argument("--json", default=None, help="write results here (default bench-llm.json)")
    ap.add_argument(
        "--only", nargs="+", choices=list(SECTIONS), default=None, help="run these only"
    )
    ap.add_argument("--threads", type=int, default=2, help="threads on every side")
    ap.add_argument("--models-dir", type=Path, default=None, help="default: the reference build")
    ap.add_argument("--cache-dir", type=Path, default=None, help="GGUF copies and the 25.7M model")
    ap.add_argument("--difficulties", default=None, help="cascade: comma-separated lengths")
    ap.add_argument("--n", type=int, default=None, help="cascade: test items per length")
    args = ap.parse_args(argv)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    sizes = QUICK if args.quick else Sizes()
    if args.difficulties:
        sizes = replace(sizes, difficulties=tuple(int(d) for d in args.difficulties.split(",")))
    if args.n:
        sizes = replace(sizes, cascade_n=args.n, cascade_cal_n=args.n)
    sections = [s for s in SECTIONS if args.only is None or s in args.only]
    if args.cache_dir is None:
        from tandem.reference.models import default_models_dir

        args.cache_dir = default_models_dir().with_name("bench-llm-v1")

    started = time.perf_counter()
    load_before = os.getloadavg()
    models_dir, edge, cloud = resolve_models(args.models_dir)
    results: dict[str, Any] = {}
    failed = False
    with tempfile.TemporaryDirectory(prefix="tandem-bench-llm-") as tmp:
        b = Bench(models_dir, edge, cloud, args.cache_dir, Path(tmp), args.threads, sizes)
        try:
            for section in sections:
                module = SECTIONS[section]
                t0 = time.perf_counter()
                try:
                    data, rows = module.run(b)
                except Exception as e:
                    failed = True
                    say(f"{section} failed: {type(e).__name__}: {e}")
                    results[section] = {"error": f"{type(e).__name__}: {e}"}
                    continue
                data["seconds"] = time.perf_counter() - t0
                results[section] = data
                title, note = module.title(b, data)
                print_table(title, module.COLUMNS, rows, note)
        finally:
            b.close()
    load_after = os.getloadavg()
    from rich.console import Console

    Console().print(
        f"load average (1 min) {load_before[0]:.2f} at the start, {load_after[0]:.2f} at the "
        f"end; {time.perf_counter() - started:.0f} s in all"
    )
    settings = {
        "quick": args.quick,
        "threads": args.threads,
        "models_dir": str(models_dir),
        "sizes": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(sizes).items()},
    }
    out = Path(args.json or "bench-llm.json")
    write_results(out, "llm", settings, results, (load_before[0], load_after[0]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
