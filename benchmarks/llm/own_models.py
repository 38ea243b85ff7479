"""Your own models, measured on the reference pair with a real tokenizer
(:mod:`tandem.reference.chat_pair`: byte-level BPE, Qwen2's pre-tokenizer, ChatML, a random
Qwen2 directory and its GGUF exports).

``python -m benchmarks.llm.own_models [--prompts 200] [--tokens 32] [--chats 40] [--threads 2]
[--json PATH]``

* **agreement** — greedy answers of ``TransformersBackend`` (the fast decode path, and
  ``decode="transformers"``) against transformers' own ``generate`` on the same directory, and
  of llama.cpp on the f32 and q8_0 GGUF exports against the same: the share of prompts whose
  ``--tokens`` greedy tokens are identical (goal: >= 99% in f32).
* **chat** — the prompt length of a one-message chat through each backend's template against
  transformers' ``apply_chat_template`` and llama-cpp-python's ``create_chat_completion``.
* **drafting** — per-token greedy agreement of the q8_0 edge with the cloud directory, given
  the cloud's own prefix (the share of draft tokens greedy speculative decoding accepts).
* **speculative** — ``--chats`` chats through ``EdgeRuntime.chat`` in ``mode: speculative``:
  the q8_0 edge drafts (γ = 4, and ``auto``), a worker process serving the cloud directory
  verifies; drafts accepted.
* **speed** — decode tokens/s of ``TransformersBackend`` (fast path) and of ``generate``, same
  thread count, same prompts (the reference: transformers' own loop).

Prompts: lines of the tokenizer's training text (scikit-learn's data set descriptions, the
sorting task, multilingual lines), each cut to its first 1–12 words, NFC-normalised (llama.cpp
applies no normaliser; transformers' Qwen2 tokenizer applies NFC).
"""

from __future__ import annotations

import argparse
import json
import time
import unicodedata
from pathlib import Path
from typing import Any

from tandem.runtime.machine import machine


def prompts(n: int, seed: int = 0) -> list[str]:
    import random

    from tandem.reference.chat_pair import corpus

    lines = [ln.strip() for text in corpus() for ln in text.splitlines() if len(ln.split()) >= 2]
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        words = rng.choice(lines).split()
        out.append(unicodedata.normalize("NFC", " ".join(words[: rng.randint(1, 12)])))
    return out


def _greedy(backend: Any, prompt: str, n: int) -> list[int]:
    from tandem.runtime.generation import SamplingParams

    return [s.token for s in backend.stream(prompt, SamplingParams(max_tokens=n))]


def run(n_prompts: int, n_tokens: int, threads: int, n_chats: int = 40) -> dict[str, Any]:
    import torch

    from tandem.reference.chat_pair import build_chat_pair
    from tandem.runtime.backends import open_backend

    torch.set_num_threads(threads)
    paths = build_chat_pair()
    fast = open_backend("transformers", paths["chat-cloud"], threads=threads)
    slow = open_backend("transformers", paths["chat-cloud"], decode="transformers")
    f32 = open_backend("gguf", paths["chat-cloud-f32"], threads=threads)
    q8 = open_backend("gguf", paths["chat-edge"], threads=threads)
    hf, model = fast.tokenizer.hf, fast.model
    eos = sorted(fast.eos_tokens)
    same = {"fast": 0, "transformers": 0, "gguf-f32": 0, "gguf-q8_0": 0}
    t_fast = t_ref = 0.0
    n_fast = n_ref = 0
    agree = drafted = 0
    for p in prompts(n_prompts):
        ids = hf(p, return_tensors="pt")["input_ids"]
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=n_tokens, do_sample=False, eos_token_id=eos)
        t_ref += time.perf_counter() - t0
        want = [t for t in out[0, ids.shape[1] :].tolist() if t not in eos]
        n_ref += len(want)
        t0 = time.perf_counter()
        got = _greedy(fast, p, n_tokens)
        t_fast += time.perf_counter() - t0
        n_fast += len(got)
        same["fast"] += got == want
        same["transformers"] += _greedy(slow, p, n_tokens) == want
        same["gguf-f32"] += _greedy(f32, p, n_tokens) == want
        same["gguf-q8_0"] += _greedy(q8, p, n_tokens) == want
        if want:
            a, n = _draft_agreement(q8, fast.tokenize(p), want)
            agree, drafted = agree + a, drafted + n
    messages = [{"role": "user", "content": "Hi"}]
    template = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    template = list(template["input_ids"] if hasattr(template, "keys") else template)
    chat = {"apply_chat_template": len(template)}
    for name, backend in (("transformers", fast), ("gguf", q8)):
        stream = backend.stream_chat(messages, _params(1))
        list(stream)
        chat[name] = stream.prompt_tokens
    raw = q8.raw.create_chat_completion(messages, max_tokens=1, temperature=0)
    chat["create_chat_completion"] = raw["usage"]["prompt_tokens"]
    return {
        "benchmark": "own_models",
        "machine": machine(),
        "prompts": n_prompts,
        "tokens": n_tokens,
        "threads": threads,
        "agreement": {k: v / n_prompts for k, v in same.items()},
        "chat_prompt_tokens": chat,
        "tok_s": {"fast": n_fast / t_fast, "generate": n_ref / t_ref},
        "draft_agreement": agree / max(drafted, 1),
        "speculative": {
            str(g): speculative(paths, g, n_chats, n_tokens, threads) for g in (4, "auto")
        },
    }


