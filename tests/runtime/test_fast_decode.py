"""The fast decode path against transformers' own forward: same logits at every step, same
greedy tokens, on random tiny Llama, Mistral, Qwen2 and Mixtral models (GQA, biases, sliding
window)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import tandem.runtime.moe  # noqa: E402,F401 - registers the "tandem" experts implementation
from tandem.runtime.backends.fast_decode import (  # noqa: E402
    FastDecoder,
    FastSession,
    unsupported_reason,
)
from tandem.runtime.errors import BadRequest, ConfigError  # noqa: E402

ATOL = 1e-4
PROMPT = [1, 5, 9, 4, 17, 3, 3, 8, 30, 12, 6]
STEPS = 30
COMMON = dict(
    vocab_size=40,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=96,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)


def _init(model):
    """Weights large enough that rounding differences would show in the logits."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.3 if p.dim() == 1 else p.shape[-1] ** -0.5)
    return model.eval()


def llama(**over):
    cfg = transformers.LlamaConfig(**{**COMMON, "num_key_value_heads": 2, **over})
    return _init(transformers.LlamaForCausalLM(cfg))


def mixtral(**over):
    cfg = transformers.MixtralConfig(
        **{**COMMON, "num_key_value_heads": 2, **over}, num_local_experts=4, num_experts_per_tok=2
    )
    model = _init(transformers.MixtralForCausalLM(cfg))
    model.set_experts_implementation("eager")
    return model


def mistral(**over):
    cfg = transformers.MistralConfig(**{**COMMON, "num_key_value_heads": 2, **over})
    return _init(transformers.MistralForCausalLM(cfg))


def qwen2(**over):
    cfg = transformers.Qwen2Config(**{**COMMON, "num_key_value_heads": 2, **over})
    return _init(transformers.Qwen2ForCausalLM(cfg))


MODELS = {
    "llama-gqa": lambda: llama(),
    "mistral-window": lambda: mistral(sliding_window=5),
    "qwen2-gqa-bias": lambda: qwen2(),  # q/k/v biases; sliding_window set but not used
    "qwen2-window": lambda: qwen2(use_sliding_window=True, sliding_window=6, max_window_layers=0),
    "llama-mha-bias-theta": lambda: llama(
        num_key_value_heads=4,
        attention_bias=True,
        mlp_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    ),
    "llama-head-dim": lambda: llama(head_dim=32, tie_word_embeddings=True),
    "mixtral-gqa": lambda: mixtral(),
    "mixtral-mha": lambda: mixtral(num_key_value_heads=4, num_hidden_layers=4),
    "mixtral-window": lambda: mixtral(sliding_window=7),
}


def reference_greedy(model, prompt, steps):
    """(logits rows, greedy tokens) from transformers' forward with a DynamicCache."""
    rows, tokens = [], []
    with torch.inference_mode():
        cache = transformers.DynamicCache(config=model.config)
        out = model(input_ids=torch.tensor([prompt]), cache=cache, use_cache=True)
        for _ in range(steps):
            row = out.logits[0, -1].float().numpy().copy()
            rows.append(row)
            tokens.append(int(np.argmax(row)))
            out = model(input_ids=torch.tensor([[tokens[-1]]]), cache=out.cache, use_cache=True)
    return rows, tokens


def fast_greedy(session, prompt, steps):
    rows, tokens = [], []
    row = session.prefill(prompt)
    for i in range(steps):
        rows.append(row.copy())
        tokens.append(int(np.argmax(row)))
        if i + 1 < steps:
            row = session.append(tokens[-1])
    return rows, tokens


@pytest.mark.parametrize("name", sorted(MODELS))
def test_logits_and_greedy_tokens_match_transformers(name):
    model = MODELS[name]()
    assert unsupported_reason(model) is None
    want_rows, want_tokens = reference_greedy(model, PROMPT, STEPS)
    got_rows, got_tokens = fast_greedy(FastDecoder(model).session(), PROMPT, STEPS)
    assert got_tokens == want_tokens
    for step, (got, want) in enumerate(zip(got_rows, want_rows, strict=True)):
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0, err_msg=f"step {step}")
    assert np.ptp(np.concatenate(want_rows)) > 1.0  # logits spread: a real comparison


