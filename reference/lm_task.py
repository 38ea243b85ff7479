"""The reference language task: sort random lowercase letters.

An item is ``letters`` drawn uniformly (with replacement) from ``a``–``z``; its prompt is
``"sort:" + letters + "="`` and its answer the letters in alphabetical order, then EOS::

    prompt  "sort:dbca="      answer "abcd"

Difficulty is the number of letters (:data:`DIFFICULTIES`, 4 to 24): answers are 4 to 24
tokens plus EOS. Answers are scored by exact match.

A :class:`SortTask` is one range of lengths with its own held-out sets: :data:`SORT` (4 to 24
letters, the reference pair ``sort-edge``/``sort-cloud``) and :data:`LONG_SORT` (8 to 40
letters, answers up to 40 tokens plus EOS: the speculative-decoding pair of
:mod:`tandem.reference.spec_models`). Both use the same alphabet and tokenizer, so their
models share token ids. The module-level functions are :data:`SORT`'s.

Everything is generated locally from a seed (numpy ``Generator`` over a ``SeedSequence``), so
the task needs no downloads. The held-out sets (one per difficulty, from
:data:`HELD_OUT_SEED`) are disjoint from training: :class:`TrainingStream` skips any item that
is in them.

:func:`evaluate` scores a model on it: exact-match accuracy per difficulty of its greedy
answers (batched in transformers, or through any generation backend).
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tandem.runtime.tokenizer import EOS, PAD, CharTokenizer

LETTERS = string.ascii_lowercase
PREFIX = "sort:"
SEP = "="
CHARS = LETTERS + ":="  # the task's whole alphabet, in vocabulary order
MIN_LEN, MAX_LEN = 4, 24
DIFFICULTIES: tuple[int, ...] = (4, 8, 12, 16, 20, 24)
HELD_OUT_SEED = 1_000_003
HELD_OUT_N = 500  # items per difficulty in the reference evaluation


@dataclass(frozen=True, slots=True)
class SortItem:
    """One task item: ``letters`` to sort."""

    letters: str

    @property
    def difficulty(self) -> int:
        """Number of letters (= answer length in tokens, without EOS)."""
        return len(self.letters)

    @property
    def prompt(self) -> str:
        return f"{PREFIX}{self.letters}{SEP}"

    @property
    def answer(self) -> str:
        return "".join(sorted(self.letters))


def tokenizer() -> CharTokenizer:
    """The task's character tokenizer: ids 0–2 specials, then ``a``–``z``, ``:``, ``=``
    (31 tokens)."""
    return CharTokenizer(CHARS)


def score(answer: str, item: SortItem) -> bool:
    """Exact match: ``answer`` (the generated text, EOS not included) equals the sorted
    letters."""
    return answer == item.answer


@dataclass(frozen=True, slots=True)
class SortTask:
    """One range of item lengths (``min_len..max_len`` letters) with its held-out sets.

    An evaluation reports ``difficulties``; the held-out sets of ``held_out_lengths`` (default:
    ``difficulties``), :data:`HELD_OUT_N` items each from ``held_out_seed``, are what
    :meth:`training_stream` never yields."""

    name: str
    min_len: int
    max_len: int
    difficulties: tuple[int, ...]
    held_out_seed: int
    held_out_lengths: tuple[int, ...] | None = None

    def check(self, difficulty: int) -> None:
        """:class:`ValueError` unless ``difficulty`` is in ``min_len..max_len``."""
        if not self.min_len <= difficulty <= self.max_len:
            raise ValueError(
                f"difficulty: expected {self.min_len}..{self.max_len} letters, got {difficulty}"
            )

    def make_items(self, difficulty: int, n: int, seed: int) -> list[SortItem]:
        """``n`` items of ``difficulty`` letters, the same for the same
        ``(difficulty, n, seed)`` (and a prefix of the list for a larger ``n``)."""
        self.check(difficulty)
        rng = np.random.default_rng(np.random.SeedSequence([seed, difficulty]))
        return [SortItem(_draw(rng, difficulty)) for _ in range(n)]

    def held_out(self, difficulty: int, n: int = HELD_OUT_N) -> list[SortItem]:
        """The evaluation items of ``difficulty``; training never sees the first
        :data:`HELD_OUT_N` of a length in ``held_out_lengths``."""
        return self.make_items(difficulty, n, self.held_out_seed)

    def held_out_letters(
        self, difficulties: Iterable[int] | None = None, n: int = HELD_OUT_N
    ) -> frozenset[str]:
        """The letters of the held-out items (default: those training skips)."""
        if difficulties is None:
            difficulties = self.held_out_lengths or self.difficulties
        return frozenset(it.letters for d in difficulties for it in self.held_out(d, n))

    def training_stream(self, seed: int) -> TrainingStream:
        return TrainingStream(seed, task=self)


def _draw(rng: np.random.Generator, length: int) -> str:
    return "".join(LETTERS[i] for i in rng.integers(0, len(LETTERS), size=length))


SORT = SortTask("sort", MIN_LEN, MAX_LEN, DIFFICULTIES, HELD_OUT_SEED)
# Answers of 8 to 40 tokens plus EOS; every length's held-out set is kept out of training, so
# held-out items of any length (e.g. the 32–40 letters speculative decoding is measured on)
# are unseen.
LONG_SORT = SortTask(
    "sort-long",
    8,
    40,
    (8, 16, 24, 32, 36, 40),
    held_out_seed=2_000_003,
    held_out_lengths=tuple(range(8, 41)),
)


def make_items(difficulty: int, n: int, seed: int) -> list[SortItem]:
    """``n`` items of ``difficulty`` letters (:data:`SORT`'s lengths), the same for the same
    ``(difficulty, n, seed)`` (and a prefix of the list for a larger ``n``)."""
    return SORT.make_items(difficulty, n, seed)


def held_out(difficulty: int, n: int = HELD_OUT_N) -> list[SortItem]:
    """The evaluation items of ``difficulty``; training never sees them."""
    return SORT.held_out(difficulty, n)


def held_out_letters(
    difficulties: Iterable[int] = DIFFICULTIES, n: int = HELD_OUT_N
) -> frozenset[str]:
    return SORT.held_out_letters(difficulties, n)


class TrainingStream:
    """An endless, seeded stream of training items of ``task`` (default :data:`SORT`) with
    lengths uniform in ``min_len..max_len`` (default the task's range), never one of
    ``exclude`` (by default the task's held-out sets)."""

    def __init__(
        self,
        seed: int,
        *,
        min_len: int | None = None,
        max_len: int | None = None,
        exclude: frozenset[str] | None = None,
        task: SortTask | None = None,
    ) -> None:
        task = task or SORT
        min_len = task.min_len if min_len is None else min_len
        max_len = task.max_len if max_len is None else max_len
        task.check(min_len)
        task.check(max_len)
        self.rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7A1]))
        self.min_len, self.max_len = min_len, max_len
        self.exclude = task.held_out_letters() if exclude is None else exclude

    def batch(self, n: int, *, same_length: bool = False) -> list[SortItem]:
        """``n`` items; with ``same_length`` all of one length drawn for the batch (no padding:
        a batch costs what its tokens cost)."""
        out: list[SortItem] = []
        shared = int(self.rng.integers(self.min_len, self.max_len + 1)) if same_length else 0
        while len(out) < n:
            length = shared or int(self.rng.integers(self.min_len, self.max_len + 1))
            letters = _draw(self.rng, length)
            if letters not in self.exclude:
                out.append(SortItem(letters))
        return out