def speculative(
    paths: dict[str, Path], gamma: int | str, n_chats: int, n_tokens: int, threads: int
) -> dict[str, Any]:
    """Drafts accepted over ``n_chats`` chats, the edge GGUF drafting for a worker process
    that serves the cloud directory."""
    import shutil
    import tempfile

    from tandem.cloud.config import WorkerConfig
    from tandem.cloud.process import WorkerProcess
    from tandem.edge import EdgeRuntime
    from tandem.router.policy import policy_from_dict
    from tandem.runtime.manifest import Manifest, ModelEntry, sha256_file, write_manifest

    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp)  # a models directory of its own: the build folder is left alone
        shutil.copytree(paths["chat-cloud"], models / "chat-cloud")
        entry = ModelEntry(
            name="chat-cloud",
            version="bench",
            file="chat-cloud",
            sha256=sha256_file(models / "chat-cloud"),
            format="transformers",
        )
        write_manifest(models, Manifest(models=[entry]))
        cfg = {"bind": "tcp://127.0.0.1:*", "models_dir": str(models), "threads": threads}
        with WorkerProcess(WorkerConfig.model_validate(cfg)) as worker:
            task = {
                "kind": "generate",
                "local": {"path": str(paths["chat-edge"]), "format": "gguf", "threads": 1},
                "cloud": {"endpoint": worker.endpoint, "model": "chat-cloud"},
                "gate": {"metric": "token_min", "threshold": 0.999},  # every answer escalates
                "mode": "speculative",
                "max_tokens": n_tokens,
                "speculative": {"gamma": gamma},
            }
            policy = policy_from_dict({"tasks": {"chat": task}}, base_dir=tmp)
            accepted = drafted = chats = 0
            with EdgeRuntime(policy) as rt:
                for p in prompts(n_chats, seed=1):
                    spec = rt.chat([{"role": "user", "content": p}]).speculation
                    if spec is not None:  # None: the edge ended at once (EOS), nothing to do
                        accepted, drafted = accepted + spec["accepted"], drafted + spec["drafted"]
                        chats += 1
    return {
        "chats": chats,
        "drafted": drafted,
        "accepted": accepted,
        "acceptance": accepted / max(drafted, 1),
    }


def _draft_agreement(edge: Any, prompt: list[int], answer: list[int]) -> tuple[int, int]:
    """How many of ``answer``'s tokens the edge picks greedily after the same prefix: one pass
    over prompt + answer, the rows before each answer token."""
    import numpy as np

    session = edge.lease()
    try:
        session.truncate(0)  # a context keeps its cache between leases
        rows = session.extend([*prompt, *answer[:-1]], len(answer))
    finally:
        session.close()
    return int((rows.argmax(axis=1) == np.asarray(answer)).sum()), len(answer)


def _params(n: int) -> Any:
    from tandem.runtime.generation import SamplingParams

    return SamplingParams(max_tokens=n)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--chats", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=Path("bench-own-models.json"))
    a = ap.parse_args(argv)
    r = run(a.prompts, a.tokens, a.threads, a.chats)
    a.json.write_text(json.dumps({"results": r}, indent=2))
    m = r["machine"]
    print(f"{m.get('cpu', '?')}, {a.threads} threads; {a.prompts} prompts, {a.tokens} tokens")
    print("greedy answers identical to transformers' generate:")
    for k, v in r["agreement"].items():
        print(f"  {k:14} {v:7.1%}")
    print("one-message chat, prompt tokens:", r["chat_prompt_tokens"])
    print(
        f"q8_0 edge's greedy agreement per token, given the cloud's prefix: "
        f"{r['draft_agreement']:.1%}"
    )
    for gamma, sp in r["speculative"].items():
        print(
            f"speculative, gamma {gamma}: {sp['accepted']} of {sp['drafted']} drafts accepted "
            f"({sp['acceptance']:.1%}) over {sp['chats']} chats"
        )
    t = r["tok_s"]
    ratio = t["fast"] / t["generate"]
    print(
        f"decode: TransformersBackend {t['fast']:.0f} tok/s, generate {t['generate']:.0f} tok/s "
        f"({ratio:.2f}x)"
    )


if __name__ == "__main__":
    main()
