"""Speculative decoding on one host: a small GGUF model drafting for a larger one in
llama-cpp-python (:class:`~tandem.runtime.backends.llama_draft.GGUFDraftModel`), against no
drafting and against llama-cpp-python's own prompt-lookup drafting.

``python -m benchmarks.llm.spec_local [--target T.gguf --draft D.gguf | --models SET]
[--n N | --prompts FILE] [--max-tokens M] [--threads T] [--repeat R] [--gammas 2,4,8]
[--json PATH]``

Models: ``--target``/``--draft`` GGUF files (one vocabulary), or a reference set (``--models``,
built and cached on first use):

* ``llm`` (default): :func:`tandem.reference.lm_models.build_llm_models`, target
  ``sort-cloud-f16`` (Mixtral, 6.6M params), draft ``sort-edge-q8_0`` (Llama, 0.8M). Prompts:
  the sorting task's held-out items of 20 to 24 letters, ``--n`` per length; answers are 20 to
  24 tokens, then EOS.
* ``spec`` / ``spec-distilled``: :func:`tandem.reference.spec_models.build_spec_models`
  (longer answers), target ``spec-cloud-f16``, draft ``spec-edge-q8_0`` or
  ``spec-edge-distilled-q8_0`` (trained on the cloud's answers). Prompts: ``5 × --n`` held-out
  items of 32 to 40 letters.

``--prompts FILE`` (one prompt per line) replaces the sorting prompts.

Rows, all in one run, every model on ``--threads`` threads, greedy ``create_completion``:

* **target alone**: ``Llama(logits_all=False)``, the reference a user would pick;
* **target, logits_all, no draft** (info): the ``Llama`` the drafting rows use (llama-cpp-python
  turns ``logits_all`` on when given a draft model), with its draft removed: what copying every
  logits row costs by itself;
* **+ GGUF draft γ**: the same ``Llama`` with ``GGUFDraftModel(draft, num_pred_tokens=γ)``;
* **+ prompt lookup γ**: with ``LlamaPromptLookupDecoding(num_pred_tokens=γ)`` (n-grams of up to
  2 tokens, its default).

tok/s: completion tokens over the wall time of the ``create_completion`` calls (prompt
included), all prompts in a row per repeat; the median of ``--repeat``, rows run in turn,
their order rotated each repeat. A warm-up pass over every row comes first. *identical*: every
output (text and finish reason) equals the reference's; :func:`same_host` raises if one
differs. *accepted*: drafted tokens the target accepted over drafted tokens, counted in the
warm-up pass by :class:`AcceptanceCounter` (the timed passes run the bare draft model).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from llama_cpp import Llama, llama_model_n_ctx_train
from llama_cpp.llama_speculative import LlamaDraftModel, LlamaPromptLookupDecoding

from benchmarks.common import print_table, write_results
from tandem.reference import lm_task
from tandem.runtime.backends.llama_draft import GGUFDraftModel

GAMMAS = (2, 4, 8)
LENGTHS = (20, 21, 22, 23, 24)  # letters per prompt: held-out items of the sorting task
N_CTX = 512
MODEL_SETS = {
    # --models: (target, draft) names in the build's manifest
    "llm": ("sort-cloud-f16", "sort-edge-q8_0"),
    "spec": ("spec-cloud-f16", "spec-edge-q8_0"),
    "spec-distilled": ("spec-cloud-f16", "spec-edge-distilled-q8_0"),
}


def say(msg: str) -> None:
    print(f"[spec-local {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class AcceptanceCounter(LlamaDraftModel):
    """Wraps a draft model and counts its drafted tokens and those the target accepted.

    A call's draft is counted against the next call's input: the target passes the previous
    input, the drafted tokens it accepted, then one token of its own, so the accepted ones are
    the draft's common prefix with the new tokens. The last call of a completion has no next
    call: :meth:`finish` counts it against the target's own greedy picks, read from the logits
    rows the target kept (``logits_all``) for the positions it verified. Call :meth:`finish`
    after each completion."""

    def __init__(self, inner: LlamaDraftModel | None = None) -> None:
        self.inner = inner
        self.drafted = 0
        self.accepted = 0
        self._last: tuple[np.ndarray, np.ndarray] | None = None

    def __call__(self, input_ids: npt.NDArray[np.intc], /, **kwargs: Any) -> npt.NDArray[np.intc]:
        assert self.inner is not None, "AcceptanceCounter: no draft model to wrap"
        if self._last is not None:
            before, draft = self._last
            n = len(before)
            if len(input_ids) > n and np.array_equal(input_ids[:n], before):
                self._count(draft, input_ids[n:])
        out = self.inner(input_ids, **kwargs)
        self._last = (np.array(input_ids), np.array(out))
        return out

    def finish(self, target: Llama) -> None:
        """Count the completion's last draft; ``target`` must keep every logits row."""
        if self._last is None:
            return
        before, draft = self._last
        self._last = None
        n = len(before)
        draft = draft[: max(target.n_tokens - n, 0)]  # what the target evaluated of it
        if len(draft) and np.array_equal(target.input_ids[n : n + len(draft)], draft):
            self._count(draft, target.scores[n - 1 : n - 1 + len(draft)].argmax(axis=1))

    def _count(self, draft: np.ndarray, picks: np.ndarray) -> None:
        m = min(len(draft), len(picks))
        differ = np.flatnonzero(draft[:m] != picks[:m])
        self.accepted += int(differ[0]) if differ.size else m
        self.drafted += len(draft)

    def reset(self) -> None:
        self.drafted = self.accepted = 0
        self._last = None

    @property
    def rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")


