"""What the sections of the LLM benchmark (:mod:`benchmarks.llm.end_to_end`) share: how much
each runs (:class:`Sizes`), the models (:func:`resolve_models`), a worker process
(:class:`Bench`), and small helpers for logs, digests and figures."""

from __future__ import annotations

import contextlib
import hashlib
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tandem.reference.lm_models import CLOUD, EDGE_GGUF

N_CTX = 512  # llama.cpp's context on every llama.cpp side


@dataclass(frozen=True)
class Sizes:
    """How much each section runs (default: about 5–8 minutes on 2 idle cores)."""

    edge_tokens: int = 128
    edge_rounds: int = 5
    edge_run_s: float = 0.4  # a timed run repeats the call until it lasts this long
    moe_tokens: int = 128
    moe_repeat: int = 3
    conc_levels: tuple[int, ...] = (1, 8, 32)
    conc_seconds: float = 3.0
    conc_repeat: int = 3
    conc_max_tokens: int = 40
    difficulties: tuple[int, ...] = (4, 8, 12, 16, 24)
    cascade_n: int = 40
    cascade_cal_n: int = 40
    stream_requests: int = 24


QUICK = Sizes(
    edge_tokens=64,
    edge_rounds=3,
    edge_run_s=0.1,
    moe_tokens=32,
    moe_repeat=1,
    conc_seconds=0.8,
    conc_repeat=1,
    difficulties=(4, 12, 24),
    cascade_n=4,
    cascade_cal_n=6,
    stream_requests=6,
)


def say(msg: str) -> None:
    print(f"[llm-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Bench:
    """What the sections share: the models, settings, a scratch dir, one worker process."""

    models_dir: Path
    edge_gguf: Path
    cloud_hf: Path
    cache: Path
    tmp: Path
    threads: int
    sizes: Sizes
    _workers: dict[str, Any] = field(default_factory=dict)
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def worker(
        self,
        key: str = "sort-cloud",
        *,
        models_dir: Path | None = None,
        models: Sequence[str] = (CLOUD,),
        generation: dict[str, Any] | None = None,
    ) -> Any:
        """A worker process on loopback (started once per ``key``): by default serving
        ``sort-cloud``; ``generation``: its config's ``generation`` section."""
        if key not in self._workers:
            from tandem.cloud.config import WorkerConfig
            from tandem.cloud.process import WorkerProcess

            cfg = WorkerConfig.model_validate(
                {
                    "bind": "tcp://127.0.0.1:*",
                    "models_dir": str(models_dir or self.models_dir),
                    "models": list(models),
                    "threads": self.threads,
                    "generation": generation or {},
                }
            )
            log_path = self.tmp / f"worker-{key}.log"
            log = self._stack.enter_context(open(log_path, "wb"))  # noqa: SIM115
            say(f"starting a worker ({key}) serving {', '.join(models)}")
            w = WorkerProcess(cfg, startup_timeout_s=300, stderr=log)
            try:
                w.start()
            except Exception:
                raise RuntimeError(f"worker failed: {tail(log_path)}") from None
            self._stack.callback(w.__exit__, None, None, None)
            self._workers[key] = w
        return self._workers[key]

    def close(self) -> None:
        self._stack.close()


def tail(path: Path, n: int = 2000) -> str:
    """The last ``n`` characters of a log file, for an error message."""
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def sha(path: Path) -> str:
    """The file's SHA-256 (hex): what cached copies of a model are named by."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ratio(a: float, b: float) -> float:
    """``a / b``; NaN when ``b`` is 0 or not finite."""
    return a / b if b and math.isfinite(b) else math.nan


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile of the finite ``samples`` (NaN when there are none)."""
    a = np.asarray(samples, dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(np.percentile(a, q)) if len(a) else math.nan


def resolve_models(models_dir: Path | None) -> tuple[Path, Path, Path]:
    """(models dir, edge q8_0 GGUF, cloud transformers dir): ``models_dir`` as it is, or the
    default reference build (built now if it is not cached)."""
    from tandem.runtime.manifest import load_manifest

    if models_dir is None:
        from tandem.reference.lm_models import build_llm_models

        models_dir = build_llm_models(progress=say)["dir"]
    m = load_manifest(models_dir)
    return models_dir, models_dir / m.get(EDGE_GGUF).file, models_dir / m.get(CLOUD).file
