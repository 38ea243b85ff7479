"""Train the reference language-model pair on the letter-sorting task
(:mod:`tandem.reference.lm_task`), and export it for llama.cpp.

* ``sort-edge``: a small dense ``LlamaForCausalLM`` trained briefly: right on short items,
  wrong on long ones. Served on the edge as GGUF (``edge-q8_0.gguf``; ``edge-f16.gguf`` beside
  it) by llama.cpp.
* ``sort-cloud``: a ``MixtralForCausalLM`` (8 experts, top-2) trained for 2.5× the steps
  (about 7× the time): right on more of the long items. Served by the cloud as a transformers
  directory with its experts on Tandem's kernels (``experts_implementation="tandem"``); GGUF
  copies too.

The gap comes mostly from the cloud model's **longer training** (both are built once and
cached): on 2 CPU cores the MoE takes ~3× longer per step than the dense model. Budgets are optimiser steps by default, so a build gives the same weights on a busy
machine as on an idle one (for a fixed thread count); a wall-clock budget is available too.
``llm_report.json`` records the steps, the seconds they took and the accuracy per difficulty.

The MoE trains through transformers' ``eager`` experts (Tandem's ``"tandem"`` experts run
without gradients); the saved directory loads with ``experts_implementation="tandem"``, and
the cloud model is evaluated that way.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from tandem.reference import lm_task
from tandem.reference.lm_task import DIFFICULTIES, evaluate, generate_answers
from tandem.reference.models import Progress, default_models_dir
from tandem.runtime.machine import machine
from tandem.runtime.manifest import (
    Manifest,
    ModelEntry,
    load_manifest,
    sha256_file,
    write_manifest,
)
from tandem.runtime.tokenizer import EOS, CharTokenizer

__all__ = [
    "DIFFICULTIES",
    "build_llm_models",
    "evaluate",
    "generate_answers",
    "load_lm",
    "make_model",
    "train_lm",
]

log = logging.getLogger(__name__)

LLM_RECIPE_VERSION = "1"  # bump when the task or a model recipe changes: invalidates caches
# Default budgets, in optimiser steps (the same weights on a busy machine as on an idle one).
# Measured per step on a nearly idle 2-core AMD EPYC (2 threads): edge 0.20 s, cloud 0.59 s,
# so about 40 s + 5 min of training. Measured accuracies: llm_report.json / README.
EDGE_STEPS = 200
CLOUD_STEPS = 500
TRAIN_THREADS = 2
REPORT_NAME = "llm_report.json"
CLOUD = "sort-cloud"  # the manifest names of the pair the tools and benchmarks run
EDGE_GGUF = "sort-edge-q8_0"
GGUF_QTYPES = ("f16", "q8_0")
EVAL_N = 200  # held-out items per difficulty in the build's report
# A batch runs as this many length-sorted slices: items of 4 to 24 letters padded to the
# longest in one batch waste ~35% of the tokens; in four slices, ~10%.
MICRO_BATCHES = 4


@dataclass(frozen=True)
class Recipe:
    """One model's architecture and optimiser settings (learning rate in AdamW units, batch in
    items, warm-up as a fraction of the budget)."""

    arch: str  # "llama" or "mixtral"
    hidden: int
    layers: int
    heads: int
    intermediate: int
    experts: int = 0
    top_k: int = 0
    batch: int = 64
    lr: float = 3e-3
    warmup: float = 0.05


EDGE_RECIPE = Recipe("llama", hidden=128, layers=3, heads=4, intermediate=512)
CLOUD_RECIPE = Recipe(
    "mixtral", hidden=128, layers=4, heads=4, intermediate=512, experts=8, top_k=2
)
ROLES = {"edge": EDGE_RECIPE, "cloud": CLOUD_RECIPE}
MAX_POSITIONS = 128  # longest item: BOS + "sort:" + 24 + "=" + 24 + EOS = 56 tokens


def default_llm_dir() -> Path:
    """``llm-v{LLM_RECIPE_VERSION}`` beside the digits models (``$TANDEM_CACHE_DIR`` or the
    user cache dir)."""
    return default_models_dir().with_name(f"llm-v{LLM_RECIPE_VERSION}")


def register_tandem_experts() -> None:
    """Import the module that registers ``experts_implementation="tandem"``."""
    importlib.import_module("tandem.runtime.moe")


def make_model(recipe: Recipe, n_vocab: int, seed: int) -> Any:
    """A freshly initialised ``LlamaForCausalLM``/``MixtralForCausalLM`` under ``seed``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    common = dict(
        vocab_size=n_vocab,
        hidden_size=recipe.hidden,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads,
        intermediate_size=recipe.intermediate,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=EOS,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    if recipe.arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    config = MixtralConfig(
        **common, num_local_experts=recipe.experts, num_experts_per_tok=recipe.top_k
    )
    model = MixtralForCausalLM(config)
    model.set_experts_implementation("eager")  # the "tandem" experts have no gradients
    return model


class ItemSource(Protocol):
    """Where training batches come from: items with ``prompt``, ``answer`` and ``difficulty``
    (:class:`~tandem.reference.lm_task.SortItem` or alike)."""

    def batch(self, n: int) -> list[Any]: ...


@dataclass
class TrainStats:
    steps: int
    seconds: float  # wall clock spent training
    final_loss: float  # mean over the last 20 steps, nats per answer token


def train_lm(
    model: Any,
    tok: CharTokenizer,
    recipe: Recipe,
    *,
    seconds: float | None = None,
    steps: int | None = None,
    seed: int,
    name: str = "model",
    progress: Progress | None = None,
    report_every_s: float = 15.0,
    stream: ItemSource | None = None,
) -> TrainStats:
    """Train on ``stream``'s items (default :class:`~tandem.reference.lm_task.TrainingStream`
    of ``seed``) until ``seconds`` of wall clock have passed, or for ``steps`` optimiser steps
    (one of the two: a step budget gives the same weights on a busy machine as on an idle
    one): loss on answer tokens (and EOS) only, AdamW (0.9, 0.98), linear warm-up for
    ``recipe.warmup`` of the budget, then cosine to zero."""
    import torch

    if (seconds is None) == (steps is None):
        raise ValueError("give a budget in seconds or in steps, not both")

    say = progress or log.info
    stream = lm_task.TrainingStream(seed) if stream is None else stream
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.98), weight_decay=0.01)
    extra = {"output_router_logits": True} if recipe.arch == "mixtral" else {}
    model.train()
    losses: list[float] = []
    start = last_report = time.perf_counter()
    step = 0

    def spent() -> float:
        """Share of the budget used so far."""
        if steps is not None:
            return step / steps
        assert seconds is not None
        return (time.perf_counter() - start) / seconds

    while (frac := spent()) < 1.0:
        if frac < recipe.warmup:
            scale = frac / recipe.warmup
        else:
            scale = 0.5 * (1 + math.cos(math.pi * (frac - recipe.warmup) / (1 - recipe.warmup)))
        for group in opt.param_groups:
            group["lr"] = recipe.lr * max(scale, 0.01)
        opt.zero_grad(set_to_none=True)
        loss = _accumulate(model, tok, stream.batch(recipe.batch), extra)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss)
        step += 1
        now = time.perf_counter()
        if now - last_report >= report_every_s:
            last_report = now
            recent = losses[-20:]
            budget = f"/{steps}" if steps is not None else f", {now - start:.0f}/{seconds:.0f} s"
            say(f"{name}: step {step}{budget}, loss {sum(recent) / len(recent):.3f}")
    model.eval()
    tail = losses[-20:] or [float("nan")]
    return TrainStats(step, time.perf_counter() - start, sum(tail) / len(tail))


