"""Language-model backends on a tiny random Llama: llama.cpp (GGUF) against transformers on the
same weights, and the OpenAI-compatible client against a real llama-cpp-python server."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tandem.bench.ports import free_ports
from tandem.runtime.errors import (
    BackendError,
    BadRequest,
    ConfigError,
    OverloadedError,
    Unavailable,
)
from tandem.runtime.generation import BackendStream, FinishReason, SamplingParams, TokenStep
from tandem.runtime.manifest import sha256_file
from tandem.runtime.tokenizer import CharTokenizer
from tests.conftest import require
from tests.lm import tiny_lm

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,+="
PROMPTS = ["hello world", "1+2=", "ab", " "]
GREEDY = SamplingParams(max_tokens=24)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama (hidden 64) with a Tandem char tokenizer. Weights drawn with std
    0.2 rather than 0.02, so logits are spread out and greedy picks are not near-ties."""
    require("transformers")
    return tiny_lm(
        tmp_path_factory.mktemp("tiny-llama"),
        chars=CHARS,
        hidden=64,
        layers=2,
        heads=4,
        initializer_range=0.2,
    )


@pytest.fixture(scope="module")
def gguf_f32(hf_dir: Path) -> Path:
    require("llama_cpp")
    require("gguf")
    from tandem.runtime.gguf import export_gguf

    return export_gguf(hf_dir, hf_dir / "model-f32.gguf", qtype="f32")


@pytest.fixture(scope="module")
def llama(gguf_f32: Path):
    from tandem.runtime.backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(gguf_f32, threads=2)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def reference(llama) -> dict[str, list[TokenStep]]:
    """Greedy steps of each prompt on the llama.cpp backend."""
    return {p: list(llama.stream(p, GREEDY)) for p in PROMPTS}


def text(steps) -> str:
    return "".join(s.text for s in steps)


# --- LlamaCppBackend -----------------------------------------------------------------------


def test_tokens_and_version(llama, hf_dir, gguf_f32):
    tok = CharTokenizer.load(hf_dir)
    for p in PROMPTS:
        assert llama.tokenize(p) == tok.encode(p)
    assert llama.version == sha256_file(gguf_f32)[:12]
    assert llama.name == "model-f32"
    with pytest.raises(BadRequest, match="'é~'"):
        llama.tokenize("hé~llo")  # llama.cpp alone would drop both silently


def test_greedy_matches_transformers(hf_dir, reference):
    from tandem.runtime.backends.transformers_lm import TransformersBackend

    hf = TransformersBackend(hf_dir, threads=2)
    for prompt, want in reference.items():
        stream = hf.stream(prompt, GREEDY)
        got = list(stream)
        assert [s.token for s in got] == [s.token for s in want], prompt
        assert text(got) == text(want)
        for a, b in zip(got, want, strict=True):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-2)
            assert a.entropy == pytest.approx(b.entropy, abs=1e-2)
    assert any(len(steps) > 5 for steps in reference.values())


def test_prefix_reuse_and_rollback_give_fresh_results(llama, gguf_f32, reference):
    from tandem.runtime.backends.llamacpp import LlamaCppBackend

    prompt = "hello world"
    answer = text(reference[prompt])
    fresh = LlamaCppBackend(gguf_f32, threads=2)
    cases = [prompt + answer[:5], prompt[:4], prompt, prompt + answer[:5] + "x", "zzz"]
    for p in cases:  # each run on the context the one before it left behind
        got = list(llama.stream(p, GREEDY))
        want = list(fresh.stream(p, GREEDY))
        fresh.raw.n_tokens = 0  # the reference always starts from an empty cache
        assert [s.token for s in got] == [s.token for s in want], p
        assert [s.logprob for s in got] == pytest.approx([s.logprob for s in want], abs=1e-4)
    assert text(llama.stream(prompt + answer[:5], GREEDY)).startswith(answer[5:10])
    fresh.close()


def test_stop_string_across_tokens(llama, reference):
    answer = text(reference["hello world"])
    stop = answer[3:6]
    stream = llama.stream("hello world", SamplingParams(max_tokens=24, stop=(stop,)))
    got = text(stream)
    assert got == answer[: answer.find(stop)]
    assert stream.finish_reason == FinishReason.STOP


