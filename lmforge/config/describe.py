"""`--help` text generated from a schema's field docstrings: one line per key, with type and default."""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _type_name(typing.get_args(tp)[0])
    if origin is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _models_in(tp: Any) -> list[type[BaseModel]]:
    """The config sections a field holds (a section, an optional one, a list of them, a tagged union)."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    return [m for a in typing.get_args(tp) for m in _models_in(a)]


def describe(schema: type[BaseModel], prefix: str = "") -> list[str]:
    lines = []
    for name, field in schema.model_fields.items():
        key = f"{prefix}{name}"
        models = _models_in(field.annotation)
        doc = (field.description or "").strip().replace("\n", " ")
        if models:
            lines.append(f"  {key}: {doc}" if doc else f"  {key}:")
            many = len(models) > 1 or typing.get_origin(field.annotation) is list
            for m in models:
                tag = m.model_fields.get("type")
                sub = f"{key}[]." if typing.get_origin(field.annotation) is list else f"{key}."
                if many and tag is not None:
                    lines.append(f"  {key}[] with type={tag.default}: {(m.__doc__ or '').strip()}")
                lines += describe(m, sub)
            continue
        default = field.get_default(call_default_factory=True) if field.default is not PydanticUndefined \
            or field.default_factory else PydanticUndefined
        shown = "required" if default is PydanticUndefined else f"default {default!r}"
        lines.append(f"  {key} ({_type_name(field.annotation)}, {shown}): {doc}")
    return lines


def config_help(schema: type[BaseModel]) -> str:
    return "config keys (set in the YAML file or as key.sub=value overrides):\n" + "\n".join(describe(schema))