def _complete(llm: Llama, prompt: str, max_tokens: int) -> tuple[str, str, int, float]:
    """(text, finish reason, completion tokens, seconds) of one greedy completion."""
    t = time.perf_counter()
    out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0)
    seconds = time.perf_counter() - t
    choice = out["choices"][0]  # type: ignore[index]
    tokens = out["usage"]["completion_tokens"]  # type: ignore[index]
    return choice["text"], str(choice["finish_reason"]), tokens, seconds


def same_host(
    target_gguf: str | Path,
    draft_gguf: str | Path,
    prompts: list[str],
    *,
    max_tokens: int,
    threads: int = 2,
    repeat: int = 3,
    gammas: Sequence[int] = GAMMAS,
    n_ctx: int = N_CTX,
    check: bool = True,
) -> list[dict[str, Any]]:
    """The rows of the module's table, one dict each: ``row`` (its label), ``draft`` (``none``,
    ``gguf`` or ``prompt-lookup``), ``gamma``, ``logits_all``, ``tokens_per_s`` (median),
    ``samples`` (tokens/s per repeat), ``ratio`` (to the first row, the target alone),
    ``identical``, ``tokens`` (completion tokens over all prompts), ``accepted``, ``drafted``
    and ``acceptance`` (drafting rows; NaN elsewhere). ``n_ctx``: tokens of context of both
    models (the draft's is capped at its trained context). ``check``: raise
    :class:`AssertionError` if a row's outputs differ from the first row's."""
    common = dict(n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_threads=threads,
                  n_threads_batch=threads, verbose=False)  # fmt: skip
    counter = AcceptanceCounter()
    with contextlib.ExitStack() as stack:
        plain = Llama(str(target_gguf), logits_all=False, **common)  # type: ignore[arg-type]
        stack.callback(plain.close)
        spec = Llama(str(target_gguf), draft_model=counter, **common)  # type: ignore[arg-type]
        stack.callback(spec.close)
        gguf_draft = stack.enter_context(GGUFDraftModel(draft_gguf, threads=threads, n_ctx=n_ctx))
        if gguf_draft.n_vocab != plain.n_vocab():
            raise ValueError(
                f"the draft's vocabulary has {gguf_draft.n_vocab} tokens, the target's "
                f"{plain.n_vocab()}: a draft model must share the target's vocabulary"
            )
        room = min(n_ctx, plain.n_ctx(), llama_model_n_ctx_train(plain.model) or n_ctx)
        for p in prompts:
            if (need := len(plain.tokenize(p.encode())) + max_tokens) > room:
                raise ValueError(f"prompt {p!r} + max_tokens needs {need} tokens; n_ctx {room}")
        rows: list[dict[str, Any]] = [
            {"row": "target alone", "draft": "none", "gamma": None, "logits_all": False},
            {"row": "target, logits_all, no draft", "draft": "none", "gamma": None,
             "logits_all": True},
            *({"row": f"+ GGUF draft γ={g}", "draft": "gguf", "gamma": g, "logits_all": True}
              for g in gammas),
            *({"row": f"+ prompt lookup γ={g}", "draft": "prompt-lookup", "gamma": g,
               "logits_all": True} for g in gammas),
        ]  # fmt: skip
        lookups = {g: LlamaPromptLookupDecoding(num_pred_tokens=g) for g in gammas}

        def arm(row: dict[str, Any]) -> tuple[Llama, LlamaDraftModel | None]:
            if not row["logits_all"]:
                return plain, None
            draft: LlamaDraftModel | None = None
            if row["draft"] == "gguf":
                gguf_draft.num_pred_tokens = row["gamma"]
                draft = gguf_draft
            elif row["draft"] == "prompt-lookup":
                draft = lookups[row["gamma"]]
            return spec, draft

        def run(row: dict[str, Any], count: bool) -> tuple[list[tuple[str, str]], int, float]:
            llm, draft = arm(row)
            if count and draft is not None:
                counter.inner = draft
                counter.reset()
                draft = counter
            if llm is spec:
                spec.draft_model = draft
            outputs, tokens, seconds = [], 0, 0.0
            for p in prompts:
                text, reason, n, s = _complete(llm, p, max_tokens)
                if draft is counter:
                    counter.finish(spec)
                outputs.append((text, reason))
                tokens, seconds = tokens + n, seconds + s
            return outputs, tokens, seconds

        say(f"warm-up pass: {len(rows)} rows × {len(prompts)} prompts")
        for row in rows:
            outputs, row["tokens"], _ = run(row, count=True)
            row["outputs"] = outputs
            drafting = row["draft"] != "none"
            row["accepted"] = counter.accepted if drafting else None
            row["drafted"] = counter.drafted if drafting else None
            row["acceptance"] = counter.rate if drafting else float("nan")
            row["samples"] = []
        reference = rows[0]["outputs"]
        for r in range(repeat):
            say(f"timed pass {r + 1}/{repeat}")
            for row in rows[r % len(rows) :] + rows[: r % len(rows)]:
                outputs, tokens, seconds = run(row, count=False)
                if outputs != row["outputs"]:
                    raise AssertionError(f"{row['row']}: outputs changed between passes")
                row["samples"].append(tokens / seconds)
        for row in rows:
            row["tokens_per_s"] = statistics.median(row["samples"])
            row["ratio"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
            row["identical"] = row.pop("outputs") == reference
    if check and (bad := [r["row"] for r in rows if not r["identical"]]):
        raise AssertionError(f"outputs differ from the target alone: {', '.join(bad)}")
    return rows


def reference_pair(models: str) -> tuple[Path, Path]:
    """(target GGUF, draft GGUF) of a reference model set (:data:`MODEL_SETS`), built and
    cached on first use."""
    from tandem.runtime.manifest import load_manifest

    if models == "llm":
        from tandem.reference.lm_models import build_llm_models

        root = build_llm_models(progress=say)["dir"]
    else:
        try:
            from tandem.reference.spec_models import build_spec_models
        except ImportError as e:
            raise SystemExit(
                f"--models {models}: the spec models are not available ({e})"
            ) from None
        root = Path(build_spec_models(say=say))
    target, draft = MODEL_SETS[models]
    m = load_manifest(root)
    return root / m.get(target).file, root / m.get(draft).file


def reference_prompts(models: str, n: int) -> list[str]:
    """``n`` held-out prompts per length of the set's task: 20 to 24 letters for ``llm``
    (answers of 20 to 24 tokens, then EOS); for the ``spec`` sets, ``5 n`` prompts of 32 to 40
    letters (:func:`~tandem.reference.spec_models.spec_items`)."""
    if models == "llm":
        return [it.prompt for d in LENGTHS for it in lm_task.held_out(d, n)]
    from tandem.reference.spec_models import spec_items

    return [it.prompt for it in spec_items(len(LENGTHS) * n)]


def _fmt(v: float, spec: str) -> str:
    return "—" if v is None or not np.isfinite(v) else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--target", type=Path, default=None, help="target GGUF (with --draft)")
    ap.add_argument("--draft", type=Path, default=None, help="draft GGUF (with --target)")
    ap.add_argument("--models", choices=sorted(MODEL_SETS), default="llm",
                    help="reference pair when --target/--draft are not given")  # fmt: skip
    ap.add_argument("--n", type=int, default=4, help="held-out prompts per length (5 lengths)")
    ap.add_argument("--prompts", type=Path, default=None,
                    help="a text file, one prompt per line, instead of the sorting items")  # fmt: skip
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="threads of each model")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--gammas", default=",".join(map(str, GAMMAS)), help="draft lengths")
    ap.add_argument("--n-ctx", type=int, default=N_CTX)
    ap.add_argument(
        "--json", default=None, help="write results here (default bench-spec-local.json)"
    )
    args = ap.parse_args(argv)
    if (args.target is None) != (args.draft is None):
        ap.error("give --target and --draft together")
    if args.target is None:
        args.target, args.draft = reference_pair(args.models)
    gammas = tuple(int(g) for g in args.gammas.split(","))
    if args.prompts is not None:
        prompts = [ln for ln in args.prompts.read_text().splitlines() if ln.strip()]
    else:
        prompts = reference_prompts(args.models, args.n)
    started, load_before = time.perf_counter(), os.getloadavg()
    rows = same_host(
        args.target, args.draft, prompts, max_tokens=args.max_tokens, threads=args.threads,
        repeat=args.repeat, gammas=gammas, n_ctx=args.n_ctx, check=False,
    )  # fmt: skip
    load_after = os.getloadavg()
    table = [
        [r["row"], _fmt(r["tokens_per_s"], ".0f"), _fmt(r["ratio"], ".2f") + "×",
         _fmt(r["acceptance"], ".0%"), "yes" if r["identical"] else "NO"]
        for r in rows
    ]  # fmt: skip
    print_table(
        f"speculative decoding on one host: target {args.target.name}, draft "
        f"{args.draft.name}; {len(prompts)} prompts, greedy, ≤ {args.max_tokens} tokens, "
        f"{args.threads} threads each, median of {args.repeat}",
        ["row", "tok/s", "× target alone", "accepted", "identical"],
        table,
        f"load average (1 min) {load_before[0]:.2f} → {load_after[0]:.2f}; "
        f"{time.perf_counter() - started:.0f} s",
    )
    settings = {
        "target": str(args.target),
        "draft": str(args.draft),
        "prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "threads": args.threads,
        "repeat": args.repeat,
        "gammas": list(gammas),
        "n_ctx": args.n_ctx,
    }
    out = Path(args.json or "bench-spec-local.json")
    write_results(out, "spec_local", settings, rows, (load_before[0], load_after[0]))
    if bad := [r["row"] for r in rows if not r["identical"]]:
        print(f"outputs differ from the target alone: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
