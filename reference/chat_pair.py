"""A reference model pair with a real subword tokenizer and chat template, built offline.

Tandem's other reference language models use a one-character-per-token vocabulary and raw
prompts. Users deploy models with byte-level BPE vocabularies and chat templates, so this pair
is built the way theirs are, without a hub:

* **the tokenizer** — a byte-level BPE trained with Hugging Face ``tokenizers`` on text that
  ships inside installed packages (scikit-learn's data set descriptions, the sorting task's
  prompts, and a few lines of emoji, CJK and accented text written here), with Qwen2's
  pre-tokenizer regex, Qwen2's special tokens (``<|endoftext|>``, ``<|im_start|>``,
  ``<|im_end|>``) and a ChatML chat template in ``tokenizer_config.json``; two end tokens in
  ``generation_config.json`` as Qwen2-Instruct has;
* **the cloud model** — a small randomly initialised ``Qwen2ForCausalLM`` (attention biases,
  grouped-query attention), saved with ``save_pretrained`` (``chat-cloud/``);
* **the edge model** — the same weights exported to GGUF in ``q8_0`` (``chat-edge-q8_0.gguf``,
  architecture ``qwen2``, pre-tokenizer ``qwen2``, the chat template in
  ``tokenizer.chat_template``): the robot runs the quantized cloud model, so the two share a
  vocabulary and speculative decoding accepts most drafts; and in ``f32``
  (``chat-cloud-f32.gguf``), which llama.cpp runs token for token as transformers does.

The weights are random: the answers are not language. The pair exists to run every path a
user's model takes (tokenization, chat templates, incremental detokenization, vocabulary
digests, GGUF export, speculative decoding) on a real vocabulary. ``tandem models build --chat``
builds it into the cache (seconds).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from tandem.runtime.errors import ConfigError

RECIPE_VERSION = "1"
CLOUD_DIR, EDGE_GGUF, CLOUD_GGUF = "chat-cloud", "chat-edge-q8_0.gguf", "chat-cloud-f32.gguf"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen2's pre-tokenizer split (llama.cpp knows it as pre-tokenizer "qwen2")
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
# ChatML, as Qwen2-Instruct writes it
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MULTILINGUAL = (
    "Grüße aus Köln: café, naïve, façade, crème brûlée.",
    "東京は日本の首都です。机器人正在学习。",
    "Emoji: 🤖🚀✨ 👍🏽 and a family 👨‍👩‍👧.",
    "Combining accents: e\u0301, a\u0308, n\u0303.",
    "Привет, мир! Γειά σου κόσμε. مرحبا بالعالم",
)
Progress = Callable[[str], None]


def corpus() -> list[str]:
    """The text the tokenizer learns from: all of it ships with installed packages or here."""
    from sklearn import datasets

    from tandem.reference import lm_task

    texts = []
    for load in (
        datasets.load_iris,
        datasets.load_digits,
        datasets.load_wine,
        datasets.load_breast_cancer,
        datasets.load_diabetes,
        datasets.load_linnerud,
    ):
        texts.append(load().DESCR)
    for difficulty in (4, 8, 12):
        texts += [it.prompt + it.answer for it in lm_task.make_items(difficulty, 500, seed=0)]
    texts.extend(MULTILINGUAL * 20)
    return texts


def train_tokenizer(out_dir: Path, vocab_size: int = 1024) -> Path:
    """Train the byte-level BPE tokenizer and save it (``tokenizer.json``,
    ``tokenizer_config.json`` with the chat template) into ``out_dir``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML,
    )
    fast.save_pretrained(out_dir)
    return out_dir


def build_cloud(out_dir: Path, *, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """The random Qwen2 model with the tokenizer, in ``out_dir`` (``save_pretrained``)."""
    import torch
    from transformers import (
        GenerationConfig,
        PreTrainedTokenizerFast,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    train_tokenizer(out_dir)
    tok = PreTrainedTokenizerFast.from_pretrained(out_dir, local_files_only=True)
    eos = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    config = Qwen2Config(
        vocab_size=len(tok) + 64,  # padded past the tokenizer, as Qwen2's embedding is
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.2,  # peaked logits: greedy picks are not near-ties
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tok.pad_token_id)
    model.save_pretrained(out_dir)
    return out_dir


def default_dir() -> Path:
    """``chat-v{RECIPE_VERSION}`` beside the digits models (``$TANDEM_CACHE_DIR`` or the user
    cache dir), as the other reference builds."""
    from tandem.reference.models import default_models_dir

    return default_models_dir().with_name(f"chat-v{RECIPE_VERSION}")


def build_chat_pair(
    out: str | Path | None = None, *, force: bool = False, say: Progress = lambda _: None
) -> dict[str, Path]:
    """Build the pair into ``out`` (default :func:`default_dir`) unless it is there already;
    the paths of ``chat-cloud``, ``chat-edge`` and ``chat-cloud-f32``."""
    from tandem.runtime.gguf import export_gguf

    root = Path(out) if out is not None else default_dir()
    paths = {
        "chat-cloud": root / CLOUD_DIR,
        "chat-edge": root / EDGE_GGUF,
        "chat-cloud-f32": root / CLOUD_GGUF,
    }
    stamp = root / "recipe.json"
    if not force and stamp.is_file() and all(p.exists() for p in paths.values()):
        try:
            if json.loads(stamp.read_text()).get("version") == RECIPE_VERSION:
                return paths
        except (OSError, ValueError):
            pass
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{root}: cannot create: {e.strerror or e}") from None
    shutil.rmtree(paths["chat-cloud"], ignore_errors=True)
    say(f"training a byte-level BPE tokenizer and a random Qwen2 model in {root}")
    build_cloud(paths["chat-cloud"])
    say("exporting it to GGUF (q8_0 for the edge, f32 for the check against transformers)")
    export_gguf(paths["chat-cloud"], paths["chat-edge"], qtype="q8_0")
    export_gguf(paths["chat-cloud"], paths["chat-cloud-f32"], qtype="f32")
    stamp.write_text(json.dumps({"version": RECIPE_VERSION}))
    return paths
