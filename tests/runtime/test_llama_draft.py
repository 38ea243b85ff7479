"""GGUFDraftModel: a small GGUF model drafting for a larger one in llama-cpp-python, on tiny
random models built here. Greedy output with a draft is the target's own greedy output
whatever the draft proposes; the draft is the small model's greedy continuation, costs only the
tokens new to its KV cache, and stops at its EOS and at the end of its context."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from tandem.reference import lm_task
from tandem.runtime.errors import BackendError, ConfigError
from tests.conftest import require
from tests.lm import tiny_lm

PROMPTS = ["sort:dbca=", "sort:qwertyuiopasdf=", "sort:zz=", "sort:mnbvcxzlkjhgfdsapoiuytrewq="]
N_CTX = 64  # the tiny models' trained context
MAX_TOKENS = 24
# Weights drawn with std 0.2 (logits far apart: no near-ties between a batched and a one-token
# evaluation). Noise of 0.01 on every matrix makes a draft that agrees with its original on
# about a third of the drafted tokens (measured: 30 of 98 at γ 4 on PROMPTS).
OPTIONS = dict(chars=lm_task.CHARS, n_ctx=N_CTX, initializer_range=0.2)
NOISE = 0.01


def _noisy_copy(src: Path, out: Path, sigma: float) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.add_(torch.randn(p.shape, generator=g) * sigma)
    model.save_pretrained(out)
    shutil.copy(src / "tokenizer.json", out / "tokenizer.json")
    return out


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``target`` (hidden 64, 2 layers), ``other`` (another random model, hidden 32, 1 layer,
    the same vocabulary: its drafts are nearly all rejected) and ``noisy`` (the target with
    noise: drafts partly accepted), as f32 GGUF."""
    require("llama_cpp")
    require("gguf")
    require("transformers")
    from tandem.runtime.gguf import export_gguf

    tmp = tmp_path_factory.mktemp("draft")
    target = tiny_lm(tmp / "target", seed=0, hidden=64, layers=2, heads=4, **OPTIONS)
    other = tiny_lm(tmp / "other", seed=1, hidden=32, layers=1, heads=2, **OPTIONS)
    noisy = _noisy_copy(target, tmp / "noisy", NOISE)
    return {
        name: export_gguf(hf, tmp / f"{name}.gguf", qtype="f32")
        for name, hf in [("target", target), ("other", other), ("noisy", noisy)]
    }


def _llama(path: Path, **kw):
    import llama_cpp

    return llama_cpp.Llama(str(path), n_ctx=N_CTX, n_threads=2, verbose=False, **kw)


def _draft(path: Path, **kw):
    from tandem.runtime.backends.llama_draft import GGUFDraftModel

    return GGUFDraftModel(path, **{"threads": 2, **kw})


def _greedy(llm, prompt: str, max_tokens: int = MAX_TOKENS) -> tuple[str, str]:
    out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0)
    return out["choices"][0]["text"], out["choices"][0]["finish_reason"]


def _ids(text: str) -> np.ndarray:
    """The task tokenizer's ids, BOS first (as llama.cpp tokenizes)."""
    return np.asarray(lm_task.tokenizer().encode(text), dtype=np.intc)


def _continuation(path: Path, ids: np.ndarray, k: int) -> list[int]:
    """Up to ``k`` greedy tokens after ``ids`` from a fresh ``Llama`` through its own sampler
    (``generate``, temperature 0), stopping before EOS. llama.cpp rounds ``n_ctx`` up to 256:
    this reference does not stop at the trained context."""
    llm = _llama(path)
    out: list[int] = []
    for t in llm.generate(ids.tolist(), temp=0.0):
        if t == llm.token_eos() or len(out) == k:
            break
        out.append(t)
    llm.close()
    return out


@pytest.fixture(scope="module")
def reference(ggufs) -> dict[str, tuple[str, str]]:
    """The target's greedy output per prompt, without a draft (``logits_all`` off)."""
    llm = _llama(ggufs["target"])
    try:
        return {p: _greedy(llm, p) for p in PROMPTS}
    finally:
        llm.close()


# --- the target's output does not change --------------------------------------------------


