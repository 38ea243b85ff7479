"""Export a Hugging Face Llama, Mixtral or Qwen2 directory to GGUF, the file llama.cpp runs
(format ``gguf``).

The recipe is llama.cpp's own converter's, cut down to what Tandem's models use:

* architecture ``llama`` (Mixtral is ``llama`` with ``expert_count``/``expert_used_count``
  and stacked expert tensors ``blk.N.ffn_{gate,up,down}_exps``, router ``blk.N.ffn_gate_inp``),
  q/k projections permuted from transformers' rotate-half rope layout to llama.cpp's
  interleaved one; or ``qwen2`` (rotate-half rope as transformers', q/k/v biases
  ``blk.N.attn_{q,k,v}.bias``);
* a Tandem char tokenizer as a ``gpt2`` tokenizer (pre-tokenizer ``default``), one token per
  character in GPT-2's byte-to-unicode spelling, ``<pad>``/``<bos>``/``<eos>`` typed as
  control, and one merge (of two special tokens, so it never applies: llama.cpp refuses a gpt2
  vocabulary without merges);
* a Hugging Face byte-level BPE tokenizer as ``gpt2`` with its own tokens, merges, token types
  (special added tokens control, other added ones user-defined), BOS/EOS, ``add_bos_token``,
  its chat template and the pre-tokenizer named by ``pre_tokenizer`` (``qwen2`` for Qwen2's
  regex, ``gpt-2``...: llama.cpp knows each by name, not by regex);
* weights in ``f32``, ``f16`` or ``q8_0``. 1-D tensors (norms) and the MoE router stay f32;
  in ``q8_0`` a matrix whose rows are not a multiple of 32 values is written f16.

With these, llama.cpp and transformers pick the same greedy tokens (tests/runtime/test_gguf.py).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tandem.runtime.errors import BackendError, ConfigError
from tandem.runtime.hf_tokenizer import HFTokenizer, byte_level_alphabet
from tandem.runtime.tokenizer import SPECIALS, CharTokenizer, Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

QType = Literal["f32", "f16", "q8_0"]
QTYPES: tuple[str, ...] = ("f32", "f16", "q8_0")
SUPPORTED = ("llama", "mixtral", "qwen2")
Q8_BLOCK = 32  # values per Q8_0 block: a quantized row's length must be a multiple of it

# transformers name (after "model.layers.N.") → llama.cpp name (after "blk.N.")
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",  # Qwen2
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",  # Mixtral's router, (E, H)
    "mlp.experts.down_proj": "ffn_down_exps.weight",  # (E, H, I)
    # "mlp.experts.gate_up_proj" (E, 2I, H) is split into ffn_gate_exps and ffn_up_exps
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def gguf_tokens(tok: CharTokenizer) -> list[str]:
    """``tok``'s vocabulary as gpt2 token strings (specials unchanged); :class:`ConfigError`
    for a non-ASCII character (its UTF-8 bytes would be several gpt2 symbols)."""
    spell = byte_level_alphabet()
    out = list(SPECIALS)
    for c in tok.vocab[len(SPECIALS) :]:
        if ord(c) > 0x7F:
            raise ConfigError(
                f"character {c!r} is not ASCII: the GGUF export writes one byte per token"
            )
        out.append(spell[ord(c)])
    return out


def _rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a q/k projection from rotate-half (transformers) to interleaved (llama.cpp)
    order, per head: reshape to (heads, 2, head_dim/2, …) and swap the middle axes."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _load(hf_dir: Path) -> tuple[Any, dict[str, np.ndarray], Tokenizer]:
    """Config, float32 numpy state dict (transformers' in-memory layout) and tokenizer."""
    tok = load_tokenizer(hf_dir)
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(hf_dir)
    except ImportError as e:
        raise ConfigError(
            f"the GGUF export needs torch and transformers ({e.name} is missing): "
            'pip install -e ".[llm]"'
        ) from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{hf_dir}: not a Hugging Face model directory: {e}") from None
    if config.model_type not in SUPPORTED:
        raise ConfigError(
            f"{hf_dir}: model_type {config.model_type!r} cannot be exported to GGUF; "
            f"supported: {', '.join(SUPPORTED)}"
        )
    _check_config(hf_dir, config, tok)
    extra = {"experts_implementation": "eager"} if config.model_type == "mixtral" else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, **extra)
    except (OSError, ValueError, RuntimeError) as e:
        raise BackendError(f"{hf_dir}: cannot load the model: {e}") from None
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    return config, state, tok


