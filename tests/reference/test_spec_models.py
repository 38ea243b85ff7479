"""The speculative-decoding models: the long sorting task keeps its held-out items out of
training; a tiny-budget build writes every model, loadable by both backends, with the same
token ids as the cloud model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tandem.reference import lm_task
from tandem.reference.lm_models import MAX_POSITIONS
from tandem.reference.lm_task import LONG_SORT, SORT, SortItem, TrainingStream
from tandem.reference.spec_models import (
    MODELS,
    TaughtItem,
    TaughtItems,
    build_spec_models,
    spec_items,
    spec_paths,
    tokens_per_call,
)
from tandem.runtime.manifest import load_manifest, verify_entry
from tandem.runtime.tokenizer import EOS
from tests.conftest import require

SORT_VOCAB = ["<pad>", "<bos>", "<eos>", *"abcdefghijklmnopqrstuvwxyz", ":", "="]


def test_the_long_task_spans_8_to_40_letters_with_the_sort_tokenizer() -> None:
    assert (LONG_SORT.min_len, LONG_SORT.max_len) == (8, 40)
    assert LONG_SORT.difficulties == (8, 16, 24, 32, 36, 40)
    item = LONG_SORT.held_out(40, 1)[0]
    assert item.prompt == f"sort:{item.letters}=" and item.answer == "".join(sorted(item.letters))
    tok = lm_task.tokenizer()
    assert tok.vocab == SORT_VOCAB  # the same ids as sort-edge/sort-cloud
    rows = lm_task.encode_batch(tok, [item]).input_ids
    assert rows.shape == (1, 1 + 5 + 40 + 1 + 40 + 1) and rows[0, -1] == EOS
    assert rows.shape[1] <= MAX_POSITIONS  # the models' context covers the longest item
    with pytest.raises(ValueError, match=r"8\.\.40"):
        LONG_SORT.make_items(41, 1, seed=0)
    with pytest.raises(ValueError, match=r"4\.\.24"):
        SORT.make_items(25, 1, seed=0)  # the reference task is unchanged


def test_long_training_never_sees_a_held_out_item_of_any_length() -> None:
    stream = LONG_SORT.training_stream(0)
    assert stream.exclude == LONG_SORT.held_out_letters(range(8, 41))
    assert len(stream.exclude) == 33 * lm_task.HELD_OUT_N
    lengths = {it.difficulty for it in stream.batch(3000)}
    assert lengths == set(range(8, 41))
    # the exclusion works: a stream over one length, with that length's held-out set
    exclude = frozenset(it.letters for it in LONG_SORT.held_out(8, 50))
    forced = TrainingStream(0, task=LONG_SORT, min_len=8, max_len=8, exclude=exclude)
    assert not {it.letters for it in forced.batch(2000)} & exclude
    # the long task's held-out sets are its own, and the reference task's are unchanged
    assert LONG_SORT.held_out(8, 20) != SORT.held_out(8, 20)
    assert lm_task.held_out(8, 20) == SORT.held_out(8, 20)
    assert TrainingStream(3).exclude == lm_task.held_out_letters()


def test_spec_items_are_held_out_items_of_32_to_40_letters() -> None:
    items = spec_items(300, seed=1)
    assert items == spec_items(300, seed=1) and items != spec_items(300, seed=2)
    assert {it.difficulty for it in items} == set(range(32, 41))
    assert len({it.letters for it in items}) == 300
    assert {it.letters for it in items} <= LONG_SORT.held_out_letters()
    assert {it.difficulty for it in spec_items(50, lengths=(36, 36))} == {36}
    with pytest.raises(ValueError, match="held-out items per length"):
        spec_items(lm_task.HELD_OUT_N + 1, lengths=(40, 40))
    with pytest.raises(ValueError, match="difficulty"):
        spec_items(1, lengths=(32, 41))


def test_taught_items_train_on_the_teachers_answer() -> None:
    taught = [TaughtItem("dcba", "abdc"), TaughtItem("zyxwvutsrq", "qrstuvwxyz")]
    b = lm_task.encode_batch(lm_task.tokenizer(), taught)
    assert lm_task.tokenizer().decode(b.input_ids[0]) == "sort:dcba=abdc"
    assert taught[0].difficulty == 4 and taught[0].prompt == SortItem("dcba").prompt
    source = TaughtItems(taught, seed=0)
    seen = source.batch(2) + source.batch(2)
    assert sorted(seen, key=str) == sorted(taught * 2, key=str)  # whole passes, shuffled


def test_tokens_per_call_replays_greedy_speculative_decoding() -> None:
    m = np.array([1, 1, 0, 1, 1, 1, 1, 1, 1], bool)
    assert tokens_per_call(m, 4) == (9, 3)  # the docstring's example
    assert tokens_per_call(np.ones(9, bool), 4) == (9, 2)  # 4 drafts + 1 of its own, then 4
    assert tokens_per_call(np.zeros(9, bool), 4) == (9, 9)  # one token per call
    assert tokens_per_call(np.ones(10, bool), 4) == (10, 2)


@pytest.mark.slow  # trains three models, evaluates, exports four GGUFs: ~1-2 min on 2 cores
@pytest.mark.timeout(900)
def test_a_tiny_build_writes_every_model_with_the_clouds_token_ids(tmp_path: Path) -> None:
    require("gguf")
    require("llama_cpp")
    from tandem.runtime.backends import open_backend

    lines: list[str] = []
    kw = dict(edge_steps=3, cloud_steps=3, distill_steps=3, distill_prompts=64)
    out = build_spec_models(tmp_path, **kw, eval_n=4, agree_n=8, say=lines.append)
    assert out == tmp_path
    paths = spec_paths(tmp_path)
    by_name = {e.name: e for e in load_manifest(tmp_path).models}
    assert set(by_name) == {
        "spec-edge", "spec-edge-q8_0", "spec-cloud", "spec-cloud-f16", "spec-cloud-q8_0",
        "spec-edge-distilled", "spec-edge-distilled-q8_0",
    }  # fmt: skip
    for e in by_name.values():
        assert verify_entry(tmp_path, e) == (tmp_path / e.file).resolve()
        assert (tmp_path / e.file).resolve() == paths[e.name].resolve()
    assert by_name["spec-cloud"].format == "transformers"
    assert (by_name["spec-edge-q8_0"].format, by_name["spec-edge-q8_0"].quantization) == (
        "gguf",
        "q8_0",
    )

    report = json.loads(paths["report"].read_text())
    for name in MODELS:
        assert report["models"][name]["train"]["steps"] == 3
        assert set(report["models"][name]["accuracy"]) == {str(d) for d in LONG_SORT.difficulties}
    assert report["models"]["spec-edge-distilled"]["teacher"]["prompts"] == 64
    for name in ("spec-edge", "spec-edge-distilled"):
        agree = report["agreement"][name]
        assert 0 <= agree["token_agreement"] <= 1
        assert 1 <= agree["tokens_per_cloud_call"]["4"] <= 5
    assert any(line.startswith("training spec-cloud (mixtral, 6.57M params)") for line in lines)

    prompt = spec_items(1)[0].prompt
    want = lm_task.tokenizer().encode(prompt)
    cloud = open_backend("transformers", paths["spec-cloud"])
    assert cloud.tokenize(prompt) == want and cloud.n_vocab == len(SORT_VOCAB)
    for name in ("spec-edge", "spec-edge-distilled"):
        hf = open_backend("transformers", paths[name])
        gguf = open_backend("gguf", paths[f"{name}-q8_0"])
        assert hf.tokenize(prompt) == gguf.tokenize(prompt) == want
        assert hf.tokenizer.vocab == cloud.tokenizer.vocab == SORT_VOCAB
        assert gguf.n_vocab == cloud.n_vocab
        assert gguf.n_ctx >= len(want) + 41  # prompt + 40 letters + EOS fit its context
        gguf.close()
    for q in ("f16", "q8_0"):
        g = open_backend("gguf", paths[f"spec-cloud-{q}"])
        assert g.tokenize(prompt) == want and g.n_vocab == len(SORT_VOCAB)
        g.close()

    lines.clear()
    assert build_spec_models(tmp_path, **kw, eval_n=4, agree_n=8, say=lines.append) == tmp_path
    assert lines == [f"speculative-decoding models already built in {tmp_path}"]
