"""Models for speculative decoding: an edge/cloud pair on the long sorting task
(:data:`~tandem.reference.lm_task.LONG_SORT`: 8 to 40 letters, answers up to 40 tokens
plus EOS), and the edge model distilled from the cloud's own answers.

* ``spec-edge``: the reference edge recipe (``LlamaForCausalLM``, hidden 128, 3 layers),
  a transformers directory and GGUF q8_0 (``spec-edge-q8_0``).
* ``spec-cloud``: the reference cloud recipe (``MixtralForCausalLM``, 8 experts top-2), a
  transformers directory (served with ``experts_implementation="tandem"``) and GGUF f16 and
  q8_0.
* ``spec-edge-distilled``: ``spec-edge`` trained on for ``distill_steps`` steps on
  (prompt, the cloud's greedy answer) pairs for a fixed set of training prompts; a
  transformers directory and GGUF q8_0.

All three share the sort task's tokenizer (ids 0–2 specials, then ``a``–``z``, ``:``, ``=``),
so an edge model's drafts are token ids the cloud model reads directly.

``spec_report.json`` records steps and seconds per model, exact match per difficulty, and the
**greedy token agreement** of each edge model with the cloud on held-out items of 32–40
letters: the share of the cloud's greedy answer tokens (EOS included) that the edge model's
argmax, given the cloud's prefix, reproduces. That is the per-token acceptance probability of
greedy speculative decoding; ``tokens_per_cloud_call`` replays the same matches as
speculative decoding with each of :data:`GAMMAS` drafted tokens per verification.

Budgets are optimiser steps (the same weights on a busy machine as on an idle one, for a fixed
thread count). Build: ``python -m tandem.reference.spec_models [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tandem.reference import lm_task
from tandem.reference.lm_models import (
    CLOUD_RECIPE,
    EDGE_RECIPE,
    TRAIN_THREADS,
    Recipe,
    _entry,
    _export_ggufs,
    _params,
    _torch_threads,
    describe,
    load_lm,
    make_model,
    manifest_holds,
    reuse_build,
    save_lm,
    train_lm,
)
from tandem.reference.lm_task import LONG_SORT, SortItem, evaluate, generate_ids
from tandem.reference.models import Progress, default_models_dir
from tandem.runtime.machine import machine
from tandem.runtime.manifest import (
    Manifest,
    ModelEntry,
    write_manifest,
)
from tandem.runtime.tokenizer import EOS, CharTokenizer

__all__ = [
    "DISTILL_STEPS",
    "SPEC_LENGTHS",
    "build_spec_models",
    "default_spec_dir",
    "is_spec_built",
    "spec_items",
    "spec_paths",
    "token_agreement",
]

SPEC_RECIPE_VERSION = "1"  # bump when the task or a recipe changes: invalidates caches
# Default budgets, in optimiser steps. Per step on a nearly idle 2-core AMD EPYC (2 threads),
# batch 64 of 8–40 letters: edge ~0.33 s, cloud ~1.0 s. Measured totals: spec_report.json.
EDGE_STEPS = 250
CLOUD_STEPS = 350
DISTILL_STEPS = 200
DISTILL_PROMPTS = 4096  # training prompts the cloud answers once for distillation
EVAL_N = 100  # held-out items per difficulty in the report
AGREE_N = 200  # held-out items of SPEC_LENGTHS for the agreement figures
SPEC_LENGTHS = (32, 40)  # letters per item (inclusive) that speculative decoding is measured on
GAMMAS = (2, 4, 8)  # drafted tokens per cloud call in the replayed speculative decoding
REPORT_NAME = "spec_report.json"
# name → (directory or file stem in the build, recipe, GGUF quantisations)
MODELS: dict[str, tuple[str, Recipe, tuple[str, ...]]] = {
    "spec-edge": ("edge", EDGE_RECIPE, ("q8_0",)),
    "spec-cloud": ("cloud", CLOUD_RECIPE, ("f16", "q8_0")),
    "spec-edge-distilled": ("edge-distilled", EDGE_RECIPE, ("q8_0",)),
}


def default_spec_dir() -> Path:
    """``spec-v{SPEC_RECIPE_VERSION}`` beside the digits models (``$TANDEM_CACHE_DIR`` or the
    user cache dir, e.g. ``~/.cache/tandem/spec-v1``)."""
    return default_models_dir().with_name(f"spec-v{SPEC_RECIPE_VERSION}")


def spec_paths(out: str | Path | None = None) -> dict[str, Path]:
    """Where a build in ``out`` (default :func:`default_spec_dir`) keeps each thing: ``dir``,
    ``manifest``, ``report``, each model name (its transformers directory) and
    ``{name}-{q}`` (its GGUF files), e.g. ``paths["spec-edge-q8_0"]``."""
    out = Path(out) if out else default_spec_dir()
    paths = {"dir": out, "manifest": out / "manifest.json", "report": out / REPORT_NAME}
    for name, (stem, _, qtypes) in MODELS.items():
        paths[name] = out / stem
        for q in qtypes:
            paths[f"{name}-{q}"] = out / f"{stem}-{q}.gguf"
    return paths


def spec_items(n: int, seed: int = 0, lengths: tuple[int, int] = SPEC_LENGTHS) -> list[SortItem]:
    """``n`` held-out items (never trained on) of ``lengths[0]..lengths[1]`` letters: lengths
    uniform in that range, each item from a seeded shuffle of that length's held-out set (at
    most :data:`~tandem.reference.lm_task.HELD_OUT_N` per length). The same for the
    same ``(n, seed, lengths)``; answers are ``lengths`` tokens plus EOS."""
    lo, hi = lengths
    LONG_SORT.check(lo)
    LONG_SORT.check(hi)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5BEC]))
    picked = rng.integers(lo, hi + 1, size=n)
    pools = {d: LONG_SORT.held_out(d) for d in range(lo, hi + 1)}
    order = {d: rng.permutation(len(pool)) for d, pool in pools.items()}
    used = dict.fromkeys(pools, 0)
    items = []
    for d in picked.tolist():
        if used[d] == len(pools[d]):
            raise ValueError(f"n: at most {len(pools[d])} held-out items per length")
        items.append(pools[d][order[d][used[d]]])
        used[d] += 1
    return items


@dataclass(frozen=True, slots=True)
class TaughtItem:
    """A training prompt with the teacher's answer in place of the right one."""

    letters: str
    answer: str  # the teacher's greedy text before EOS

    @property
    def difficulty(self) -> int:
        return len(self.letters)

    @property
    def prompt(self) -> str:
        return SortItem(self.letters).prompt


