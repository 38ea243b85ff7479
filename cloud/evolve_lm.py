"""Co-evolution for language models: sequence-level distillation of the cloud's answers from
the escalation log into the edge's transformers checkpoint, re-exported to GGUF for llama.cpp.

Sequence-level distillation (Kim & Rush 2016): the student is trained with plain next-token
cross-entropy on (prompt, the cloud's answer) pairs, loss on the answer tokens and the end of
text only — the recipe :mod:`tandem.reference.spec_models` used to raise the sort edge's token
agreement with the cloud from 0.856 to 0.948. :func:`distil_generator` fine-tunes, saves the
transformers folder (the next round starts from it), exports GGUF in ``q8_0``, and scores the
current and the new GGUF through llama.cpp on held-out pairs: exact match with the cloud's
answer (greedy). Arrays and strings in, files and plain dicts out: nothing here reads the log
or writes the store.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tandem.cloud.evolve import worse
from tandem.runtime.errors import ConfigError

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "config.json")  # save_pretrained's


class GenerationRow(Protocol):
    """What distillation reads of an escalation-log row of a generation task."""

    request_id: str
    generation: dict[str, Any] | None
    cloud_output: Any  # the cloud's tokens' log-probabilities (an array), or None


@dataclass(frozen=True)
class Pair:
    """A prompt and the answer the routed system gave once the cloud took over."""

    request_id: str
    prompt: str
    answer: str


@dataclass(frozen=True)
class LogPairs:
    pairs: list[Pair]
    skipped: dict[str, int] = field(default_factory=dict)


def pairs_from_log(
    records: Iterable[GenerationRow], *, min_cloud_confidence: float = 0.0
) -> LogPairs:
    """The (prompt, cloud answer) pairs of a generation task's log rows. Skipped and counted:
    ``no_input`` (logged with ``store_inputs: false``), ``no_cloud_answer`` (degraded),
    ``chat`` (messages: the chat template is not distilled yet), ``not_generation``, and
    ``cloud_unsure``: answers where the cloud's least likely token had a probability below
    ``min_cloud_confidence`` (an answer the cloud itself doubted is a poor lesson; unknown
    log-probabilities, NaN, do not count against it)."""
    pairs: list[Pair] = []
    kinds = ("no_input", "no_cloud_answer", "chat", "not_generation", "cloud_unsure")
    skipped = dict.fromkeys(kinds, 0)
    for r in records:
        g = r.generation
        if not isinstance(g, dict):
            skipped["not_generation"] += 1
        elif g.get("prompt") is None and g.get("messages") is not None:
            skipped["chat"] += 1
        elif g.get("prompt") is None:
            skipped["no_input"] += 1
        elif not g.get("cloud") or g.get("answer") is None:
            skipped["no_cloud_answer"] += 1
        elif _least_likely(r.cloud_output) < min_cloud_confidence:
            skipped["cloud_unsure"] += 1
        else:
            pairs.append(Pair(r.request_id, str(g["prompt"]), str(g["answer"])))
    return LogPairs(pairs, skipped)


def read_pairs(path: str | Path) -> list[Pair]:
    """Training pairs from a JSON Lines file, one ``{"prompt": ..., "answer": ...}`` a line
    (``--train-data`` for a language model: replayed so it does not forget)."""
    import json

    out = []
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read training pairs ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            out.append(Pair(f"{path.name}:{n}", str(d["prompt"]), str(d["answer"])))
        except (ValueError, KeyError, TypeError):
            raise ConfigError(
                f'{path}:{n}: expected {{"prompt": "...", "answer": "..."}} on each line'
            ) from None
    return out


def _least_likely(logprobs: Any) -> float:
    """The lowest token probability of an answer (1.0 when none is known)."""
    lp = np.asarray([] if logprobs is None else logprobs, np.float64)
    lp = lp[np.isfinite(lp)]
    return float(np.exp(lp.min())) if len(lp) else 1.0


def split_pairs(
    pairs: Sequence[Pair], share: float, seed: int = 0
) -> tuple[list[Pair], list[Pair]]:
    """(training, held-out) pairs: a seeded ``share`` held out, at least one of each when
    there are two or more."""
    idx = np.random.default_rng(seed).permutation(len(pairs))
    n = min(max(1, round(share * len(pairs))), len(pairs) - 1) if len(pairs) > 1 else 0
    return [pairs[i] for i in idx[n:]], [pairs[i] for i in idx[:n]]


@dataclass(frozen=True)
class LmDistilConfig:
    """Fine-tuning: ``steps`` AdamW steps of ``batch`` pairs, linear warm-up for ``warmup`` of
    them, then cosine to zero; ``threads`` torch threads. With replay pairs (the original
    training data), ``replay_share`` of each batch is drawn from them, so the model does not
    forget what the log does not show."""

    steps: int = 200
    lr: float = 5e-4
    batch: int = 32
    warmup: float = 0.1
    seed: int = 0
    threads: int = 2
    replay_share: float = 0.5


def _load(hf_dir: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tandem.runtime.tokenizer import load_tokenizer

    if not (hf_dir / "config.json").is_file():
        raise ConfigError(f"{hf_dir}: not a transformers model folder (no config.json)")
    extra: dict[str, Any] = {}
    if AutoConfig.from_pretrained(hf_dir).model_type == "mixtral":
        extra["experts_implementation"] = "eager"  # trainable experts
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, **extra)
    return model, load_tokenizer(hf_dir)


def encode_pair(tok: Any, pair: Pair) -> tuple[list[int], int]:
    """Token ids of prompt + answer + end of text, and where the answer starts. The answer's
    ids are those the whole text gets after the prompt's (prompt tokens as the edge saw
    them)."""
    prompt = tok.encode(pair.prompt)
    whole = tok.encode(pair.prompt + pair.answer)
    answer = whole[len(prompt) :] if whole[: len(prompt)] == prompt else []
    if not answer and pair.answer:
        raise ConfigError(f"row {pair.request_id}: the answer does not tokenize after the prompt")
    return [*prompt, *answer, min(tok.eos_tokens)], len(prompt)


def finetune(
    hf_dir: str | Path,
    pairs: Sequence[Pair],
    out_dir: str | Path,
    *,
    config: LmDistilConfig = LmDistilConfig(),
    replay: Sequence[Pair] = (),
    progress: Progress | None = None,
) -> list[float]:
    """Fine-tune the model in ``hf_dir`` on ``pairs`` and save it (with the tokenizer files
    of ``hf_dir``) into ``out_dir``; returns the loss of every step (nats per answer token)."""
    import torch

    say = progress or log.info
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if not pairs:
        raise ConfigError("nothing to distil: no (prompt, cloud answer) pair in the log")
    before = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        model, tok = _load(hf_dir)
        encoded = [encode_pair(tok, p) for p in pairs]
        replayed = [encode_pair(tok, p) for p in replay]
        n_replay = round(config.batch * config.replay_share) if replayed else 0
        rng = np.random.default_rng(config.seed)
        torch.manual_seed(config.seed)
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.98))
        model.train()
        losses = []
        for step in range(config.steps):
            frac = step / config.steps
            scale = frac / config.warmup if frac < config.warmup else 0.5 * (
                1 + math.cos(math.pi * (frac - config.warmup) / (1 - config.warmup))
            )  # fmt: skip
            for g in opt.param_groups:
                g["lr"] = config.lr * max(scale, 0.01)
            batch = [encoded[i] for i in rng.integers(0, len(encoded), config.batch - n_replay)]
            batch += [replayed[i] for i in rng.integers(0, len(replayed), n_replay)]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            labels = torch.full_like(ids, -100)
            for row, (seq, start) in enumerate(batch):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
                labels[row, start : len(seq)] = torch.tensor(seq[start:])
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            if (step + 1) % max(1, config.steps // 10) == 0 or step + 1 == config.steps:
                recent = losses[-20:]
                say(f"step {step + 1}/{config.steps}: loss {sum(recent) / len(recent):.4f}")
        model.eval()
        shutil.rmtree(out_dir, ignore_errors=True)
        shutil.copytree(hf_dir, out_dir, ignore=shutil.ignore_patterns(*WEIGHT_FILES))
        model.save_pretrained(out_dir)
        return losses
    finally:
        torch.set_num_threads(before)


def greedy_answers(
    gguf: str | Path, pairs: Sequence[Pair], *, threads: int = 2
) -> list[tuple[str, list[float]]]:
    """The GGUF model's (llama.cpp) greedy answer to each pair's prompt, with its tokens'
    log-probabilities: what a token gate scores."""
    from tandem.runtime.backends import open_backend
    from tandem.runtime.generation import SamplingParams

    backend = open_backend("gguf", gguf, threads=threads)
    try:
        out = []
        for p in pairs:
            budget = SamplingParams(max_tokens=max(8, 2 * len(p.answer.encode()) + 2))
            steps = list(backend.stream(p.prompt, budget))
            out.append(("".join(s.text for s in steps), [s.logprob for s in steps]))
        return out
    finally:
        backend.close()


def matches(answers: Sequence[tuple[str, list[float]]], pairs: Sequence[Pair]) -> np.ndarray:
    """Whether each answer (:func:`greedy_answers`) equals its pair's exactly."""
    return np.array([a == p.answer for (a, _), p in zip(answers, pairs, strict=True)], bool)