def test_max_tokens_is_length(llama, reference):
    stream = llama.stream("hello world", SamplingParams(max_tokens=3))
    assert text(stream) == text(reference["hello world"][:3])
    assert stream.finish_reason == FinishReason.LENGTH
    assert stream.prompt_tokens == len("hello world") + 1


def test_cancel_close_and_drop_free_the_context(gguf_f32):
    from tandem.runtime.backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(gguf_f32, parallel=1)
    cancel = threading.Event()
    stream = backend.stream("hello world", GREEDY, cancel=cancel)
    next(stream)
    with pytest.raises(OverloadedError, match="parallel=1"):
        backend.stream("ab", GREEDY)
    cancel.set()
    assert list(stream) == [] and stream.finish_reason == FinishReason.CANCELLED
    stream = backend.stream("ab", GREEDY)  # at once: the context is back
    next(stream)
    stream.close()
    assert stream.finish_reason == FinishReason.CANCELLED
    backend.stream("ab", GREEDY)  # never iterated, dropped
    gc.collect()
    assert len(list(backend.stream("ab", SamplingParams(max_tokens=2)))) <= 2
    backend.close()


def test_an_exception_in_the_loop_frees_the_context(gguf_f32):
    from tandem.runtime.backends.llamacpp import LlamaCppBackend

    class Boom(threading.Event):
        def is_set(self) -> bool:
            raise RuntimeError("boom")

    backend = LlamaCppBackend(gguf_f32)
    with pytest.raises(RuntimeError, match="boom"):
        list(backend.stream("ab", GREEDY, cancel=Boom()))
    list(backend.stream("ab", GREEDY))
    backend.close()


