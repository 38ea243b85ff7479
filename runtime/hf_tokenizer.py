"""A Hugging Face tokenizer from a model directory, behind :class:`~tandem.runtime.tokenizer.Tokenizer`.

Loaded with ``AutoTokenizer.from_pretrained(directory, local_files_only=True)``: the
directory's ``tokenizer.json`` (or SentencePiece model) and ``tokenizer_config.json``, never a
hub call. What the backends need of it:

* **BOS as the model wants it.** ``encode(text)`` adds what the tokenizer's post-processor adds
  (``add_bos_token``); ``encode(text, special=True)`` (a rendered chat template, which writes
  its own BOS) adds nothing, as transformers' ``apply_chat_template`` tokenizes.
* **Control tokens only where they belong.** A user's prompt is split with
  ``split_special_tokens=True``, so ``"<|im_end|>"`` typed by a user is text, not the control
  token; a rendered template is parsed with them.
* **End tokens:** ``generation_config.json``'s ``eos_token_id`` (an id or a list) and the
  tokenizer's ``eos_token``.
* **Bytes per token** (:meth:`HFTokenizer.piece`), read once into a table from the tokenizer's
  own decoder: byte-level BPE (GPT-2, Llama 3, Qwen2) maps each symbol back to its byte;
  SentencePiece (Llama 2, Mistral) turns ``▁`` into a space and ``<0xNN>`` byte-fallback tokens
  into that byte; control tokens are empty. The decode loop joins the bytes with an incremental
  UTF-8 decoder, so a streamed character is never split. A token after the first keeps its
  leading space (``▁the`` is `` the``), as llama.cpp's ``token_to_piece`` gives it.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from tandem.runtime.errors import BadRequest, ConfigError

log = logging.getLogger(__name__)

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
SPIECE_SPACE = "\u2581"  # ▁, SentencePiece's space
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of each byte (space is ``Ġ``, newline ``Ċ``), as byte-level
    BPE vocabularies write their tokens (in ``tokenizer.json`` and in GGUF)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in keep else next(extra)) for b in range(256)}


class HFTokenizer:
    """A model directory's Hugging Face tokenizer (see the module docstring).
    :class:`ConfigError` when the directory has none or it cannot load."""

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory)
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ConfigError(
                f'{self.path}: a Hugging Face tokenizer needs transformers: pip install -e ".[llm]"'
            ) from None
        if not any((self.path / f).is_file() for f in TOKENIZER_FILES):
            raise ConfigError(
                f"{self.path}: no tokenizer.json (nor {', '.join(TOKENIZER_FILES[1:])}): save the "
                "model's tokenizer beside it (tokenizer.save_pretrained(directory))"
            )
        try:
            tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise ConfigError(
                f"{self.path}: no usable tokenizer (tokenizer.json, tokenizer.model or a "
                f"Tandem tokenizer.json): {type(e).__name__}: {e}"
            ) from None
        self.hf = tok
        self.n_vocab = len(tok)
        self.eos_tokens = frozenset(_eos_ids(self.path, tok))
        template = getattr(tok, "chat_template", None)
        if isinstance(template, dict):  # several named templates: the default one
            template = template.get("default")
        self.chat_template: str | None = template if isinstance(template, str) else None
        self.special_tokens = {
            k: v
            for k in ("bos_token", "eos_token", "unk_token", "pad_token")
            if isinstance(v := getattr(tok, k, None), str)
        }
        added = getattr(tok, "added_tokens_decoder", {}) or {}
        self.control_tokens = {i: a.content for i, a in added.items() if a.special}
        self.kind = _decoder_kind(tok)  # byte-level, sentencepiece or other
        self._pieces = _piece_table(tok, self.kind)

    def encode(self, text: str, *, special: bool = False) -> list[int]:
        try:
            if special:
                ids = self.hf(text, add_special_tokens=False)["input_ids"]
            else:
                ids = self.hf(text, add_special_tokens=True, split_special_tokens=True)["input_ids"]
        except Exception as e:  # a tokenizer's own failure on odd text
            raise BadRequest(f"the tokenizer cannot encode the prompt: {e}") from None
        unk = self.hf.unk_token_id
        if unk is not None and unk in ids:  # name what the vocabulary lacks, never drop it
            lost = [
                c
                for c in dict.fromkeys(text)
                if unk in self.hf(c, add_special_tokens=False)["input_ids"]
            ]
            if lost:
                raise BadRequest(f"characters {''.join(lost)!r} are not in the vocabulary")
        return list(ids)

    def piece(self, token: int) -> bytes:
        return self._pieces[token] if 0 <= token < len(self._pieces) else b""

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)


def _eos_ids(path: Path, tok: Any) -> set[int]:
    ids: set[int] = set()
    if isinstance(tok.eos_token_id, int):
        ids.add(tok.eos_token_id)
    gen = path / "generation_config.json"
    if gen.is_file():
        try:
            eos = json.loads(gen.read_text()).get("eos_token_id")
        except (OSError, ValueError, AttributeError) as e:
            raise ConfigError(f"{gen}: cannot read: {e}") from None
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list) and all(isinstance(i, int) for i in eos):
            ids.update(eos)
        elif eos is not None:
            raise ConfigError(f"{gen}: eos_token_id: expected an id or a list of ids, got {eos!r}")
    if not ids:
        log.warning("tokenizer in %s has no end token: answers end at max_tokens", path)
    return ids


def _decoder_kind(tok: Any) -> str:
    """``byte-level``, ``sentencepiece`` or ``other``, from the fast tokenizer's decoder."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return "sentencepiece" if "sentencepiece" in type(tok).__name__.lower() else "other"
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    types = {d.get("type") for d in decoder.get("decoders", [decoder]) if isinstance(d, dict)}
    if "ByteLevel" in types:
        return "byte-level"
    if types & {"Metaspace", "ByteFallback", "Replace"}:
        return "sentencepiece"
    return "other"


def _piece_table(tok: Any, kind: str) -> list[bytes]:
    """Each id's bytes, by the tokenizer's decoder (see the module docstring)."""
    n = len(tok)
    strings = tok.convert_ids_to_tokens(list(range(n)))
    added = getattr(tok, "added_tokens_decoder", {}) or {}
    unicode_to_byte = {c: b for b, c in byte_level_alphabet().items()}
    table: list[bytes] = []
    for i, s in enumerate(strings):
        a = added.get(i)
        if s is None or (a is not None and a.special):
            table.append(b"")
        elif a is not None:  # a plain added token is kept as written
            table.append(a.content.encode())
        elif kind == "byte-level":
            try:
                table.append(bytes(unicode_to_byte[c] for c in s))
            except KeyError:
                table.append(s.encode())
        elif kind == "sentencepiece":
            m = _BYTE_TOKEN.match(s)
            table.append(
                bytes([int(m.group(1), 16)]) if m else s.replace(SPIECE_SPACE, " ").encode()
            )
        else:
            table.append(tok.decode([i]).encode())
    return table