@dataclass(frozen=True)
class LmCandidate:
    """A distilled language model in ``folder``: its transformers folder ``hf`` and the GGUF
    ``gguf`` the edge runs; ``accepted`` and the report."""

    hf: Path
    gguf: Path
    accepted: bool
    reasons: list[str]
    report: dict[str, Any]
    # the new model's greedy answers and token log-probs on the held-out pairs (recalibration)
    holdout_answers: list[tuple[str, list[float]]]


def distil_generator(
    hf_dir: str | Path,
    current_gguf: str | Path,
    train: Sequence[Pair],
    holdout: Sequence[Pair],
    *,
    folder: str | Path,
    config: LmDistilConfig = LmDistilConfig(),
    qtype: str = "q8_0",
    tolerance: float = 0.005,
    evaluate: Callable[[Path], dict[str, np.ndarray]] | None = None,
    replay: Sequence[Pair] = (),
    progress: Progress | None = None,
) -> LmCandidate:
    """Fine-tune ``hf_dir`` on ``train``, export GGUF ``qtype`` into ``folder``, and judge it
    against ``current_gguf``: exact match with the cloud on ``holdout`` (and, with
    ``evaluate``, whether each item of a held-out benchmark is right, by name: e.g. the
    sorting task's exact match); rejected when the new model is
    :func:`~tandem.cloud.evolve.worse` on any of them (more than ``tolerance``, a fraction,
    and beyond chance)."""
    from tandem.runtime.gguf import export_gguf

    say = progress or log.info
    folder = Path(folder)
    t0 = time.perf_counter()
    say(
        f"fine-tuning {hf_dir} on {len(train)} pairs for {config.steps} steps"
        + (f", replaying {len(replay)} training pairs" if replay else "")
    )
    losses = finetune(hf_dir, train, folder / "hf", config=config, replay=replay, progress=say)
    gguf = export_gguf(folder / "hf", folder / "model.gguf", qtype=qtype)  # type: ignore[arg-type]
    say(f"exported {gguf.name} ({qtype}); scoring both models on {len(holdout)} held-out pairs")
    right: dict[str, dict[str, np.ndarray]] = {}
    answers: list[tuple[str, list[float]]] = []
    for name, path in (("before", Path(current_gguf)), ("after", gguf)):
        answers = greedy_answers(path, holdout)
        right[name] = {"cloud_exact_match": matches(answers, holdout)}
        if evaluate is not None:
            right[name].update(evaluate(path))
    scores = {
        name: {k: float(v.mean()) if len(v) else math.nan for k, v in r.items()}
        for name, r in right.items()
    }
    reasons = [
        why
        for k in right["before"]
        if (why := worse(right["before"][k], right["after"][k], tolerance, k)) is not None
    ]
    report = {
        "rows": {"train_pairs": len(train), "holdout_pairs": len(holdout)},
        "distil": {
            **asdict(config),
            "qtype": qtype,
            "final_loss": float(np.mean(losses[-20:])),
            "first_loss": float(np.mean(losses[:20])),
        },
        "holdout": scores,
        "verdict": {"accepted": not reasons, "reasons": reasons},
        "seconds": time.perf_counter() - t0,
    }
    return LmCandidate(folder / "hf", gguf, not reasons, reasons, report, answers)
