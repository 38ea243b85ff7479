"""Hot-swapping a generation task's language model: answers running on the old model finish on
it, new ones start on the new one, the old model is closed when its last answer ends, and a
model store's versions are served and rolled back. Real tiny transformers models and a real
GGUF through llama.cpp."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tandem.edge import EdgeRuntime
from tandem.router.policy import policy_from_dict
from tandem.runtime.backends.transformers_lm import TransformersBackend
from tandem.runtime.generation import SamplingParams
from tandem.runtime.model_store import ModelStore
from tests.lm import tiny_lm

PROMPT = "sort:dcba="
N = 12


@pytest.fixture(scope="module")
def lms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("swap-lm")
    return {name: tiny_lm(out / name, seed=seed) for name, seed in (("a", 3), ("b", 6))}


def greedy(path: Path) -> str:
    b = TransformersBackend(path)
    try:
        return "".join(s.text for s in b.stream(PROMPT, SamplingParams(max_tokens=N)))
    finally:
        b.close()


def runtime(local: dict[str, Any]) -> EdgeRuntime:
    spec = {
        "kind": "generate",
        "local": local,
        "gate": {"metric": "token_min", "threshold": 0.0},
        "max_tokens": N,
    }
    return EdgeRuntime(policy_from_dict({"tasks": {"sort": spec}}))


def test_a_stream_finishes_on_the_old_model_and_new_answers_use_the_new(lms) -> None:
    want_a, want_b = greedy(lms["a"]), greedy(lms["b"])
    assert want_a != want_b  # the two models are told apart by their answers
    with runtime({"path": str(lms["a"]), "format": "transformers"}) as rt:
        stream = rt.generate(PROMPT, stream=True)
        first = next(stream)  # the answer is running on model a
        version = rt.swap_model("sort", lms["b"], version="b")
        assert version == "b"
        old = rt._retired[-1]
        assert not old.closed  # an answer still runs on it
        text = first.text + "".join(c.text for c in stream)
        assert text == want_a and stream.result is not None
        assert stream.result.model_versions["edge"] != "b"
        assert old.closed  # closed when its last answer ended
        r = rt.generate(PROMPT)
        assert r.text == want_b and r.model_versions["edge"] == "b"
        assert rt.stats()["tasks"]["sort"]["swaps"]["done"] == 1


def test_a_model_that_does_not_load_is_refused_and_the_old_keeps_serving(lms, tmp_path) -> None:
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    with runtime({"path": str(lms["a"]), "format": "transformers"}) as rt:
        with pytest.raises(Exception):  # noqa: B017 - whatever the loader raises
            rt.swap_model("sort", bad)
        assert rt.generate(PROMPT).text == greedy(lms["a"])
        assert rt.stats()["tasks"]["sort"]["swaps"]["refused"] == 1


def test_store_versions_are_served_reloaded_and_rolled_back(lms, tmp_path) -> None:
    pytest.importorskip("llama_cpp")
    from tandem.runtime.gguf import export_gguf

    ga = export_gguf(lms["a"], tmp_path / "a.gguf", qtype="f32")
    gb = export_gguf(lms["b"], tmp_path / "b.gguf", qtype="f32")
    store = ModelStore(tmp_path / "store")
    store.publish(ga, gate={"threshold": 0.0})
    local = {"path": str(ga), "format": "gguf", "store": str(store.root), "parallel": 2}
    with runtime(local) as rt:
        first = rt.generate(PROMPT)
        assert first.model_versions["edge"].startswith("v0001:")
        store.publish(gb)
        assert rt.reload_models() == {"sort": "v0002"}
        second = rt.generate(PROMPT)
        assert second.model_versions["edge"].startswith("v0002:")
        store.rollback()
        assert rt.reload_models() == {"sort": "v0001"}
        again = rt.generate(PROMPT)
        assert again.text == first.text
        assert again.model_versions["edge"] == first.model_versions["edge"]


def test_a_dropped_stream_still_releases_the_old_model(lms) -> None:
    import gc

    with runtime({"path": str(lms["a"]), "format": "transformers"}) as rt:
        stream = rt.generate(PROMPT, stream=True)
        next(stream)  # running on model a, then abandoned: never exhausted, never closed
        rt.swap_model("sort", lms["b"], version="b")
        old = rt._retired[-1]
        assert not old.closed
        del stream
        gc.collect()
        assert old.closed
        assert rt.generate(PROMPT).model_versions["edge"] == "b"