def test_parallel_streams(gguf_f32, reference):
    from tandem.runtime.backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(gguf_f32, parallel=2)
    a, b = (backend.stream(p, GREEDY) for p in ("hello world", "1+2="))
    with pytest.raises(OverloadedError):
        backend.stream("ab", GREEDY)
    got: dict[str, str] = {}
    threads = [
        threading.Thread(target=lambda k, s: got.__setitem__(k, text(s)), args=(k, s))
        for k, s in (("hello world", a), ("1+2=", b))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert got == {p: text(reference[p]) for p in ("hello world", "1+2=")}
    assert text(backend.stream("ab", GREEDY)) == text(reference["ab"])
    backend.close()


def test_prompt_longer_than_context(gguf_f32):
    from tandem.runtime.backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(gguf_f32, n_ctx=32)
    with pytest.raises(BadRequest, match=r"prompt \(21 tokens\) \+ max_tokens \(24\).*32"):
        backend.stream("a" * 20, GREEDY)
    assert len(list(backend.stream("a" * 20, SamplingParams(max_tokens=11)))) <= 11
    backend.close()


def test_warm_up_and_close(gguf_f32, reference):
    from tandem.runtime.backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(gguf_f32, parallel=2, threads=0)
    assert backend.n_vocab == len(CHARS) + 3
    backend.warm_up()
    assert text(backend.stream("1+2=", GREEDY)) == text(reference["1+2="])
    held = backend.stream("ab", GREEDY)
    backend.close()
    with pytest.raises(BackendError, match="closed"):
        backend.stream("ab", GREEDY)
    assert text(held) == text(reference["ab"])  # a running stream finishes
    with pytest.raises(ConfigError, match="parallel"):
        LlamaCppBackend(gguf_f32, parallel=0)


def test_bad_files(tmp_path, gguf_f32):
    from tandem.runtime.backends.llamacpp import LlamaCppBackend

    with pytest.raises(BackendError, match=r"missing\.gguf: file missing"):
        LlamaCppBackend(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(BackendError, match=r"junk\.gguf: not a GGUF file"):
        LlamaCppBackend(junk)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf_f32.read_bytes()[:4096])
    with pytest.raises(BackendError, match=r"cut\.gguf: .*\w") as e:
        LlamaCppBackend(cut)
    assert "Failed to load model" not in str(e.value)  # llama.cpp's reason, not the wrapper's


# --- OpenAIBackend against a real server ---------------------------------------------------


@pytest.fixture(scope="module")
def server(gguf_f32: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``python -m llama_cpp.server`` on a free loopback port (the benchmark's launcher, with
    the server's own defaults for log-probs and interruption); its base URL."""
    require("openai")
    from benchmarks.llm.llama_server import llama_server

    log = tmp_path_factory.mktemp("server") / "server.log"
    with llama_server(gguf_f32, 1, log, n_ctx=128, logits_all=True, interrupt=True) as url:
        yield url.removesuffix("/v1")


@pytest.fixture(scope="module")
def remote(server: str):
    from tandem.runtime.backends.openai_http import OpenAIBackend

    backend = OpenAIBackend(server, timeout_s=20, extra_body={"repeat_penalty": 1.0})
    yield backend
    backend.close()


@pytest.mark.integration
def test_remote_greedy_and_logprobs_match_local(remote, gguf_f32, reference):
    assert remote.version == remote.model == str(gguf_f32)  # the server's id for its model
    # Not "ab": its answer holds a BOS token, after which llama-cpp-python 0.3.36's server
    # sends the next token twice when log-probs are on (its stream skips BOS without counting
    # it as returned).
    for prompt in ("hello world", "1+2="):
        stream = remote.stream(prompt, GREEDY)
        got = list(stream)
        want = reference[prompt]
        assert text(got) == text(want)
        assert stream.finish_reason == (
            FinishReason.LENGTH if len(want) == GREEDY.max_tokens else FinishReason.STOP
        )
        assert all(s.token == -1 and s.entropy is None for s in got)
        assert [s.logprob for s in got] == pytest.approx([s.logprob for s in want], abs=1e-3)


@pytest.mark.integration
def test_remote_stop_string(remote, reference):
    answer = text(reference["hello world"])
    stop = answer[3:6]
    stream = remote.stream("hello world", SamplingParams(max_tokens=24, stop=(stop,)))
    assert text(stream) == answer[: answer.find(stop)]
    assert stream.finish_reason == FinishReason.STOP


@pytest.mark.integration
def test_remote_cancel_then_serve_again(remote, reference):
    cancel = threading.Event()
    stream = remote.stream("hello world", SamplingParams(max_tokens=64), cancel=cancel)
    first = next(stream)
    cancel.set()
    assert list(stream) == [] and stream.finish_reason == FinishReason.CANCELLED
    assert first.text == reference["hello world"][0].text
    closed: BackendStream = remote.stream("1+2=", GREEDY)
    closed.close()
    assert text(remote.stream("1+2=", GREEDY)) == text(reference["1+2="])


@pytest.mark.integration
def test_remote_errors(remote, server):
    from tandem.runtime.backends.openai_http import OpenAIBackend

    wrong_path = OpenAIBackend(server + "/nowhere", model="m", version="1")
    with pytest.raises(BadRequest, match=f"{server}/nowhere: HTTP 404"):
        wrong_path.stream("ab", GREEDY)
    # llama-cpp-python's server answers 500 to a request its own validation refuses
    refused = OpenAIBackend(server, model="m", version="1", extra_body={"top_k": -1})
    with pytest.raises(BackendError, match=f"(?s){server}/v1: HTTP 500: .*top_k"):
        refused.stream("ab", GREEDY)
    # Longer than the server's context: llama-cpp-python's server ends the stream at once
    # without a finish reason.
    with pytest.raises(BackendError, match=f"{server}/v1: the stream ended"):
        list(remote.stream("a" * 200, GREEDY))


@pytest.mark.integration
def test_server_down_is_unavailable():
    from tandem.runtime.backends.openai_http import OpenAIBackend

    url = f"http://127.0.0.1:{free_ports()[0]}"
    with pytest.raises(Unavailable, match=f"{url}/v1: cannot connect"):
        OpenAIBackend(url, timeout_s=2)
    backend = OpenAIBackend(url, model="m", version="1", timeout_s=2)
    with pytest.raises(Unavailable, match=url):
        backend.stream("ab", GREEDY)
