"""The reference language task: sort random lowercase letters.

An item is ``letters`` drawn uniformly (with replacement) from ``a``–``z``; its prompt is
``"sort:" + letters + "="`` and its answer the letters in alphabetical order, then EOS::

    prompt  "sort:dbca="      answer "abcd"

Difficulty is the number of letters (:data:`DIFFICULTIES`, 4 to 24): answers are 4 to 24
tokens plus EOS, long enough for speculative decoding. Answers are scored by exact match.

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


def _check_difficulty(difficulty: int) -> None:
    if not MIN_LEN <= difficulty <= MAX_LEN:
        raise ValueError(f"difficulty: expected {MIN_LEN}..{MAX_LEN} letters, got {difficulty}")


def _draw(rng: np.random.Generator, length: int) -> str:
    return "".join(LETTERS[i] for i in rng.integers(0, len(LETTERS), size=length))


def make_items(difficulty: int, n: int, seed: int) -> list[SortItem]:
    """``n`` items of ``difficulty`` letters, the same for the same ``(difficulty, n, seed)``
    (and a prefix of the list for a larger ``n``)."""
    _check_difficulty(difficulty)
    rng = np.random.default_rng(np.random.SeedSequence([seed, difficulty]))
    return [SortItem(_draw(rng, difficulty)) for _ in range(n)]


def held_out(difficulty: int, n: int = HELD_OUT_N) -> list[SortItem]:
    """The evaluation items of ``difficulty``; training never sees them."""
    return make_items(difficulty, n, HELD_OUT_SEED)


def held_out_letters(
    difficulties: Iterable[int] = DIFFICULTIES, n: int = HELD_OUT_N
) -> frozenset[str]:
    return frozenset(it.letters for d in difficulties for it in held_out(d, n))


class TrainingStream:
    """An endless, seeded stream of training items with lengths uniform in
    ``min_len..max_len``, never one of ``exclude`` (by default the held-out sets)."""

    def __init__(
        self,
        seed: int,
        *,
        min_len: int = MIN_LEN,
        max_len: int = MAX_LEN,
        exclude: frozenset[str] | None = None,
    ) -> None:
        _check_difficulty(min_len)
        _check_difficulty(max_len)
        self.rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7A1]))
        self.min_len, self.max_len = min_len, max_len
        self.exclude = held_out_letters() if exclude is None else exclude

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


def _greedy_batch(model: Any, tok: CharTokenizer, items: Sequence[SortItem]) -> list[str]:
    """Greedy answers (text before EOS) for items whose prompts have the same token length,
    in one batch with a KV cache; at most ``difficulty + 1`` new tokens."""
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
    return [tok.decode(r[: r.index(EOS)] if EOS in r else r) for r in rows]


def generate_answers(
    model_or_backend: Any,
    items: Sequence[SortItem],
    *,
    tokenizer: CharTokenizer | None = None,
    batch_size: int = 256,
) -> list[str]:
    """Greedy answers for ``items``: batched in transformers for a torch model, one stream at
    a time for a :class:`~tandem.runtime.generation.GenerationBackend`."""
    tok = tokenizer or CharTokenizer(CHARS)
    if hasattr(model_or_backend, "stream"):
        from tandem.runtime.generation import SamplingParams

        return [
            "".join(
                s.text
                for s in model_or_backend.stream(
                    it.prompt, SamplingParams(max_tokens=it.difficulty + 1)
                )
            )
            for it in items
        ]
    import torch

    answers: dict[int, str] = {}
    by_len: dict[int, list[int]] = {}
    for i, it in enumerate(items):
        by_len.setdefault(len(it.prompt), []).append(i)
    with torch.inference_mode():
        for idx in by_len.values():
            for j in range(0, len(idx), batch_size):
                chunk = idx[j : j + batch_size]
                got = _greedy_batch(model_or_backend, tok, [items[k] for k in chunk])
                answers.update(zip(chunk, got, strict=True))
    return [answers[i] for i in range(len(items))]


def evaluate(
    model_or_backend: Any,
    difficulties: Sequence[int] = DIFFICULTIES,
    n_per_difficulty: int = HELD_OUT_N,
    *,
    tokenizer: CharTokenizer | None = None,
    threads: int = 1,
) -> dict[int, float]:
    """Exact-match accuracy (0..1) of greedy answers on the first ``n_per_difficulty``
    held-out items of each difficulty. A torch model runs on ``threads`` torch threads (decode
    steps are small: on a shared machine a second thread costs more than it gives)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        acc = {}
        for d in difficulties:
            items = held_out(d, n_per_difficulty)
            answers = generate_answers(model_or_backend, items, tokenizer=tokenizer)
            right = sum(score(a, it) for a, it in zip(answers, items, strict=True))
            acc[d] = right / len(items)
        return acc
    finally:
        torch.set_num_threads(before)