@pytest.mark.parametrize("name", ["llama-gqa", "mixtral-gqa", "mixtral-window"])
def test_long_prompt_prefill_matches_transformers(name):
    """A prompt longer than SKINNY_MAX_ROWS (torch's GEMM, several rows per expert, the
    sliding window inside the prompt), then decode."""
    from tandem.kernels.linear import SKINNY_MAX_ROWS

    model = MODELS[name]()
    prompt = [(7 * i + 3) % COMMON["vocab_size"] for i in range(2 * SKINNY_MAX_ROWS + 5)]
    want_rows, want_tokens = reference_greedy(model, prompt, 8)
    got_rows, got_tokens = fast_greedy(FastDecoder(model).session(), prompt, 8)
    assert got_tokens == want_tokens
    np.testing.assert_allclose(np.stack(got_rows), np.stack(want_rows), atol=ATOL, rtol=0)


def test_prefill_and_step_write_the_same_cache():
    """forward (T tokens at once) and step (one at a time) leave the same keys and values."""
    decoder = FastDecoder(mixtral())
    batch, steps = decoder.session(), decoder.session()
    batch.prefill(PROMPT)
    steps.prefill(PROMPT[:1])
    for t in PROMPT[1:]:
        steps.append(t)
    n = len(PROMPT)
    for got, want in ((steps.k_cache, batch.k_cache), (steps.v_cache, batch.v_cache)):
        np.testing.assert_allclose(got[:, :, :n], want[:, :, :n], atol=ATOL, rtol=0)


def test_tandem_experts_and_fast_path_agree():
    """The fast path matches the model run with transformers' "tandem" experts as well."""
    model = mixtral()
    model.set_experts_implementation("tandem")
    want_rows, want_tokens = reference_greedy(model, PROMPT, 12)
    got_rows, got_tokens = fast_greedy(FastDecoder(model).session(), PROMPT, 12)
    assert got_tokens == want_tokens
    np.testing.assert_allclose(np.stack(got_rows), np.stack(want_rows), atol=ATOL, rtol=0)


def test_prefill_reuses_the_shared_prefix_and_rolls_back():
    model = mixtral()
    decoder = FastDecoder(model)
    session = decoder.session()
    _, answer = fast_greedy(session, PROMPT, 10)
    longer = PROMPT + answer[:6]
    fresh = decoder.session().prefill(longer).copy()
    np.testing.assert_allclose(session.prefill(longer), fresh, atol=ATOL, rtol=0)
    assert session.tokens == longer
    # roll back to a shorter, different continuation, then go on decoding
    other = [*PROMPT, 7, 7]
    np.testing.assert_allclose(
        session.prefill(other), decoder.session().prefill(other), atol=ATOL, rtol=0
    )
    assert session.tokens == other
    np.testing.assert_allclose(
        session.append(9), decoder.session().prefill([*other, 9]), atol=ATOL, rtol=0
    )
    # the same prompt again re-runs only its last token
    again = session.prefill([*other, 9])
    assert session.tokens == [*other, 9]
    np.testing.assert_allclose(again, decoder.session().prefill([*other, 9]), atol=ATOL)


def test_full_context_raises_bad_request_without_overflow():
    model = llama()
    session = FastDecoder(model).session(n_ctx=len(PROMPT) + 2)
    session.prefill(PROMPT)
    session.append(3)
    session.append(4)
    with pytest.raises(BadRequest, match="full"):
        session.append(5)
    assert len(session.tokens) == len(PROMPT) + 2
    with pytest.raises(BadRequest, match="exceeds"):
        session.prefill([*PROMPT, 1, 2, 3])
    with pytest.raises(BadRequest):
        session.prefill([])
    with pytest.raises(BadRequest, match="token ids"):
        session.prefill([1, COMMON["vocab_size"]])


def test_session_size_is_capped_by_the_decoder():
    decoder = FastDecoder(llama())
    assert decoder.n_ctx == COMMON["max_position_embeddings"]
    session = decoder.session(n_ctx=10_000)
    assert isinstance(session, FastSession) and session.n_ctx == decoder.n_ctx
    assert session.k_cache.shape == (3, 2, decoder.n_ctx, 16)