@pytest.mark.parametrize("draft_name", ["target", "noisy", "other"])
@pytest.mark.parametrize("gamma", [1, 4])
def test_greedy_output_is_the_targets_own(ggufs, reference, draft_name, gamma):
    from benchmarks.llm.spec_local import AcceptanceCounter

    with _draft(ggufs[draft_name], num_pred_tokens=gamma) as draft:
        counter = AcceptanceCounter(draft)
        target = _llama(ggufs["target"], draft_model=counter)
        for p in PROMPTS:
            assert _greedy(target, p) == reference[p], p
            counter.finish(target)
        target.close()
    assert counter.drafted > 0
    if draft_name == "target":  # its own draft: every token accepted
        assert counter.accepted == counter.drafted
    elif draft_name == "noisy":  # some accepted, some rejected
        assert 0 < counter.accepted < counter.drafted
    else:
        assert counter.accepted < counter.drafted / 4


def test_acceptance_counter_agrees_with_a_plain_count(ggufs):
    """The counter's totals equal a replay of llama-cpp-python's loop on the target's greedy
    sequence: each draft continues the sequence so far; the tokens it shares with the sequence
    are accepted, and the next draft starts after them and the target's own token."""
    from benchmarks.llm.spec_local import AcceptanceCounter

    with _draft(ggufs["noisy"], num_pred_tokens=4) as draft:
        counter = AcceptanceCounter(draft)
        target = _llama(ggufs["target"], draft_model=counter)
        for p in PROMPTS:
            _greedy(target, p)
            counter.finish(target)
        target.close()
        accepted = drafted = 0
        for p in PROMPTS:
            prompt = _ids(p)
            answer = _continuation(ggufs["target"], prompt, MAX_TOKENS + 8)
            stops = len(answer) < MAX_TOKENS + 8
            seq = [*prompt.tolist(), *answer, *([2] if stops else [])]
            pos = len(prompt) + 1  # the first draft follows the target's first token
            while pos - len(prompt) < MAX_TOKENS and seq[pos - 1] != 2:
                d = draft(np.asarray(seq[:pos], dtype=np.intc)).tolist()
                m = next((i for i, t in enumerate(d) if t != seq[pos + i]), len(d))
                accepted, drafted, pos = accepted + m, drafted + len(d), pos + m + 1
    assert (counter.accepted, counter.drafted) == (accepted, drafted)
    assert 0 < counter.rate < 1


# --- the draft itself -----------------------------------------------------------------------


def test_draft_is_the_small_models_greedy_continuation(ggufs):
    with _draft(ggufs["other"], num_pred_tokens=6) as draft:
        for p in [*PROMPTS, *reversed(PROMPTS)]:  # the second time, from a cache of another
            got = draft(_ids(p))
            assert got.dtype == np.intc
            assert got.tolist() == _continuation(ggufs["other"], _ids(p), 6), p


def _counting_evals(draft, monkeypatch) -> list[int]:
    """Patch the draft's ``Llama.eval`` to record the length of every call."""
    llm, calls = draft.llm, []
    real = llm.eval

    def counted(tokens):
        calls.append(len(tokens))
        return real(tokens)

    monkeypatch.setattr(llm, "eval", counted)
    return calls


def test_each_call_evaluates_only_new_tokens(ggufs, monkeypatch):
    with _draft(ggufs["other"], num_pred_tokens=4) as draft:
        calls = _counting_evals(draft, monkeypatch)
        x = _ids("sort:hello=")
        d = draft(x)
        assert len(d) == 4
        assert calls == [len(x), 1, 1, 1]  # the input, then three draft steps
        assert draft.llm.n_tokens == len(x) + 3  # the last drafted token is not evaluated

        # two drafted tokens accepted, then the target's own token: only that token and the
        # last accepted one (never evaluated) are new
        own = 3 if d[2] != 3 else 4  # a letter the small model did not pick
        y = np.concatenate([x, d[:2], [own]]).astype(np.intc)
        calls.clear()
        assert draft(y).tolist() == _continuation(ggufs["other"], y, 4)
        assert calls == [1, 1, 1, 1]

        # every drafted token accepted, then the target's own: the 4th drafted token and it
        y2 = np.concatenate([y, draft(y), [5]]).astype(np.intc)
        calls.clear()
        assert draft(y2).tolist() == _continuation(ggufs["other"], y2, 4)
        assert calls == [2, 1, 1, 1]

        # a different prompt sharing "sort:": BOS and "sort:" are kept
        z = _ids("sort:world=")
        calls.clear()
        draft(z)
        assert calls[0] == len(z) - len(_ids("sort:"))


