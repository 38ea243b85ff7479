"""GGUF export: llama.cpp and transformers agree token for token on tiny random Llama and
Mixtral models, and llama.cpp reads Tandem's char vocabulary back unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tandem.reference import lm_task
from tandem.runtime.errors import ConfigError
from tandem.runtime.gguf import export_gguf
from tandem.runtime.tokenizer import CharTokenizer
from tests.conftest import require
from tests.lm import tiny_lm

PROMPTS = ["sort:dbca=", "sort:qwertyuiopasdf=", "sort:zz=", "sort:mnbvcxzlkjhgfdsapoiuytrewq="]
N_NEW = 16  # greedy tokens per prompt


@pytest.fixture(autouse=True)
def _needs_gguf() -> None:
    require("gguf")


def _tiny(tmp: Path, arch: str, seed: int = 0) -> Path:
    """A random tiny model with the task's tokenizer, saved to ``tmp/arch``. GQA (4 query, 2
    key/value heads) so the k permutation is checked with its own head count; weights drawn
    wider than the default so that logits are far apart (greedy picks are not near-ties)."""
    return tiny_lm(
        tmp / arch,
        arch=arch,
        seed=seed,
        chars=lm_task.CHARS,
        hidden=64,
        layers=2,
        heads=4,
        intermediate=96,
        n_ctx=128,
        initializer_range=0.2,
    )


@pytest.fixture(scope="module", params=["llama", "mixtral"])
def tiny_dir(request, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny(tmp_path_factory.mktemp("hf"), request.param)


def _hf_model(hf_dir: Path, *, round_f16: bool = False):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    if round_f16:  # what the f16 GGUF stores: matrices in f16, norms and the router in f32
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim >= 2 and not name.endswith("mlp.gate.weight"):
                    p.copy_(p.half().float())
    return model


@torch.inference_mode()
def hf_greedy(model, tokens: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """``n`` greedy tokens (EOS not special) and the logits row before the first."""
    ids = torch.tensor([tokens])
    out = model(input_ids=ids, use_cache=True)
    first = out.logits[0, -1].numpy().copy()
    picked = []
    for _ in range(n):
        nxt = int(out.logits[0, -1].argmax())
        picked.append(nxt)
        out = model(input_ids=torch.tensor([[nxt]]), cache=out.cache)
    return picked, first


def open_llama(path: Path, *, f32_cache: bool = False):
    """llama.cpp on 2 threads; ``f32_cache``: keys and values cached in f32 (the default is
    f16, which alone moves logits by ~1e-3)."""
    llama_cpp = require("llama_cpp")
    extra = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
    return llama_cpp.Llama(
        str(path), n_ctx=128, n_threads=2, verbose=False, **(extra if f32_cache else {})
    )


def llama_greedy(llm, tokens: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """The same with llama.cpp's low-level loop: ``eval``, then the last logits row."""
    import llama_cpp

    def last_row() -> np.ndarray:
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()

    llm.reset()
    llm.eval(tokens)
    first = last_row()
    picked = []
    for _ in range(n):
        nxt = int(first.argmax()) if not picked else int(last_row().argmax())
        picked.append(nxt)
        llm.eval([nxt])
    return picked, first


def test_vocabulary_round_trips_through_llama_cpp(tmp_path: Path) -> None:
    hf = _tiny(tmp_path, "llama")
    llm = open_llama(export_gguf(hf, tmp_path / "m.gguf", qtype="f32"))
    tok = CharTokenizer.load(hf)
    assert llm.n_vocab() == tok.n_vocab
    assert (llm.token_bos(), llm.token_eos()) == (1, 2)
    for text in [*PROMPTS, "abcdefghijklmnopqrstuvwxyz:=", "==::", "a"]:
        ids = llm.tokenize(text.encode(), add_bos=True, special=False)
        assert ids == tok.encode(text), text
        assert llm.detokenize(ids[1:]).decode() == text


def test_f32_gives_the_same_tokens_and_logits(tiny_dir: Path, tmp_path: Path) -> None:
    llm = open_llama(export_gguf(tiny_dir, tmp_path / "m.gguf", qtype="f32"), f32_cache=True)
    model = _hf_model(tiny_dir)
    tok = CharTokenizer.load(tiny_dir)
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        want, want_row = hf_greedy(model, ids, N_NEW)
        got, got_row = llama_greedy(llm, ids, N_NEW)
        assert got == want, prompt
        np.testing.assert_allclose(got_row, want_row, atol=1e-4)  # measured: < 5e-6


def hf_rows(model, ids: list[int], continuation: list[int]) -> np.ndarray:
    """transformers' logits row before each token of ``continuation``, (len, vocab)."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids + continuation])).logits[0].numpy()
    return logits[len(ids) - 1 : len(ids) - 1 + len(continuation)]


def llama_rows(llm, ids: list[int], continuation: list[int]) -> np.ndarray:
    """llama.cpp's logits row before each token of ``continuation`` (teacher forcing)."""
    import llama_cpp

    llm.reset()
    llm.eval(ids)
    rows = []
    for t in continuation:
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        rows.append(np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy())
        llm.eval([t])
    return np.stack(rows)


