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
messages' contents concatenated in order, which is what they were trained on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from tandem.runtime.errors import BadRequest, ConfigError
from tandem.runtime.generation import is_utf8

log = logging.getLogger(__name__)

MAX_MESSAGES = 256
MAX_ROLE_CHARS = 32
MESSAGE_KEYS = frozenset({"role", "content", "name"})

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
        if any(type(v) is not str or not is_utf8(v) for v in m.values()):
            raise BadRequest(
                f"messages[{i}]: role, content and name must be strings UTF-8 can encode"
            )
        if not 0 < len(m["role"]) <= MAX_ROLE_CHARS:
            raise BadRequest(f"messages[{i}].role: expected 1..{MAX_ROLE_CHARS} characters")
        out.append({"content": "", **m})
    return out


class ChatTemplate:
    """A model's Jinja chat template with the special-token texts it refers to (``bos_token``...)
    and the texts of the model's control tokens (``<|im_start|>``...).

    ``template`` None renders the contents concatenated. ``source`` names where the template came from, for
    error messages. A template that does not compile makes chats with this model fail with a
    :class:`BadRequest` saying so (plain prompts still work); one that refuses the messages
    (``raise_exception``, e.g. roles that do not alternate) a :class:`BadRequest` carrying its
    message. A message whose text holds a control token's text is refused: rendered, it would
    become that control token (a user could close their turn and open a system one)."""

    def __init__(
        self,
        template: str | None,
        special_tokens: Mapping[str, str] | None = None,
        *,
        control_texts: Iterable[str] = (),
        source: str = "the model",
    ) -> None:
        self.template = template
        self.special_tokens = dict(special_tokens or {})
        self.control_texts = tuple(sorted({t for t in control_texts if t}))
        self.source = source
        self.error: str | None = None
        if template is not None:
            try:
                from transformers.utils.chat_template_utils import _compile_jinja_template

                _compile_jinja_template(template)  # cached by transformers: compiled once
            except ImportError:
                pass  # compiled at the first render, which says what is missing
            except Exception as e:
                self.error = f"{source}: the chat template does not compile: {e}"
                log.warning("%s; chats with it will be refused", self.error)

    def render(self, messages: Sequence[Message], *, prefix: str = "") -> str:
        """The prompt for the assistant's next message: the messages rendered with the
        generation prompt added, then ``prefix`` (the assistant's text so far)."""
        if self.template is None:
            return "".join(m["content"] for m in messages) + prefix
        if self.error is not None:
            raise BadRequest(self.error)
        self._refuse_control_texts(messages)
        try:
            from transformers.utils.chat_template_utils import render_jinja_template
        except ImportError:
            raise ConfigError(
                'chat templates are rendered by transformers: pip install -e ".[llm]"'
            ) from None
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

    def _refuse_control_texts(self, messages: Sequence[Message]) -> None:
        for i, m in enumerate(messages):
            for key, text in m.items():
                hit = next((c for c in self.control_texts if c in text), None)
                if hit is not None:
                    raise BadRequest(
                        f"messages[{i}].{key} holds {hit!r}, a control token of {self.source}: "
                        "rendered, it would act as one (end a turn, start another)"
                    )


@runtime_checkable
class ChatBackend(Protocol):
    """A generation backend that takes chat messages (llama.cpp, transformers, a server)."""

    def stream_chat(
        self,
        messages: list[Message],
        params: Any,
        *,
        prefix: str = "",
        cancel: threading.Event | None = None,
    ) -> Any:
        """The assistant's answer to ``messages`` (a :class:`~tandem.runtime.generation.BackendStream`),
        continuing after ``prefix``."""
        ...


class TemplatedBackend(ChatBackend, Protocol):
    """A local model that renders chats itself: its template and its tokenizer."""

    chat: ChatTemplate

    def tokenize(self, text: str, *, special: bool = False) -> list[int]: ...


def chat_tokens(
    backend: TemplatedBackend, messages: Sequence[Message], prefix: str = ""
) -> list[int]:
    """A local model's prompt tokens for ``messages`` then ``prefix``: rendered with its
    ``chat`` template and tokenized as a template is (control tokens parsed, no BOS added: the
    template writes its own); a model without a template tokenizes the contents concatenated
    as a plain prompt (BOS as usual)."""
    chat = backend.chat
    return backend.tokenize(chat.render(messages, prefix=prefix), special=chat.template is not None)