def test_fast_decoder_reads_the_models_weights_without_copies():
    model = mixtral()
    decoder = FastDecoder(model)
    layer = decoder.layers[0]
    block = model.model.layers[0]
    assert layer.q.w.data_ptr() == block.self_attn.q_proj.weight.data_ptr()
    assert layer.q.w_np.ctypes.data == block.self_attn.q_proj.weight.data_ptr()
    assert layer.gate_up_proj.data_ptr() == block.mlp.experts.gate_up_proj.data_ptr()
    assert layer.down_np[1].ctypes.data == block.mlp.experts.down_proj[1].data_ptr()


def test_sliding_windows_are_read_per_layer():
    assert FastDecoder(MODELS["qwen2-window"]()).window == 6
    assert FastDecoder(MODELS["qwen2-gqa-bias"]()).window is None
    assert FastDecoder(MODELS["mistral-window"]()).window == 5


def test_unsupported_models_are_refused_with_a_reason():
    model = llama()
    assert unsupported_reason(model.model) is not None  # a bare LlamaModel
    dyn = llama(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
    assert "dynamic" in unsupported_reason(dyn)
    mixed = qwen2(use_sliding_window=True, sliding_window=6, max_window_layers=1)
    assert "mix full and sliding" in unsupported_reason(mixed)
    half = llama().to(torch.bfloat16)
    assert "float32" in unsupported_reason(half)
    with pytest.raises(ValueError):
        FastDecoder(half)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from tandem.runtime.tokenizer import CharTokenizer

    out = {}
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz0123456789=:")
    for name, make in (("llama", llama), ("mixtral", mixtral)):
        path = tmp_path_factory.mktemp(name)
        make(vocab_size=tok.n_vocab).save_pretrained(path)
        tok.save(path)
        out[name] = path
    return out


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_backend_uses_the_fast_path_and_streams_the_same_tokens(model_dirs, arch):
    from tandem.runtime.backends.transformers_lm import TransformersBackend
    from tandem.runtime.generation import SamplingParams

    fast = TransformersBackend(model_dirs[arch], threads=2)
    slow = TransformersBackend(model_dirs[arch], threads=2, decode="transformers")
    assert (fast.decode, slow.decode) == ("fast", "transformers")
    params = SamplingParams(max_tokens=20)
    got = list(fast.stream("sort:cab=", params))
    want = list(slow.stream("sort:cab=", params))
    assert [s.token for s in got] == [s.token for s in want]
    np.testing.assert_allclose(
        [s.logprob for s in got], [s.logprob for s in want], atol=ATOL, rtol=0
    )


def test_backend_rejects_an_unknown_decode_path(model_dirs):
    from tandem.runtime.backends.transformers_lm import TransformersBackend

    with pytest.raises(ConfigError, match="decode"):
        TransformersBackend(model_dirs["llama"], decode="turbo")


@pytest.mark.parametrize("name", list(MODELS))
def test_several_tokens_at_once_match_torch_and_one_at_a_time(name):
    """steps (T ≤ 16 tokens in numpy: a verify pass) gives every row that forward (torch, all
    rows) and T single steps give, after a cached prefix; and leaves the same cache."""
    decoder = FastDecoder(MODELS[name]())
    draft = [7, 3, 3, 21, 9]
    rows = {}
    caches = {}
    for how in ("steps", "forward", "single"):
        session = decoder.session()
        session.prefill(PROMPT[:4])
        start, new = len(session.tokens), PROMPT[4:] + draft  # 12 tokens, past the window of 7
        if how == "steps":
            got = decoder.steps(new, start, session.k_np, session.v_np)
        elif how == "forward":
            got = decoder.forward(
                torch.tensor(new), start, session.k_cache, session.v_cache, rows=len(new)
            ).numpy()
        else:
            got = np.stack(
                [decoder.step(t, start + i, session.k_np, session.v_np) for i, t in enumerate(new)]
            )
        rows[how], caches[how] = got, session.k_cache[:, :, : start + len(new)].clone()
    for how in ("forward", "single"):
        np.testing.assert_allclose(rows["steps"], rows[how], atol=ATOL, rtol=0)
        np.testing.assert_allclose(caches["steps"], caches[how], atol=ATOL, rtol=0)
    session = decoder.session()
    session.prefill(PROMPT)
    np.testing.assert_allclose(session.extend(draft, 3), rows["steps"][-3:], atol=ATOL, rtol=0)
    assert session.tokens == PROMPT + draft
    session.truncate(len(PROMPT) + 1)
    np.testing.assert_allclose(session.append(draft[1]), rows["steps"][-4], atol=ATOL, rtol=0)