# Share of steps where llama.cpp's pick equals transformers', both given transformers' greedy
# text, on the random models (measured over these 20 prompts × 16 tokens: f16 320/320 for
# both, q8_0 303/320 Llama and 301/320 Mixtral; over other prompts f16 was 318/320 and
# 319/320, q8_0 287/320 for the Mixtral). Random wide weights make near-ties common; a
# Mixtral's top-2 routing flips on a near-tie, which moves its logits by up to ~2 in f16.
MIN_AGREEMENT = {"f16": 0.95, "q8_0": 0.85}


@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_f16_and_q8_0_mostly_pick_the_same_tokens(
    tiny_dir: Path, tmp_path: Path, qtype: str
) -> None:
    llm = open_llama(export_gguf(tiny_dir, tmp_path / f"m-{qtype}.gguf", qtype=qtype))
    model = _hf_model(tiny_dir, round_f16=qtype == "f16")
    tok = CharTokenizer.load(tiny_dir)
    prompts = [it.prompt for d in (4, 8, 16, 24) for it in lm_task.held_out(d, 5)]
    agree = total = 0
    for prompt in prompts:
        ids = tok.encode(prompt)
        want, _ = hf_greedy(model, ids, N_NEW)
        hf, cpp = hf_rows(model, ids, want), llama_rows(llm, ids, want)
        assert list(hf.argmax(1)) == want
        agree += int((cpp.argmax(1) == hf.argmax(1)).sum())
        total += len(want)
        if qtype == "f16" and model.config.model_type == "llama":
            # a dense model in f16 differs only on near-ties (logits moved by < 0.02)
            top2 = np.sort(hf, axis=1)[:, -2:]
            decisive = top2[:, 1] - top2[:, 0] > 0.02
            assert (cpp.argmax(1) == hf.argmax(1))[decisive].all(), prompt
    assert agree / total >= MIN_AGREEMENT[qtype]


def test_tensors_and_types_follow_llama_cpp(tiny_dir: Path, tmp_path: Path) -> None:
    gguf = require("gguf")
    path = export_gguf(tiny_dir, tmp_path / "m.gguf", qtype="q8_0")
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    shapes = {t.name: tuple(int(x) for x in reversed(t.shape)) for t in reader.tensors}
    assert types["token_embd.weight"] == types["blk.0.attn_q.weight"] == "Q8_0"
    assert types["blk.1.attn_norm.weight"] == types["output_norm.weight"] == "F32"
    if "blk.0.ffn_gate_inp.weight" in types:  # Mixtral: stacked experts, router in f32
        assert types["blk.0.ffn_gate_inp.weight"] == "F32"
        assert shapes["blk.0.ffn_gate_exps.weight"] == (4, 96, 64)  # (E, I, H)
        assert shapes["blk.0.ffn_up_exps.weight"] == (4, 96, 64)
        assert shapes["blk.0.ffn_down_exps.weight"] == (4, 64, 96)  # (E, H, I)
        fields = reader.fields
        assert fields["llama.expert_count"].parts[-1][0] == 4
        assert fields["llama.expert_used_count"].parts[-1][0] == 2
    else:
        assert shapes["blk.0.ffn_down.weight"] == (64, 96)


def test_rows_not_a_multiple_of_32_stay_f16_in_q8_0(tmp_path: Path) -> None:
    gguf = require("gguf")
    hf = _tiny(tmp_path, "llama")
    config = json.loads((hf / "config.json").read_text())
    assert config["intermediate_size"] % 32 == 0  # ffn_down's rows: 96 values
    from transformers import LlamaConfig, LlamaForCausalLM

    odd = LlamaForCausalLM(LlamaConfig(**{**config, "intermediate_size": 40}))
    odd.save_pretrained(tmp_path / "odd")
    lm_task.tokenizer().save(tmp_path / "odd")
    reader = gguf.GGUFReader(export_gguf(tmp_path / "odd", tmp_path / "odd.gguf"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q8_0"


def test_clear_errors(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = _tiny(tmp_path, "llama")
    with pytest.raises(ConfigError, match="qtype: expected one of f32, f16, q8_0"):
        export_gguf(hf, tmp_path / "x.gguf", qtype="q4_0")  # type: ignore[arg-type]
    (hf / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match=r"no tokenizer\.json"):
        export_gguf(hf, tmp_path / "x.gguf")
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=31, n_embd=32, n_layer=1, n_head=2)).save_pretrained(gpt2)
    lm_task.tokenizer().save(gpt2)
    with pytest.raises(ConfigError, match="model_type 'gpt2' cannot be exported"):
        export_gguf(gpt2, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf*"))  # nothing half-written