def _accumulate(model: Any, tok: CharTokenizer, items: list[Any], extra: dict) -> float:
    """Backpropagate the mean answer-token loss of ``items`` as :data:`MICRO_BATCHES` passes
    over length-sorted slices (the same gradient as one padded batch, with little padding);
    return the loss (nats per answer token)."""
    import torch

    items = sorted(items, key=lambda it: it.difficulty)
    size = -(-len(items) // MICRO_BATCHES)
    parts = [lm_task.encode_batch(tok, items[i : i + size]) for i in range(0, len(items), size)]
    counts = [int((b.labels != -100).sum()) for b in parts]
    total = 0.0
    for b, n in zip(parts, counts, strict=True):
        out = model(
            input_ids=torch.from_numpy(b.input_ids),
            attention_mask=torch.from_numpy(b.attention_mask),
            labels=torch.from_numpy(b.labels),
            **extra,
        )
        (out.loss * (n / sum(counts))).backward()
        total += float(out.loss.detach()) * n / sum(counts)
    return total


def load_lm(hf_dir: str | Path, *, experts: str = "tandem") -> Any:
    """A saved model in eval mode, float32; a Mixtral's experts on ``experts``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    extra: dict[str, Any] = {}
    if AutoConfig.from_pretrained(hf_dir).model_type == "mixtral":
        if experts == "tandem":
            register_tandem_experts()
        extra["experts_implementation"] = experts
    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, **extra).eval()


def _params(model: Any, recipe: Recipe) -> tuple[int, int]:
    """(total, active per token) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    if not recipe.experts:
        return total, total
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return total, total - expert + expert * recipe.top_k // recipe.experts


Budget = tuple[float | None, int]  # (wall-clock seconds, steps); seconds, if given, win


def _budget_str(budget: Budget) -> str:
    seconds, steps = budget
    return f"{seconds:g}s" if seconds is not None else f"{steps}steps"


def _version(seed: int, threads: int, budgets: dict[str, Budget]) -> str:
    parts = [LLM_RECIPE_VERSION, str(seed), f"{threads}t", *map(_budget_str, budgets.values())]
    return ".".join(parts)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Training runs on a fixed number of torch threads: results repeat for a fixed count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _size(path: Path) -> int:
    """Bytes of a file, or of all the files in a directory."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def _entry(out: Path, name: str, file: str, fmt: str, quant: str, version: str, **kw) -> ModelEntry:
    """A manifest entry (no input/output spec: a language model takes text) whose version is
    ``{version}-{first 8 hex digits of its sha256}``."""
    path = out / file
    digest = sha256_file(path)  # a directory's digest covers every file in it
    return ModelEntry(
        name=name,
        version=f"{version}-{digest[:8]}",
        file=file,
        sha256=digest,
        size_bytes=_size(path),
        format=fmt,
        quantization=quant,
        **kw,
    )


def _paths(out: Path) -> dict[str, Path]:
    paths = {"dir": out, "manifest": out / "manifest.json", "report": out / REPORT_NAME}
    for role in ROLES:
        paths[f"{role}-hf"] = out / role
        for q in GGUF_QTYPES:
            paths[f"{role}-{q}"] = out / f"{role}-{q}.gguf"
    return paths


def is_llm_built(out: Path, version: str) -> bool:
    """True if ``out`` holds every model of this recipe/seed/budgets, intact."""
    return manifest_holds(out, version, len(ROLES) * (1 + len(GGUF_QTYPES)))


def reuse_build(
    out: Path,
    cache: Path,
    version: str,
    is_built: Callable[[Path, str], bool],
    what: str,
    say: Callable[[str], None],
) -> bool:
    """True if ``out`` holds build ``version`` already, or now does, copied from the cache
    directory that holds it (then nothing needs training)."""
    if is_built(out, version):
        say(f"{what} models already built in {out}")
        return True
    if out.resolve() != cache.resolve() and is_built(cache, version):
        say(f"copying the {what} models built in {cache} (same settings) to {out}")
        shutil.copytree(cache, out, dirs_exist_ok=True)
        return True
    return False


def manifest_holds(out: Path, version: str, n_models: int) -> bool:
    """True if ``out``'s manifest lists ``n_models`` models of build ``version``, every file
    intact (its sha256)."""
    try:
        entries = load_manifest(out).models
        return len(entries) == n_models and all(
            e.version.startswith(version + "-") and sha256_file(out / e.file) == e.sha256
            for e in entries
        )
    except Exception:
        return False


def build_llm_models(
    out_dir: str | Path | None = None,
    *,
    edge_seconds: float | None = None,
    cloud_seconds: float | None = None,
    edge_steps: int = EDGE_STEPS,
    cloud_steps: int = CLOUD_STEPS,
    threads: int = TRAIN_THREADS,
    seed: int = 0,
    eval_n: int = EVAL_N,
    force: bool = False,
    progress: Progress | None = None,
) -> dict[str, Path]:
    """Train, evaluate and export the edge/cloud pair into ``out_dir`` (default
    :func:`default_llm_dir`), unless it is already built with these settings; return the
    paths: ``dir``, ``manifest``, ``report``, ``{edge,cloud}-hf`` (directories),
    ``{edge,cloud}-{f16,q8_0}`` (GGUF files).

    Each model trains for ``*_steps`` optimiser steps, or for ``*_seconds`` of wall clock
    where given (then the weights depend on the machine's speed and load), on ``threads``
    torch threads; ``eval_n`` held-out items per difficulty go into the report."""
    out = Path(out_dir) if out_dir else default_llm_dir()
    say = progress or log.info
    budgets: dict[str, Budget] = {
        "edge": (edge_seconds, edge_steps),
        "cloud": (cloud_seconds, cloud_steps),
    }
    version = _version(seed, threads, budgets)
    paths = _paths(out)
    if not force and reuse_build(out, default_llm_dir(), version, is_llm_built, "language", say):
        return paths
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "task": "sort lowercase letters (exact match, greedy)",
        "difficulties": list(DIFFICULTIES),
        "n_per_difficulty": eval_n,
        "seed": seed,
        "threads": threads,
        "machine": machine(),  # wall-clock seconds below are this machine's, under its load
        "models": {},
    }
    entries: list[ModelEntry] = []
    with _torch_threads(threads):
        for role in ROLES:
            report["models"][role], made = _build_one(
                out, role, budgets[role], seed=seed, eval_n=eval_n, version=version, say=say
            )
            entries += made
    paths["report"].write_text(json.dumps(report, indent=2) + "\n")
    write_manifest(out, Manifest(models=entries, workload="sort-letters", seed=seed))
    return paths


def save_lm(model: Any, tok: CharTokenizer, hf_dir: Path) -> None:
    """``model`` and its tokenizer into ``hf_dir``, emptied first (no stale files from an
    earlier build in the directory's digest)."""
    shutil.rmtree(hf_dir, ignore_errors=True)
    model.save_pretrained(hf_dir)
    tok.save(hf_dir)


def describe(recipe: Recipe) -> str:
    """A manifest description of ``recipe``'s architecture."""
    desc = f"{recipe.arch}, hidden {recipe.hidden}, {recipe.layers} layers"
    if recipe.experts:
        desc += f", {recipe.experts} experts top-{recipe.top_k}"
    return desc


def _export_ggufs(
    out: Path,
    role: str,
    name: str,
    qtypes: tuple[str, ...],
    desc: str,
    version: str,
    say: Progress,
) -> list[ModelEntry]:
    """Export ``out/role`` (a saved model directory) as ``out/{role}-{q}.gguf`` for each of
    ``qtypes``; their manifest entries, named ``{name}-{q}``."""
    from tandem.runtime.gguf import export_gguf

    entries = []
    for q in qtypes:
        file = f"{role}-{q}.gguf"
        export_gguf(out / role, out / file, qtype=q)  # type: ignore[arg-type]
        say(f"{role}: wrote {file}")
        entries.append(
            _entry(out, f"{name}-{q}", file, "gguf", q, version, description=f"{desc}, {q}")
        )
    return entries


def _build_one(
    out: Path, role: str, budget: Budget, *, seed: int, eval_n: int, version: str, say: Progress
) -> tuple[dict[str, Any], list[ModelEntry]]:
    """Train, save, evaluate and export one model; its report section and manifest entries."""
    recipe, tok = ROLES[role], lm_task.tokenizer()
    model = make_model(recipe, tok.n_vocab, seed)
    total, active = _params(model, recipe)
    seconds, steps = budget
    span = f"{seconds:g} s" if seconds is not None else f"{steps} steps"
    say(f"training {role} ({recipe.arch}, {total / 1e6:.2f}M params) for {span}")
    stats = train_lm(
        model, tok, recipe, seconds=seconds, steps=None if seconds is not None else steps,
        seed=seed, name=role, progress=say,
    )  # fmt: skip
    hf = out / role
    save_lm(model, tok, hf)
    del model
    say(f"{role}: {stats.steps} steps, loss {stats.final_loss:.3f}; evaluating")
    acc = evaluate(load_lm(hf), DIFFICULTIES, eval_n, tokenizer=tok)
    say(f"{role}: exact match " + ", ".join(f"{d}: {a:.2f}" for d, a in acc.items()))
    desc = describe(recipe)
    metrics = {f"exact_match_len{d}": a for d, a in acc.items()}
    entries = [
        _entry(out, f"sort-{role}", role, "transformers", "none", version, metrics=metrics,
               description=desc)
    ]  # fmt: skip
    entries += _export_ggufs(out, role, f"sort-{role}", GGUF_QTYPES, desc, version, say)
    section = {
        "recipe": asdict(recipe),
        "params": total,
        "active_params": active,
        "train": asdict(stats),
        "accuracy": {str(d): a for d, a in acc.items()},
    }
    return section, entries
