"""Chat messages rendered by the model's own template.

A chat is a list of messages ``{"role": ..., "content": ...}``. Each model renders it with its
own Jinja chat template — the GGUF file's ``tokenizer.chat_template``, or the Hugging Face
tokenizer's — through transformers' own renderer (``render_jinja_template``, what
``apply_chat_template`` calls: the sandboxed environment, ``raise_exception``,
``strftime_now``, the ``generation`` tag), so a template renders here exactly as its authors
tested it. A policy may override a task's template (``local.chat_template``).

The messages travel, not a rendering: when the edge hands a chat to the cloud, the worker
renders the same messages with the cloud model's template (the two may be different families
with different templates and vocabularies). A hand-off mid-answer sends the assistant's text so
far as ``prefix``: the model continues after ``render(messages) + prefix``.

Models without a template (Tandem's reference models, trained on raw prompts) get the
messages' contents concatenated in order (:data:`RAW`), which is what they were trained on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tandem.runtime.errors import BadRequest, ConfigError

MAX_MESSAGES = 256
MAX_ROLE_CHARS = 32
MESSAGE_KEYS = frozenset({"role", "content", "name"})
RAW = "raw"  # the name of the no-template rendering, for messages and logs

Message = dict[str, str]


def check_messages(messages: Any) -> list[Message]:
    """``messages`` as a list of ``{role, content[, name]}`` string maps, or
    :class:`BadRequest` saying what is wrong (checked before anything renders them)."""
    if type(messages) is not list or not 1 <= len(messages) <= MAX_MESSAGES:
        raise BadRequest(f"messages: expected a list of 1..{MAX_MESSAGES} messages")
    out: list[Message] = []
    for i, m in enumerate(messages):
        if type(m) is not dict or not m.keys() <= MESSAGE_KEYS or "role" not in m:
            raise BadRequest(
                f"messages[{i}]: expected a map with 'role' and 'content' (and optionally "
                f"'name'), got {sorted(map(str, m)) if isinstance(m, dict) else type(m).__name__}"
            )
        if any(type(v) is not str for v in m.values()):
            raise BadRequest(f"messages[{i}]: role, content and name must be strings")
        if not 0 < len(m["role"]) <= MAX_ROLE_CHARS:
            raise BadRequest(f"messages[{i}].role: expected 1..{MAX_ROLE_CHARS} characters")
        out.append({"content": "", **m})
    return out


class ChatTemplate:
    """A Jinja chat template with the special-token texts it refers to (``bos_token``...).

    ``template`` None renders :data:`RAW`. ``source`` names where the template came from, for
    error messages. A template that fails to compile is a :class:`ConfigError`; one that
    refuses the messages (``raise_exception``, e.g. roles that do not alternate) a
    :class:`BadRequest` carrying its message."""

    def __init__(
        self,
        template: str | None,
        special_tokens: Mapping[str, str] | None = None,
        *,
        source: str = "the model",
    ) -> None:
        self.template = template
        self.special_tokens = dict(special_tokens or {})
        self.source = source
        if template is not None:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            try:
                _compile_jinja_template(template)  # cached by transformers: compiled once
            except Exception as e:
                raise ConfigError(f"{source}: the chat template does not compile: {e}") from None

    @property
    def name(self) -> str:
        return RAW if self.template is None else self.source

    def render(self, messages: Sequence[Message], *, prefix: str = "") -> str:
        """The prompt for the assistant's next message: the messages rendered with the
        generation prompt added, then ``prefix`` (the assistant's text so far)."""
        if self.template is None:
            return "".join(m["content"] for m in messages) + prefix
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            rendered, _ = render_jinja_template(
                conversations=[list(messages)],
                chat_template=self.template,
                add_generation_prompt=True,
                **self.special_tokens,
            )
        except Exception as e:  # jinja2's TemplateError, or a template's own bug
            raise BadRequest(f"{self.source}'s chat template refused the messages: {e}") from None
        return rendered[0] + prefix


def chat_tokens(backend: Any, messages: Sequence[Message], prefix: str = "") -> list[int]:
    """A local model's prompt tokens for ``messages`` then ``prefix``: rendered with its
    ``chat`` template and tokenized as a template is (control tokens parsed, no BOS added: the
    template writes its own); a model without a template tokenizes the :data:`RAW` rendering
    as a plain prompt (BOS as usual)."""
    chat: ChatTemplate = backend.chat
    return backend.tokenize(chat.render(messages, prefix=prefix), special=chat.template is not None)