def _check_config(hf_dir: Path, config: Any, tok: Tokenizer) -> None:
    def refuse(what: str) -> None:
        raise ConfigError(
            f"{hf_dir}/config.json: {what}: not supported by llama.cpp's "
            f"{_arch(config)} architecture"
        )

    if config.vocab_size < tok.n_vocab or (
        isinstance(tok, CharTokenizer) and config.vocab_size != tok.n_vocab
    ):
        raise ConfigError(
            f"{hf_dir}: config.json says vocab_size {config.vocab_size}, "
            f"the tokenizer has {tok.n_vocab} tokens"
        )
    if isinstance(tok, HFTokenizer) and tok.kind != "byte-level":
        raise ConfigError(
            f"{hf_dir}: a {tok.kind} tokenizer cannot be exported yet (only byte-level BPE, "
            "as GPT-2, Llama 3 and Qwen2 use)"
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        refuse("attention_bias/mlp_bias")
    if config.hidden_act != "silu":
        refuse(f"hidden_act {config.hidden_act!r} (only silu)")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        refuse(f"rope_type {rope.get('rope_type')!r} (only default)")
    from tandem.runtime.backends.fast_decode import sliding_window

    window = getattr(config, "sliding_window", None)
    slides = sliding_window(config) is not None  # some layer does (Qwen2: use_sliding_window)
    if slides and window is not None and window < config.max_position_embeddings:
        refuse(f"sliding_window {window}")


def _arch(config: Any) -> str:
    """llama.cpp's architecture name (Mixtral is llama with experts)."""
    return "qwen2" if config.model_type == "qwen2" else "llama"


def _rope_theta(config: Any) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _llama_cpp_tensors(config: Any, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``state`` renamed and laid out the way llama.cpp's llama architecture reads it."""
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    arch = _arch(config)
    out: dict[str, np.ndarray] = {}
    for key, w in state.items():
        if key in _GLOBAL_NAMES:
            out[_GLOBAL_NAMES[key]] = w
            continue
        m = _LAYER_KEY.match(key)
        if m is None:
            raise ConfigError(f"tensor {key!r} has no GGUF name (unsupported model layout)")
        blk, rest = f"blk.{m.group(1)}.", m.group(2)
        if rest == "mlp.experts.gate_up_proj":
            inter = w.shape[1] // 2  # rows [:I] are the gate, [I:] the up projection
            out[blk + "ffn_gate_exps.weight"] = w[:, :inter]
            out[blk + "ffn_up_exps.weight"] = w[:, inter:]
        elif rest in _LAYER_NAMES:
            if arch == "qwen2":  # llama.cpp's qwen2 ropes in transformers' rotate-half layout
                pass
            elif rest == "self_attn.q_proj.weight":
                w = _rope_permute(w, n_head)
            elif rest == "self_attn.k_proj.weight":
                w = _rope_permute(w, n_kv)
            out[blk + _LAYER_NAMES[rest]] = w
        else:
            raise ConfigError(f"tensor {key!r} has no GGUF name (unsupported model layout)")
    if getattr(config, "tie_word_embeddings", False):
        out.pop("output.weight", None)  # llama.cpp reuses token_embd
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def _stored_type(name: str, w: np.ndarray, qtype: str) -> str:
    """What ``name`` is written as: norms and the router f32; a q8_0 matrix whose rows are
    not a multiple of :data:`Q8_BLOCK` falls back to f16 (as llama.cpp's converter does)."""
    if w.ndim == 1 or "ffn_gate_inp" in name or qtype == "f32":
        return "f32"
    if qtype == "q8_0" and w.shape[-1] % Q8_BLOCK != 0:
        return "f16"
    return qtype


def export_gguf(
    hf_dir: str | Path,
    out_path: str | Path,
    *,
    qtype: QType = "q8_0",
    pre_tokenizer: str | None = None,
) -> Path:
    """Write the model saved in ``hf_dir`` (``save_pretrained`` of a ``LlamaForCausalLM``,
    ``MixtralForCausalLM`` or ``Qwen2ForCausalLM``, with its tokenizer: Tandem's char tokenizer
    or a byte-level BPE ``tokenizer.json``) to ``out_path`` as GGUF with weights in ``qtype``;
    return ``out_path``. Written to a temporary name first, then renamed. ``pre_tokenizer``:
    llama.cpp's name for a BPE tokenizer's pre-tokenizer regex (default: ``qwen2`` for a Qwen2
    model, else ``gpt-2``).

    :class:`ConfigError` for another architecture, options llama.cpp's llama architecture
    lacks, a missing tokenizer or an unknown ``qtype``; :class:`BackendError` if the weights
    do not load.
    """
    try:
        import gguf
    except ImportError:
        raise ConfigError(
            'the GGUF export needs the gguf package: pip install gguf (or the "llm" extra)'
        ) from None
    if qtype not in QTYPES:
        raise ConfigError(f"qtype: expected one of {', '.join(QTYPES)}, got {qtype!r}")
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    config, state, tok = _load(hf_dir)
    tensors = _llama_cpp_tensors(config, state)
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[qtype]

    tmp = out_path.with_name(out_path.name + ".tmp")
    w = gguf.GGUFWriter(tmp, _arch(config))
    w.add_name(hf_dir.name)
    w.add_file_type(int(file_type))
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim * config.num_attention_heads != config.hidden_size:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(_rope_theta(config))
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    if config.model_type == "mixtral":
        w.add_expert_count(config.num_local_experts)
        w.add_expert_used_count(config.num_experts_per_tok)

    _write_tokenizer(w, tok, config, pre_tokenizer)

    for name, arr in tensors.items():
        kind = _stored_type(name, arr, qtype)
        if kind == "q8_0":
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, arr.astype(np.float16 if kind == "f16" else np.float32))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    tmp.replace(out_path)
    log.info(
        "wrote %s (%s, %d tensors, %d bytes)",
        out_path,
        qtype,
        len(tensors),
        out_path.stat().st_size,
    )
    return out_path


def _write_tokenizer(w: Any, tok: Tokenizer, config: Any, pre: str | None) -> None:
    """The vocabulary, its types and merges, the special ids and the chat template."""
    import gguf

    control, normal = int(gguf.TokenType.CONTROL), int(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    if isinstance(tok, CharTokenizer):
        w.add_tokenizer_pre("default")
        w.add_token_list(gguf_tokens(tok))
        w.add_token_types([control] * len(SPECIALS) + [normal] * (tok.n_vocab - len(SPECIALS)))
        w.add_token_merges([f"{SPECIALS[1]} {SPECIALS[2]}"])
        w.add_pad_token_id(0)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        return
    assert isinstance(tok, HFTokenizer)
    hf = tok.hf
    w.add_tokenizer_pre(pre or ("qwen2" if config.model_type == "qwen2" else "gpt-2"))
    tokens = hf.convert_ids_to_tokens(list(range(tok.n_vocab)))
    added = hf.added_tokens_decoder
    user = int(gguf.TokenType.USER_DEFINED)
    types = [
        (control if added[i].special else user) if i in added else normal
        for i in range(tok.n_vocab)
    ]
    pad = config.vocab_size - tok.n_vocab  # embedding rows past the tokenizer, as the converter
    tokens += [f"[PAD{i}]" for i in range(tok.n_vocab, config.vocab_size)]
    types += [int(gguf.TokenType.UNUSED)] * pad
    w.add_token_list(tokens)
    w.add_token_types(types)
    model = json.loads(hf.backend_tokenizer.to_str())["model"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    for key, add in (
        ("bos_token_id", w.add_bos_token_id),
        ("eos_token_id", w.add_eos_token_id),
        ("pad_token_id", w.add_pad_token_id),
    ):
        value = getattr(hf, key, None)
        if isinstance(value, int):
            add(value)
    w.add_add_bos_token(bool(getattr(hf, "add_bos_token", False)))
    w.add_add_eos_token(False)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)