def _with_eos(src: Path, out: Path, eos: int) -> Path:
    """A copy of GGUF ``src`` whose EOS token is ``eos`` (an ordinary letter)."""
    from gguf import GGUFReader

    shutil.copyfile(src, out)
    reader = GGUFReader(out, "r+")
    field = reader.get_field("tokenizer.ggml.eos_token_id")
    assert field is not None
    field.parts[field.data[0]][0] = eos
    del reader, field  # flush and unmap
    return out


def test_stops_at_the_drafts_eos(ggufs, tmp_path):
    x = _ids("sort:hello=")
    with _draft(ggufs["other"], num_pred_tokens=6) as draft:
        full = draft(x).tolist()
    stop = next(i for i in range(1, 6) if full[i] not in full[:i])  # its first appearance
    with _draft(
        _with_eos(ggufs["other"], tmp_path / "eos.gguf", full[stop]), num_pred_tokens=6
    ) as d:
        assert d(x).tolist() == full[:stop]


def test_context_end_gives_fewer_tokens(ggufs):
    with _draft(ggufs["other"], num_pred_tokens=4) as draft:
        assert draft.n_ctx == N_CTX  # the trained context, not llama.cpp's rounded-up one
        ids = np.resize(_ids("sort:abcdefghijklmnopqrstuvwxyz="), N_CTX + 5).astype(np.intc)
        for n, room in [(N_CTX - 6, 4), (N_CTX - 2, 2), (N_CTX - 1, 1), (N_CTX, 0)]:
            want = _continuation(ggufs["other"], ids[:n], 4)[:room]
            assert draft(ids[:n]).tolist() == want, n
            assert draft.llm.n_tokens < N_CTX
        assert draft(ids).size == 0  # longer than the context


def test_empty_input_and_num_pred_tokens(ggufs):
    with _draft(ggufs["other"], num_pred_tokens=3) as draft:
        empty = draft(np.empty(0, dtype=np.intc))
        assert empty.size == 0 and empty.dtype == np.intc
        x = _ids("sort:ab=")
        assert len(draft(x)) == 3
        draft.num_pred_tokens = 5
        assert draft(x).tolist() == _continuation(ggufs["other"], x, 5)


# --- errors ---------------------------------------------------------------------------------


def test_bad_files_options_and_close(ggufs, tmp_path):
    with pytest.raises(BackendError, match=r"missing\.gguf: file missing"):
        _draft(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(BackendError, match=r"junk\.gguf: not a GGUF file"):
        _draft(junk)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(ggufs["other"].read_bytes()[:4096])
    with pytest.raises(BackendError, match=r"cut\.gguf: .*\w"):
        _draft(cut)
    for bad in [dict(num_pred_tokens=0), dict(n_ctx=1), dict(threads=-1)]:
        with pytest.raises(ConfigError, match="num_pred_tokens >= 1"):
            _draft(ggufs["other"], **bad)
    draft = _draft(ggufs["other"])
    draft.close()
    draft.close()  # twice is fine
    with pytest.raises(BackendError, match="closed"):
        draft(_ids("sort:ab="))


# --- the benchmark, small -------------------------------------------------------------------


def test_same_host_rows(ggufs):
    from benchmarks.llm.spec_local import same_host

    rows = same_host(
        ggufs["target"], ggufs["noisy"], PROMPTS[:2], max_tokens=16, repeat=1, gammas=(2,),
        n_ctx=N_CTX,
    )  # fmt: skip
    assert [r["row"] for r in rows] == [
        "target alone",
        "target, logits_all, no draft",
        "+ GGUF draft γ=2",
        "+ prompt lookup γ=2",
    ]
    assert all(r["identical"] and r["tokens_per_s"] > 0 for r in rows)
    assert rows[0]["ratio"] == 1.0 and math.isnan(rows[0]["acceptance"])
    assert 0 < rows[2]["accepted"] < rows[2]["drafted"]
    with pytest.raises(ValueError, match="needs"):
        same_host(ggufs["target"], ggufs["noisy"], ["sort:ab="], max_tokens=N_CTX, repeat=1)
