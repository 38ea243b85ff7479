"""The gateway's response bodies in OpenAI's shapes: a whole answer (``text_completion`` /
``chat.completion``), a stream's chunks (``chat.completion.chunk``), ``logprobs``, ``usage``
and Tandem's ``tandem`` extension (see :mod:`tandem.edge.gateway`). Pure functions of a
:class:`~tandem.edge.gateway_requests.GatewayCall` and the runtime's chunks and result; a
stream's chunks advance the call's ``offset`` and ``role_sent``."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from tandem.runtime.types import Tier

if TYPE_CHECKING:
    from tandem.edge.gateway_requests import GatewayCall
    from tandem.runtime.types import AnswerChunk, GenerationResult


def answer_body(call: GatewayCall, result: GenerationResult, pieces: list[str]) -> dict[str, Any]:
    """A non-streamed answer; ``pieces``: each token's text (:func:`token_pieces`)."""
    lp = None
    if call.logprobs is not None:
        lp = logprobs_body(call, pieces, result.logprobs)
    choice: dict[str, Any] = {"index": 0, "logprobs": lp, "finish_reason": finish_reason(result)}
    if call.chat:
        choice["message"] = {"role": "assistant", "content": result.text, "refusal": None}
    else:
        choice["text"] = result.text
    return {
        **head(call, "chat.completion" if call.chat else "text_completion"),
        "choices": [choice],
        "usage": usage_body(call, result),
        "tandem": extension(result),
    }


def head(call: GatewayCall, obj: str) -> dict[str, Any]:
    return {"id": call.id, "object": obj, "created": call.created, "model": call.task}


def chunk_object(call: GatewayCall) -> str:
    return "chat.completion.chunk" if call.chat else "text_completion"


def chunk_body(
    call: GatewayCall,
    text: str | None,
    logprobs: dict[str, Any] | None,
    finish: str | None,
    tandem: dict[str, Any],
) -> dict[str, Any]:
    """One stream chunk; a chat's first delta with text carries the role."""
    choice: dict[str, Any] = {"index": 0}
    if call.chat:
        delta: dict[str, Any] = {}
        if text is not None:
            delta = {"content": text} if call.role_sent else {"role": "assistant", "content": text}
            call.role_sent = True
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    choice["logprobs"] = logprobs
    choice["finish_reason"] = finish
    return {**head(call, chunk_object(call)), "choices": [choice], "tandem": tandem}


def chunk_event(call: GatewayCall, chunk: AnswerChunk) -> dict[str, Any]:
    """The stream chunk of one of the runtime's chunks (its tier, ``restart``, ``drafted``)."""
    if chunk.restart:
        call.offset = 0
    lp = None
    if call.logprobs is not None:
        lp = logprobs_body(call, token_pieces(chunk), chunk.logprobs)
    ext: dict[str, Any] = {"tier": chunk.tier.value, "restart": chunk.restart}
    if chunk.drafted is not None:
        ext["drafted"] = chunk.drafted
    body = chunk_body(call, chunk.text, lp, None, ext)
    call.offset += len(chunk.text)
    return body


def last_chunk(call: GatewayCall, result: GenerationResult) -> dict[str, Any]:
    """The chunk with ``finish_reason`` and the whole answer's ``tandem`` fields."""
    return chunk_body(call, None, None, finish_reason(result), extension(result))


def usage_chunk(call: GatewayCall, result: GenerationResult) -> dict[str, Any]:
    """``stream_options.include_usage``'s last chunk: no choices, the usage."""
    return {**head(call, chunk_object(call)), "choices": [], "usage": usage_body(call, result)}


def token_pieces(chunk: AnswerChunk) -> list[str]:
    """Each token's text in ``chunk``: the edge's chunks say; a cloud chunk of several
    tokens carries only their joined text, which then goes on its first token."""
    n = len(chunk.tokens)
    if chunk.token_texts is not None and len(chunk.token_texts) == n:
        return list(chunk.token_texts)
    return [chunk.text] + [""] * (n - 1) if n else []


def logprobs_body(call: GatewayCall, pieces: list[str], lps: list[float]) -> dict[str, Any]:
    """OpenAI's ``logprobs`` for these tokens: the legacy shape for completions (with
    ``text_offset`` counted from the prompt's start, as OpenAI does), ``content`` for
    chat. Unknown log-probs (NaN) are null."""
    top = call.logprobs or 0
    values = [_num(x) for x in lps]
    if call.chat:
        entries = []
        for p, x in zip(pieces, values, strict=True):
            entry = {"token": p, "logprob": x, "bytes": list(p.encode())}
            entries.append({**entry, "top_logprobs": [entry] if top else []})
        return {"content": entries, "refusal": None}
    offsets, at = [], len(call.prompt) + call.offset
    for p in pieces:
        offsets.append(at)
        at += len(p)
    return {
        "tokens": pieces,
        "token_logprobs": values,
        "top_logprobs": [{p: x} for p, x in zip(pieces, values, strict=True)] if top else None,
        "text_offset": offsets,
    }


def finish_reason(result: GenerationResult) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def usage_body(call: GatewayCall, result: GenerationResult) -> dict[str, Any]:
    n = len(result.tokens)
    p = result.prompt_tokens
    return {
        "prompt_tokens": p,
        "completion_tokens": n,
        "total_tokens": None if p is None else p + n,
    }


def extension(result: GenerationResult) -> dict[str, Any]:
    """The response's ``tandem`` field (see the module docstring of the gateway)."""
    if result.degraded:
        tier = Tier.EDGE_DEGRADED
    else:
        tier = result.tiers[-1] if result.tiers else Tier.EDGE
    return {
        "tier": tier.value,
        "restart": False,
        "tiers": [t.value for t in result.tiers],
        "confidence": result.confidence,
        "reason": result.reason,
        "request_id": result.request_id,
        "escalated_at": result.escalated_at,
        "timings_ms": dict(result.timings),
        "model_versions": dict(result.model_versions),
        "finish_reason": result.finish_reason,
        "speculation": result.speculation,
    }


def _num(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def finite(obj: Any) -> Any:
    """``obj`` with every NaN/inf float replaced by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return _num(obj)
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any) -> bytes:
    """Compact one-line JSON, as OpenAI sends each event."""
    return json.dumps(finite(obj), separators=(",", ":"), ensure_ascii=False).encode()