@dataclass(frozen=True, slots=True)
class EncodedBatch:
    """Right-padded token ids of prompt + answer + EOS, shaped (batch, time).

    ``labels`` is ``-100`` everywhere but the answer tokens and EOS (loss on the answer only),
    aligned with ``input_ids`` (transformers shifts them); ``attention_mask`` is 1 on real
    tokens."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray


def encode_batch(tok: CharTokenizer, items: Sequence[SortItem]) -> EncodedBatch:
    """Training tensors (int64 numpy) for ``items``: ``[BOS] prompt answer [EOS]``."""
    rows, starts = [], []
    for it in items:
        prompt = tok.encode(it.prompt)
        rows.append([*prompt, *tok.encode(it.answer, bos=False), EOS])
        starts.append(len(prompt))
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), PAD, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    labels = np.full((len(rows), width), -100, np.int64)
    for i, (row, start) in enumerate(zip(rows, starts, strict=True)):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
        labels[i, start : len(row)] = row[start:]
    return EncodedBatch(ids, mask, labels)


def _greedy_batch(model: Any, tok: CharTokenizer, items: Sequence[SortItem]) -> list[list[int]]:
    """Greedy answer tokens (up to and including EOS) for items whose prompts have the same
    token length, in one batch with a KV cache; at most ``difficulty + 1`` new tokens."""
    import torch

    ids = torch.tensor([tok.encode(it.prompt) for it in items])
    max_new = max(it.difficulty for it in items) + 1
    out = model(input_ids=ids, use_cache=True)
    picked = []
    done = torch.zeros(len(items), dtype=torch.bool)
    for i in range(max_new):
        nxt = out.logits[:, -1].argmax(-1)
        picked.append(nxt)
        done |= nxt == EOS
        if bool(done.all()) or i == max_new - 1:
            break
        out = model(input_ids=nxt[:, None], cache=out.cache, use_cache=True)
    rows = torch.stack(picked, 1).tolist()
    return [r[: r.index(EOS) + 1] if EOS in r else r for r in rows]


def generate_ids(
    model: Any,
    items: Sequence[SortItem],
    *,
    tokenizer: CharTokenizer | None = None,
    batch_size: int = 256,
) -> list[list[int]]:
    """A torch model's greedy answer tokens for ``items``, EOS included where it came (at most
    ``difficulty + 1`` tokens each), in batches of items with equal prompt lengths."""
    import torch

    tok = tokenizer or CharTokenizer(CHARS)
    answers: dict[int, list[int]] = {}
    by_len: dict[int, list[int]] = {}
    for i, it in enumerate(items):
        by_len.setdefault(len(it.prompt), []).append(i)
    with torch.inference_mode():
        for idx in by_len.values():
            for j in range(0, len(idx), batch_size):
                chunk = idx[j : j + batch_size]
                got = _greedy_batch(model, tok, [items[k] for k in chunk])
                answers.update(zip(chunk, got, strict=True))
    return [answers[i] for i in range(len(items))]


def generate_answers(
    model_or_backend: Any,
    items: Sequence[SortItem],
    *,
    tokenizer: CharTokenizer | None = None,
    batch_size: int = 256,
) -> list[str]:
    """Greedy answers for ``items``: batched in transformers for a torch model, one stream at
    a time for a :class:`~tandem.runtime.generation.GenerationBackend`."""
    from tandem.runtime.generation import GenerationBackend, SamplingParams

    tok = tokenizer or CharTokenizer(CHARS)
    if isinstance(model_or_backend, GenerationBackend):
        return [
            "".join(
                s.text
                for s in model_or_backend.stream(
                    it.prompt, SamplingParams(max_tokens=it.difficulty + 1)
                )
            )
            for it in items
        ]
    rows = generate_ids(model_or_backend, items, tokenizer=tok, batch_size=batch_size)
    return [tok.decode(r[:-1] if r and r[-1] == EOS else r) for r in rows]


def evaluate(
    model_or_backend: Any,
    difficulties: Sequence[int] | None = None,
    n_per_difficulty: int = HELD_OUT_N,
    *,
    tokenizer: CharTokenizer | None = None,
    threads: int = 1,
    task: SortTask | None = None,
) -> dict[int, float]:
    """Exact-match accuracy (0..1) of greedy answers on the first ``n_per_difficulty``
    held-out items of each difficulty of ``task`` (default :data:`SORT`; ``difficulties``
    default: the task's). A torch model runs on ``threads`` torch threads (decode steps are
    small: on a shared machine a second thread costs more than it gives)."""
    import torch

    task = task or SORT
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        acc = {}
        for d in task.difficulties if difficulties is None else difficulties:
            items = task.held_out(d, n_per_difficulty)
            answers = generate_answers(model_or_backend, items, tokenizer=tokenizer)
            right = sum(score(a, it) for a, it in zip(answers, items, strict=True))
            acc[d] = right / len(items)
        return acc
    finally:
        torch.set_num_threads(before)


def sorting_accuracy(fmt: str, path: Path, n: int) -> float:
    """Exact match of greedy answers on ``n`` held-out items of the reference sorting task,
    spread over its difficulties, through the backend registry."""
    from tandem.runtime.backends import open_backend

    per = max(1, n // len(DIFFICULTIES))
    backend = open_backend(fmt, path, threads=2)
    try:
        acc = evaluate(backend, DIFFICULTIES, per)
    finally:
        backend.close()
    return sum(acc.values()) / len(acc)
