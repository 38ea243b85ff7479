"""Loading YAML/JSON config files into pydantic models, with errors that name the file, the key
and what was expected::

    policy.yaml: tasks.digits.gate.threshold: must be between 0 and 1, got 1.5
    policy.yaml: tasks.digits.gate.treshold: unknown key (did you mean 'threshold'?)
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, ValidationInfo

from tandem.runtime.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, values are not coerced silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _relative_to_config_file(v: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    return v if v.is_absolute() or base is None else Path(base) / v


ConfigPath = Annotated[Path, AfterValidator(_relative_to_config_file)]
"""A path in a config file: relative paths are resolved against the file's folder (the
``base_dir`` that :func:`load_config` passes as validation context)."""


def read_config_file(path: str | Path) -> Any:
    """Parse a YAML (or JSON) file; errors name the file and the line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror or e}") from None
    try:
        return json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise ConfigError(
            f"{p}: not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {e}"
        ) from None


def load_config(path: str | Path, model: type[M], **context: Any) -> M:
    """Read ``path`` and validate it as ``model``; raises :class:`ConfigError` listing every
    problem, one per line."""
    data = read_config_file(path)
    return validate_config(data, model, source=str(path), **context)


def validate_config(data: Any, model: type[M], *, source: str, **context: Any) -> M:
    if data is None:
        data = {}
    try:
        return model.model_validate(data, context=context or None)
    except ValidationError as e:
        raise ConfigError(
            "\n".join(f"{source}: {line}" for line in config_problems(e, model))
        ) from None


# Tags of discriminated unions (pydantic puts them in an error's location; a user's file does
# not have them): the task kinds and gate types of a policy.
UNION_TAGS = frozenset({"classify", "generate", "confidence", "learned"})


def config_problems(err: ValidationError, model: type[BaseModel]) -> list[str]:
    """One ``key.path: what was expected, got X`` line per error."""
    lines = []
    for e in err.errors(include_url=False):
        e["loc"] = tuple(p for p in e["loc"] if p not in UNION_TAGS)
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        kind = e["type"]
        if kind == "extra_forbidden":
            allowed = _allowed_keys(model, e["loc"][:-1])
            hint = difflib.get_close_matches(str(e["loc"][-1]), allowed, n=1)
            msg = f"unknown key (did you mean {hint[0]!r}?)" if hint else "unknown key"
            if allowed:
                msg += f"; allowed: {', '.join(allowed)}"
            lines.append(f"{loc}: {msg}")
            continue
        if kind == "missing":
            lines.append(f"{loc}: required key is missing")
            continue
        msg = e["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        msg = msg.replace("Input should be", "must be")
        msg = msg[0].lower() + msg[1:] if msg else msg
        lines.append(f"{loc}: {msg}, got {_short(e.get('input'))}")
    return lines


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model found by walking ``loc`` down from ``model``."""
    tp: Any = model
    for part in loc:
        tp = _step(tp, part)
        if tp is None:
            return []
    keys: dict[str, None] = {}  # a union (e.g. task kinds): the keys of any of its models
    for t in _unwrap(tp):
        if _is_model(t):
            keys.update(dict.fromkeys(t.model_fields))
    return list(keys)


def _step(tp: Any, part: Any) -> Any:
    for t in _unwrap(tp):
        if _is_model(t) and isinstance(part, str) and part in t.model_fields:
            return t.model_fields[part].annotation
        origin = typing.get_origin(t)
        if origin is dict:
            return typing.get_args(t)[1]
        if origin in (list, tuple) and isinstance(part, int):
            return typing.get_args(t)[0]
    return None


def _unwrap(tp: Any) -> list[Any]:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        return [u for a in typing.get_args(tp) for u in _unwrap(a)]
    return [tp]


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)
