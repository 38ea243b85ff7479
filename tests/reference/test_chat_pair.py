"""The reference pair with a real tokenizer (byte-level BPE, Qwen2's pre-tokenizer, ChatML):
a random Qwen2 directory served by ``TransformersBackend`` and its GGUF exports on llama.cpp.

llama.cpp and transformers must agree on the vocabulary (tokens, pieces, digest), on the chat
rendering and, in f32, on greedy tokens; the fast decode path must give ``generate``'s answers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tandem.runtime.generation import SamplingParams
from tandem.runtime.speculative import backend_vocab_digest
from tests.conftest import require

PROMPTS = [
    "The robot",
    "sort:dcba=",
    "Grüße aus Köln 🤖",
    "東京は",
    "Hello, world! café",  # composed: llama.cpp skips the tokenizer's NFC normalizer
    "Data Set Characteristics:",
    "a b c d e f g",
    "1234 + 5678 =",
]
MESSAGES = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    require("transformers")
    require("llama_cpp")
    require("gguf")
    from tandem.reference.chat_pair import build_chat_pair

    return build_chat_pair(tmp_path_factory.mktemp("chat"))


@pytest.fixture(scope="module")
def cloud(pair: dict[str, Path]) -> Any:
    from tandem.runtime.backends import open_backend

    return open_backend("transformers", pair["chat-cloud"], threads=1)


@pytest.fixture(scope="module")
def edge(pair: dict[str, Path]) -> Any:
    from tandem.runtime.backends import open_backend

    return open_backend("gguf", pair["chat-edge"], threads=1)


@pytest.fixture(scope="module")
def cloud_f32_gguf(pair: dict[str, Path]) -> Any:
    from tandem.runtime.backends import open_backend

    return open_backend("gguf", pair["chat-cloud-f32"], threads=1)


def _greedy(backend: Any, prompt: str, n: int = 24) -> list[int]:
    return [s.token for s in backend.stream(prompt, SamplingParams(max_tokens=n))]


def _generated(model: Any, backend: Any, prompt: str, n: int) -> list[int]:
    """transformers' own greedy ``generate`` on ``model``, tokenized and ended as ``backend``
    does (its tokenizer, its end tokens, which are not part of the answer)."""
    import torch

    ids = backend.tokenizer.hf(prompt, return_tensors="pt")["input_ids"]
    eos = sorted(backend.eos_tokens)
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=eos)
    return [t for t in out[0, ids.shape[1] :].tolist() if t not in backend.eos_tokens]


def test_the_cloud_is_served_on_the_fast_path(cloud: Any) -> None:
    assert cloud.decode == "fast"
    assert type(cloud.model).__name__ == "Qwen2ForCausalLM"
    assert cloud.n_vocab > cloud.tokenizer.n_vocab  # a padded embedding, as Qwen2's
    assert cloud.eos_tokens == {
        cloud.tokenizer.hf.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")
    }


def test_llama_cpp_and_transformers_share_the_vocabulary(cloud: Any, edge: Any) -> None:
    for text in PROMPTS:
        assert edge.tokenize(text) == cloud.tokenize(text), text
    assert [edge.piece(t) for t in range(cloud.tokenizer.n_vocab)] == [
        cloud.piece(t) for t in range(cloud.tokenizer.n_vocab)
    ]
    assert edge.control_tokens == cloud.control_tokens  # same ids, same texts
    assert len(edge.control_tokens) == 3
    assert backend_vocab_digest(edge) == backend_vocab_digest(cloud)


def test_llama_cpp_f32_gives_transformers_greedy_tokens(cloud: Any, cloud_f32_gguf: Any) -> None:
    for prompt in PROMPTS:
        assert _greedy(cloud_f32_gguf, prompt) == _greedy(cloud, prompt), prompt


def test_greedy_answers_equal_generate(pair: dict[str, Path], cloud: Any) -> None:
    """``TransformersBackend`` (fast path) against transformers' own ``generate`` on the same
    directory (the issue's goal: >= 99% of 200 prompts; here all of a few)."""

    from tandem.runtime.backends import open_backend

    slow = open_backend("transformers", pair["chat-cloud"], decode="transformers")
    for prompt in PROMPTS:
        want = _generated(cloud.model, cloud, prompt, 24)
        assert _greedy(cloud, prompt) == want, prompt
        assert _greedy(slow, prompt) == want, prompt


def test_chat_renders_with_the_models_own_template(cloud: Any, edge: Any) -> None:
    hf = cloud.tokenizer.hf
    want = hf.apply_chat_template(
        MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    for backend in (cloud, edge):
        stream = backend.stream_chat(MESSAGES, SamplingParams(max_tokens=4))
        text = "".join(s.text for s in stream)
        assert stream.prompt_tokens == len(want) > 10, backend
        assert "<|im" not in text
    # the GGUF carries the template: llama-cpp-python's own chat completion renders it alike
    raw = edge.raw.create_chat_completion(MESSAGES, max_tokens=1, temperature=0)
    assert raw["usage"]["prompt_tokens"] == len(want)


def test_a_continuation_goes_after_the_generation_prompt(cloud: Any) -> None:
    plain = cloud.stream_chat(MESSAGES, SamplingParams(max_tokens=1))
    list(plain)
    go_on = cloud.stream_chat(MESSAGES, SamplingParams(max_tokens=1), prefix="Sure, the robot")
    list(go_on)
    rendered = cloud.chat.render(MESSAGES, prefix="Sure, the robot")
    assert rendered.endswith("<|im_start|>assistant\nSure, the robot")
    assert go_on.prompt_tokens == len(cloud.tokenize(rendered, special=True))
    assert go_on.prompt_tokens > plain.prompt_tokens


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe"])
def test_qwen_moe_runs_its_experts_on_tandems_kernels(pair, tmp_path, arch) -> None:
    """No fast path for these: transformers' forward, its experts on Tandem's kernels, and
    the answers of transformers' own ``generate`` with its eager experts."""
    import shutil

    import torch
    import transformers

    from tandem.runtime.backends import open_backend

    src = pair["chat-cloud"]
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config")):
            shutil.copy(f, tmp_path / f.name)
    config_cls, model_cls = {
        "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM),
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
    }[arch]
    n_vocab = transformers.AutoConfig.from_pretrained(src).vocab_size
    config = config_cls(
        vocab_size=n_vocab, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, initializer_range=0.2,
        max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model_cls(config).save_pretrained(tmp_path)
    backend = open_backend("transformers", tmp_path)
    assert backend.decode == "transformers"
    assert backend.model.config._experts_implementation == "tandem"
    eager = model_cls.from_pretrained(tmp_path, experts_implementation="eager").eval()
    for prompt in PROMPTS[:4]:
        assert _greedy(backend, prompt, 12) == _generated(eager, backend, prompt, 12), prompt


@pytest.mark.integration
def test_an_openai_server_renders_chats_with_its_own_template(pair, edge, tmp_path) -> None:
    """``OpenAIBackend.stream_chat`` against llama-cpp-python's server on the same GGUF: the
    server renders the messages with the template the GGUF carries, and answers as our own
    llama.cpp backend does (greedy); a hand-off's text so far goes as an assistant message."""
    require("openai")
    from benchmarks.llm.llama_server import llama_server
    from tandem.runtime.backends.openai_http import OpenAIBackend
    from tandem.runtime.chat import chat_tokens

    params = SamplingParams(max_tokens=8)
    want = "".join(s.text for s in edge.stream_chat(MESSAGES, params))
    with llama_server(pair["chat-edge"], 1, tmp_path / "server.log", logits_all=True) as url:
        remote = OpenAIBackend(url, timeout_s=30, extra_body={"repeat_penalty": 1.0})
        try:
            stream = remote.stream_chat(MESSAGES, params)
            steps = list(stream)
            assert "".join(s.text for s in steps) == want.replace("\ufffd", "")
            # llama-cpp-python's server streams no log-probs with chat chunks (vLLM does)
            assert steps and not any(s.logprob > 0 for s in steps)
            assert stream.finish_reason == "length"
            # this server reports no usage when streaming: the prompt's size stays unknown (0)
            assert stream.prompt_tokens in (0, len(chat_tokens(edge, MESSAGES)))
            go_on = remote.stream_chat(MESSAGES, params, prefix="Sure")
            assert list(go_on) and go_on.finish_reason == "length"
        finally:
            remote.close()


def test_a_bf16_checkpoint_runs_in_float32(pair, tmp_path) -> None:
    """Weights stored as bf16 load as float32 (the fast path runs float32 on the CPU), and
    answer as transformers' ``generate`` does on the same checkpoint loaded as float32."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from tandem.runtime.backends import open_backend

    model = AutoModelForCausalLM.from_pretrained(pair["chat-cloud"], dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    for f in pair["chat-cloud"].iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config")):
            shutil.copy(f, tmp_path / f.name)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    backend = open_backend("transformers", tmp_path)
    assert backend.decode == "fast" and next(backend.model.parameters()).dtype == torch.float32
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    for prompt in PROMPTS[:4]:
        assert _greedy(backend, prompt, 12) == _generated(ref, backend, prompt, 12), prompt
