"""The letter-sorting language task: deterministic, held-out sets disjoint from training,
exact-match scoring, answer-only labels."""

from __future__ import annotations

import numpy as np
import pytest

from tandem.reference import lm_task
from tandem.reference.lm_task import (
    DIFFICULTIES,
    SortItem,
    TrainingStream,
    encode_batch,
    held_out,
    held_out_letters,
    make_items,
    score,
    tokenizer,
)
from tandem.runtime.tokenizer import BOS, EOS, PAD


def test_an_item_prompts_and_answers_as_documented() -> None:
    item = SortItem("dbca")
    assert (item.prompt, item.answer, item.difficulty) == ("sort:dbca=", "abcd", 4)
    assert SortItem("zaaz").answer == "aazz"  # letters repeat
    assert score("abcd", item) and not score("abcd ", item) and not score("abc", item)


def test_items_are_deterministic_per_seed_and_difficulty() -> None:
    a = make_items(8, 50, seed=3)
    assert a == make_items(8, 50, seed=3)
    assert make_items(8, 80, seed=3)[:50] == a  # a longer list extends the shorter one
    assert a != make_items(8, 50, seed=4)
    assert {it.difficulty for it in a} == {8}
    assert all(set(it.letters) <= set(lm_task.LETTERS) for it in a)
    with pytest.raises(ValueError, match="difficulty"):
        make_items(lm_task.MAX_LEN + 1, 1, seed=0)


def test_training_never_sees_a_held_out_item() -> None:
    d = 4  # 26**4 strings: the only length where a collision is likely by chance
    exclude = frozenset(it.letters for it in held_out(d, 2000))
    stream = TrainingStream(0, min_len=d, max_len=d, exclude=exclude)
    seen = {it.letters for it in stream.batch(5000)}
    assert not seen & exclude
    assert len(held_out_letters((4, 8), 10)) == 20
    lengths = {it.difficulty for it in TrainingStream(1, exclude=frozenset()).batch(2000)}
    assert lengths == set(range(lm_task.MIN_LEN, lm_task.MAX_LEN + 1))
    assert TrainingStream(5).batch(30) == TrainingStream(5).batch(30)
    stream = TrainingStream(2)
    one_length = [{it.difficulty for it in stream.batch(16, same_length=True)} for _ in range(50)]
    assert all(len(s) == 1 for s in one_length) and len(set().union(*one_length)) > 10


def test_tokenizer_covers_the_task() -> None:
    tok = tokenizer()
    assert tok.vocab[:3] == ["<pad>", "<bos>", "<eos>"] and tok.n_vocab == 31
    for d in DIFFICULTIES:
        for it in held_out(d, 5):
            ids = tok.encode(it.prompt + it.answer)
            assert tok.decode(ids) == it.prompt + it.answer


def test_labels_cover_the_answer_and_eos_only() -> None:
    tok = tokenizer()
    items = [SortItem("dcba"), SortItem("zyxwv")]
    b = encode_batch(tok, items)
    assert b.input_ids.shape == b.labels.shape == b.attention_mask.shape
    row = b.input_ids[0]
    assert row[0] == BOS and tok.decode(row) == "sort:dcba=abcd"
    n = len(tok.encode("sort:dcba="))
    np.testing.assert_array_equal(b.labels[0, :n], -100)
    assert list(b.labels[0, n : n + 5]) == [*tok.encode("abcd", bos=False), EOS]
    assert (b.labels[0, n + 5 :] == -100).all() and (b.input_ids[0, n + 5 :] == PAD).all()
    assert b.attention_mask[0].sum() == n + 5 and b.attention_mask[1].all()
