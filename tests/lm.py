"""Tiny language models for tests, built on the fly: a random Llama or Mixtral (transformers)
with a Tandem char tokenizer, optionally in a models directory with a manifest."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from tandem.runtime.manifest import Manifest, ModelEntry, sha256_file, write_manifest
from tandem.runtime.tokenizer import CharTokenizer

CHARS = string.ascii_lowercase + ":= "


def tiny_lm(
    out: Path,
    *,
    arch: str = "llama",
    seed: int = 0,
    chars: str = CHARS,
    hidden: int = 32,
    layers: int = 1,
    heads: int = 2,
    kv_heads: int = 2,
    intermediate: int | None = None,
    n_ctx: int = 512,
    **config: Any,
) -> Path:
    """Save a random model + tokenizer into ``out``; returns ``out``. Extra keyword arguments
    go to the config (e.g. ``initializer_range=0.2`` spreads the logits: fewer near-ties)."""
    import torch
    import transformers

    tok = CharTokenizer(chars)
    common = dict(
        vocab_size=tok.n_vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=n_ctx,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**common, **config}))
    elif arch == "mixtral":
        extra = {"num_local_experts": 4, "num_experts_per_tok": 2, **config}
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**{**common, **extra}))
    else:
        raise ValueError(f"arch: llama or mixtral, got {arch!r}")
    model.save_pretrained(out)
    tok.save(out)
    return out


def lm_entry(models_dir: Path, name: str) -> ModelEntry:
    """A manifest entry for the transformers model directory ``models_dir / name``."""
    return ModelEntry(
        name=name,
        version=f"t-{name}",
        file=name,
        sha256=sha256_file(models_dir / name),
        size_bytes=0,
        format="transformers",
    )


def gguf_entry(models_dir: Path, name: str, hf_name: str, qtype: str = "f32") -> ModelEntry:
    """Export ``models_dir / hf_name`` as ``models_dir / {hf_name}.gguf``; its manifest entry."""
    from tandem.runtime.gguf import export_gguf

    path = export_gguf(models_dir / hf_name, models_dir / f"{hf_name}.gguf", qtype=qtype)
    return ModelEntry(
        name=name,
        version=f"g-{name}",
        file=path.name,
        sha256=sha256_file(path),
        size_bytes=path.stat().st_size,
        format="gguf",
    )


def lm_models_dir(out: Path, models: dict[str, dict[str, Any]]) -> Path:
    """``models``: name → :func:`tiny_lm` options; writes each and a manifest into ``out``."""
    for name, options in models.items():
        tiny_lm(out / name, **options)
    write_manifest(out, Manifest(models=[lm_entry(out, n) for n in models]))
    return out