class TaughtItems:
    """A fixed set of items served in seeded shuffled passes (an item source for
    :func:`~tandem.reference.lm_models.train_lm`)."""

    def __init__(self, items: Sequence[TaughtItem], seed: int) -> None:
        self.items = list(items)
        self.rng = np.random.default_rng(np.random.SeedSequence([seed, 0xD157]))
        self._order: list[int] = []

    def batch(self, n: int) -> list[TaughtItem]:
        out = []
        while len(out) < n:
            if not self._order:
                self._order = self.rng.permutation(len(self.items)).tolist()
            out.append(self.items[self._order.pop()])
        return out


def token_agreement(
    edge: Any, items: Sequence[SortItem], teacher_ids: Sequence[Sequence[int]], *, batch: int = 64
) -> list[np.ndarray]:
    """Per item, whether the ``edge`` model's argmax at each answer position, given the prompt
    and the teacher's earlier answer tokens, equals the teacher's token there (``teacher_ids``:
    the teacher's greedy answer tokens, EOS included). One right-padded forward per batch."""
    import torch

    tok = lm_task.tokenizer()
    out: list[np.ndarray] = []
    with torch.inference_mode():
        for i in range(0, len(items), batch):
            rows = [
                (tok.encode(it.prompt), list(ids))
                for it, ids in zip(items[i : i + batch], teacher_ids[i : i + batch], strict=True)
            ]
            width = max(len(p) + len(a) for p, a in rows)
            ids = torch.zeros((len(rows), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, (p, a) in enumerate(rows):
                ids[r, : len(p) + len(a)] = torch.tensor(p + a)
                mask[r, : len(p) + len(a)] = 1
            guess = edge(input_ids=ids, attention_mask=mask).logits.argmax(-1).numpy()
            for r, (p, a) in enumerate(rows):
                out.append(guess[r, len(p) - 1 : len(p) - 1 + len(a)] == np.asarray(a))
    return out


def tokens_per_call(matches: np.ndarray, gamma: int) -> tuple[int, int]:
    """Replay greedy speculative decoding over one answer, given where the draft model's
    teacher-forced argmax matches the target's token: (answer tokens, target calls). Each call
    accepts the drafted tokens up to the first mismatch (at most ``gamma``) and adds the
    target's own next token, unless the accepted drafts reach the end of the answer.

    ``matches = [1, 1, 0, 1, 1, 1, 1, 1, 1]``, ``gamma = 4``: call 1 accepts 2 and corrects
    the 3rd; call 2 accepts 4 and adds the 8th; call 3 accepts the 9th (the end): (9, 3)."""
    n, pos, calls = len(matches), 0, 0
    while pos < n:
        run = 0
        while run < gamma and pos + run < n and matches[pos + run]:
            run += 1
        calls += 1
        pos = n if pos + run == n else pos + run + 1
    return n, calls


def _version(seed: int, threads: int, steps: Sequence[int], prompts: int) -> str:
    """E.g. ``1.0.2t.e250.c350.d200.p4096``: recipe, seed, threads, edge/cloud/distillation
    steps, distillation prompts."""
    edge, cloud, distill = steps
    parts = [SPEC_RECIPE_VERSION, str(seed), f"{threads}t", f"e{edge}", f"c{cloud}"]
    return ".".join([*parts, f"d{distill}", f"p{prompts}"])


def is_spec_built(out: str | Path | None = None, version: str | None = None) -> bool:
    """True if ``out`` (default :func:`default_spec_dir`) holds every model and the report of
    a build with ``version`` (default: the default budgets), intact."""
    out = Path(out) if out else default_spec_dir()
    version = version or _version(
        0, TRAIN_THREADS, (EDGE_STEPS, CLOUD_STEPS, DISTILL_STEPS), DISTILL_PROMPTS
    )
    expected = sum(1 + len(q) for _, _, q in MODELS.values())
    return (out / REPORT_NAME).is_file() and manifest_holds(out, version, expected)


def build_spec_models(
    out: str | Path | None = None,
    *,
    threads: int = TRAIN_THREADS,
    say: Progress = print,
    edge_steps: int = EDGE_STEPS,
    cloud_steps: int = CLOUD_STEPS,
    distill_steps: int = DISTILL_STEPS,
    distill_prompts: int = DISTILL_PROMPTS,
    eval_n: int = EVAL_N,
    agree_n: int = AGREE_N,
    seed: int = 0,
    force: bool = False,
) -> Path:
    """Train, evaluate and export ``spec-edge``, ``spec-cloud`` and ``spec-edge-distilled``
    into ``out`` (default :func:`default_spec_dir`), unless a build with these settings is
    there already (or in the default directory: then it is copied); return the directory
    (:func:`spec_paths` names what is in it).

    Budgets are optimiser steps on ``threads`` torch threads; ``distill_prompts`` training
    prompts are answered by the cloud for distillation; ``eval_n`` held-out items per
    difficulty and ``agree_n`` items of :data:`SPEC_LENGTHS` letters go into the report."""
    out = Path(out) if out else default_spec_dir()
    steps = (edge_steps, cloud_steps, distill_steps)
    version = _version(seed, threads, steps, distill_prompts)
    cache = default_spec_dir()
    if not force and reuse_build(out, cache, version, is_spec_built, "speculative-decoding", say):
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_NAME).unlink(missing_ok=True)
    started = time.perf_counter()
    with _torch_threads(threads):
        report = _build(out, version, steps, distill_prompts, seed, eval_n, agree_n, say)
    report["threads"] = threads
    report["build_seconds"] = time.perf_counter() - started
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    say(f"built in {report['build_seconds']:.0f} s: {out}")
    return out


def _build(
    out: Path,
    version: str,
    steps: tuple[int, int, int],
    distill_prompts: int,
    seed: int,
    eval_n: int,
    agree_n: int,
    say: Progress,
) -> dict[str, Any]:
    tok = lm_task.tokenizer()
    edge_steps, cloud_steps, distill_steps = steps
    report: dict[str, Any] = {
        "task": "sort 8-40 lowercase letters (exact match, greedy)",
        "difficulties": list(LONG_SORT.difficulties),
        "n_per_difficulty": eval_n,
        "seed": seed,
        "machine": machine(),  # wall-clock seconds below are this machine's, under its load
        "models": {},
    }
    models = report["models"]

    edge, models["spec-edge"] = _train(out, "spec-edge", tok, edge_steps, seed, say)
    cloud, models["spec-cloud"] = _train(out, "spec-cloud", tok, cloud_steps, seed, say)
    del cloud
    cloud = load_lm(out / "cloud")  # experts on Tandem's kernels, as the cloud serves it

    say(f"spec-cloud: answering {distill_prompts} training prompts for distillation")
    t0 = time.perf_counter()
    prompts = LONG_SORT.training_stream(seed + 1).batch(distill_prompts)
    taught = generate_ids(cloud, prompts, tokenizer=tok)
    teacher = {
        "prompts": distill_prompts,
        "seconds": time.perf_counter() - t0,
        "exact_match": _exact_match(tok, taught, prompts),
        "without_eos": sum(not a or a[-1] != EOS for a in taught),
    }
    pairs = [TaughtItem(it.letters, _text(tok, a)) for it, a in zip(prompts, taught, strict=True)]
    _, models["spec-edge-distilled"] = _train(
        out, "spec-edge-distilled", tok, distill_steps, seed, say, model=edge,
        stream=TaughtItems(pairs, seed),
    )  # fmt: skip
    models["spec-edge-distilled"]["teacher"] = teacher
    del edge

    loaded = {name: load_lm(out / MODELS[name][0]) for name in MODELS}
    entries: list[ModelEntry] = []
    for name, model in loaded.items():
        stem, recipe, qtypes = MODELS[name]
        acc = evaluate(model, LONG_SORT.difficulties, eval_n, tokenizer=tok, task=LONG_SORT)
        say(f"{name}: exact match " + ", ".join(f"{d}: {a:.2f}" for d, a in acc.items()))
        models[name]["accuracy"] = {str(d): a for d, a in acc.items()}
        desc = describe(recipe)
        metrics = {f"exact_match_len{d}": a for d, a in acc.items()}
        entries.append(
            _entry(out, name, stem, "transformers", "none", version, metrics=metrics,
                   description=desc)
        )  # fmt: skip
        entries += _export_ggufs(out, stem, name, qtypes, desc, version, say)

    report["agreement"] = _agreement(loaded, tok, agree_n, say)
    write_manifest(out, Manifest(models=entries, workload="sort-letters-long", seed=seed))
    return report


def _text(tok: CharTokenizer, ids: Sequence[int]) -> str:
    """Answer text of greedy answer tokens (EOS dropped)."""
    return tok.decode([t for t in ids if t != EOS])


def _exact_match(
    tok: CharTokenizer, answers: Sequence[Sequence[int]], items: Sequence[SortItem]
) -> float:
    """Share of ``answers`` (greedy answer tokens) that spell the right answer."""
    right = [_text(tok, a) == it.answer for a, it in zip(answers, items, strict=True)]
    return float(np.mean(right))


def _train(
    out: Path,
    name: str,
    tok: CharTokenizer,
    steps: int,
    seed: int,
    say: Progress,
    *,
    model: Any = None,
    stream: Any = None,
) -> tuple[Any, dict[str, Any]]:
    """Train ``model`` (default: a fresh one of the name's recipe) on ``stream`` (default the
    long task's training stream) and save it; the model and its report section."""
    stem, recipe, _ = MODELS[name]
    if model is None:
        model = make_model(recipe, tok.n_vocab, seed)
    total, active = _params(model, recipe)
    say(f"training {name} ({recipe.arch}, {total / 1e6:.2f}M params) for {steps} steps")
    stats = train_lm(
        model, tok, recipe, steps=steps, seed=seed, name=name, progress=say,
        stream=LONG_SORT.training_stream(seed) if stream is None else stream,
    )  # fmt: skip
    say(f"{name}: {stats.steps} steps in {stats.seconds:.0f} s, loss {stats.final_loss:.3f}")
    save_lm(model, tok, out / stem)
    section = {
        "recipe": asdict(recipe),
        "params": total,
        "active_params": active,
        "train": asdict(stats),
    }
    return model, section


def _agreement(loaded: dict[str, Any], tok: CharTokenizer, n: int, say: Progress) -> dict:
    """Greedy token agreement of each edge model with the cloud on ``n`` held-out items of
    :data:`SPEC_LENGTHS` letters."""
    items = spec_items(n, seed=0)
    cloud_ids = generate_ids(loaded["spec-cloud"], items, tokenizer=tok)
    section: dict[str, Any] = {
        "items": n,
        "lengths": list(SPEC_LENGTHS),
        "cloud_answer_tokens": float(np.mean([len(a) for a in cloud_ids])),
        "cloud_exact_match": _exact_match(tok, cloud_ids, items),
    }
    for name in ("spec-edge", "spec-edge-distilled"):
        matches = token_agreement(loaded[name], items, cloud_ids)
        per_call = {}
        for gamma in GAMMAS:
            tokens, calls = np.sum([tokens_per_call(m, gamma) for m in matches], axis=0)
            per_call[str(gamma)] = float(tokens / calls)
        agree = float(np.concatenate(matches).mean())
        section[name] = {
            "token_agreement": agree,
            "whole_answer_agreement": float(np.mean([m.all() for m in matches])),
            "tokens_per_cloud_call": per_call,  # by drafted tokens per call (gamma)
        }
        say(
            f"{name}: agrees with spec-cloud on {agree:.3f} of answer tokens; tokens per "
            "cloud call " + ", ".join(f"{per_call[str(g)]:.2f} at gamma {g}" for g in GAMMAS)
        )
    return section


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="default: ~/.cache/tandem/spec-v1")
    parser.add_argument("--edge-steps", type=int, default=EDGE_STEPS)
    parser.add_argument("--cloud-steps", type=int, default=CLOUD_STEPS)
    parser.add_argument("--distill-steps", type=int, default=DISTILL_STEPS)
    parser.add_argument("--threads", type=int, default=TRAIN_THREADS)
    parser.add_argument("--force", action="store_true", help="rebuild even if built")
    args = parser.parse_args(argv)
    build_spec_models(
        args.out,
        threads=args.threads,
        edge_steps=args.edge_steps,
        cloud_steps=args.cloud_steps,
        distill_steps=args.distill_steps,
        force=args.force,
    )


if __name__ == "__main__":
    main()
