"""YAML config files with includes, dotted command-line overrides, and errors that say where.

A config file is a YAML mapping. Any mapping in it may carry an `include:` key (a path or a list of
paths, relative to the file that names them); the included files are merged into that mapping first
and the mapping's own keys win, so one file per concern (model size, data, DeepSpeed variant) composes
gpt-neox style. Overrides such as `optim.lr=3e-4` are applied last. Every value remembers the file and
line (or the override) it came from, so a validation error can point at it.
"""

from __future__ import annotations

import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from lmforge import atomic

INCLUDE_KEY = "include"

M = TypeVar("M", bound=BaseModel)
KeyPath = tuple  # of str (mapping keys) and int (list indices)


class ConfigError(Exception):
    """A config problem found before any work starts; the message names file, line and key."""


def dotted(path: KeyPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


# --------------------------------------------------------------------------------------------------
# Reading YAML with provenance


def _read_tree(path: Path, stack: tuple[Path, ...], prefix: KeyPath, where: dict,
               switched: dict | None = None) -> dict:
    """Parse one file (and its includes) into plain data, recording `where[keypath] = 'file:line'`."""
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise ConfigError(f"include cycle: {chain}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config file: {e}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{path}{line}: invalid YAML: {problem}") from None
    if node is None:
        return {}
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{path}:{node.start_mark.line + 1}: a config file must be a mapping of keys to values")
    return _walk(node, path, (*stack, path), prefix, where, switched if switched is not None else Switched())


class TextInt(int):
    """A YAML int that keeps the text it was written as: a str field takes that text (`revision: 0123` stays
    "0123", not YAML 1.1's octal 83; `1:30` stays "1:30", not sexagesimal 90); an int field takes the number."""

    def __new__(cls, value: int, text: str):
        out = super().__new__(cls, value)
        out.text = text
        return out

    def __str__(self) -> str:
        return self.text


class TextFloat(float):
    """A YAML float that keeps its text (`version: 1.10` stays "1.10" in a str field)."""

    def __new__(cls, value: float, text: str):
        out = super().__new__(cls, value)
        out.text = text
        return out

    def __str__(self) -> str:
        return self.text


def scalar(node: yaml.ScalarNode) -> Any:
    value = yaml.SafeLoader("").construct_object(node)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    return (TextInt if isinstance(value, int) else TextFloat)(value, node.value)


def plain(node: yaml.Node) -> Any:
    """A composed YAML node as data, numbers keeping their text (an override's value)."""
    if isinstance(node, yaml.ScalarNode):
        return scalar(node)
    if isinstance(node, yaml.SequenceNode):
        return [plain(n) for n in node.value]
    return {yaml.SafeLoader("").construct_object(k): plain(v) for k, v in node.value}


def _walk(node: yaml.Node, file: Path, stack: tuple[Path, ...], keypath: KeyPath, where: dict,
          switched: dict) -> Any:
    """`switched`: keypath -> include paths given on the command line (`model.include=...`), in place of what
    the file includes there; an entry is popped once used."""
    where[keypath] = f"{file}:{node.start_mark.line + 1}"
    if isinstance(node, yaml.ScalarNode):
        return scalar(node)
    if isinstance(node, yaml.SequenceNode):
        return [_walk(item, file, stack, (*keypath, i), where, switched) for i, item in enumerate(node.value)]
    loader = yaml.SafeLoader("")
    loader.flatten_mapping(node)  # YAML merge keys (`<<: *base`)
    own: dict[str, Any] = {}
    includes: list[tuple[str, int]] = []
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node)
        line = key_node.start_mark.line + 1
        if not isinstance(key, str):
            raise ConfigError(f"{file}:{line}: keys must be strings, got {key!r}")
        if key in own or (key == INCLUDE_KEY and includes):
            raise ConfigError(f"{file}:{line}: duplicate key '{dotted((*keypath, key))}'")
        if key == INCLUDE_KEY:
            value = loader.construct_object(value_node, deep=True)
            names = [value] if isinstance(value, str) else value
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ConfigError(f"{file}:{line}: '{INCLUDE_KEY}' takes a path or a list of paths")
            includes += [(n, line) for n in names]
            continue
        own[key] = _walk(value_node, file, stack, (*keypath, key), where, switched)
        where[(*keypath, key)] = f"{file}:{line}"
    if keypath in switched:  # at every level: a file included by an included file may name it too
        includes = [(name, 0) for name in switched[keypath]]  # absolute paths, from the command line
        switched.used.add(keypath)
    merged: dict[str, Any] = {}
    for name, line in includes:
        target = Path(os.path.expanduser(name))
        target = target if target.is_absolute() else file.parent / target
        if not target.exists():
            raise ConfigError(f"{file}:{line}: included file not found: {name} (looked for {target})")
        # what the command line includes is read as it is (no switch inside it: it would include itself)
        merged = _merge(merged, _read_tree(target, stack, keypath, where, switched if line else None))
    return _merge(merged, own)


class Switched(dict):
    """keypath -> include paths from the command line; `used` holds the keypaths a file had a section at."""

    def __init__(self):
        super().__init__()
        self.used: set = set()


def _merge(base: dict, over: dict) -> dict:
    """Deep-merge mappings; `over` wins, lists are replaced whole."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------------------------------
# Overrides


def apply_override(data: dict, text: str, where: dict) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (`3`, `true`, `[1, 2]`)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{text}': expected KEY=VALUE, e.g. optim.lr=3e-4")
    try:
        node = yaml.compose(raw, Loader=yaml.SafeLoader) if raw.strip() else None
        value = plain(node) if node is not None else ""
    except yaml.YAMLError:
        value = raw
    parts: list[str | int] = [int(p) if p.isdigit() else p for p in key.split(".")]
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        here = tuple(parts[: i + 1])
        if isinstance(node, list):
            if not isinstance(part, int) or part >= len(node):
                raise ConfigError(f"override '{text}': '{dotted(here[:-1])}' is a list of {len(node)}; "
                                  f"'{part}' is not an index in it")
            nxt = node[part]
        elif isinstance(node, dict):
            nxt = node.setdefault(part, {})
        else:
            nxt = None
        if not isinstance(nxt, (dict, list)):
            origin = where.get(here, "")
            raise ConfigError(f"override '{text}': '{dotted(here)}' is a value ({nxt!r}"
                              f"{', from ' + origin if origin else ''}), not a section with keys")
        node = nxt
    last = parts[-1]
    if isinstance(node, list):
        if not isinstance(last, int) or last >= len(node):
            raise ConfigError(f"override '{text}': '{dotted(tuple(parts[:-1]))}' has no item '{last}'")
        node[last] = value
    else:
        node[str(last)] = value
    path = tuple(parts)
    for k in [k for k in where if k[: len(path)] == path]:
        del where[k]
    where[path] = f"command-line override '{text}'"
    for n in range(1, len(path)):  # sections the override created point at it too
        where.setdefault(path[:n], where[path])


# --------------------------------------------------------------------------------------------------
# Validation with errors that point at the source


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _resolve(tp: Any, data: Any) -> Any:
    """Strip Annotated/Optional and pick the union member whose `type` tag matches `data`."""
    while True:
        if typing.get_origin(tp) is typing.Annotated:
            tp = typing.get_args(tp)[0]
            continue
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            tag = data.get("type") if isinstance(data, dict) else None
            tagged = [m for m in members if _is_model(m) and "type" in m.model_fields
                      and tag in typing.get_args(m.model_fields["type"].annotation)]
            if len(members) == 1 or tagged:
                tp = (tagged or members)[0]
                continue
        return tp


def _schema_fields(schema: Any, data: Any, path: KeyPath) -> list[str] | None:
    """The keys the mapping at `path` may have, following the schema (and union tags) down the data."""
    tp = schema
    for part in path:
        tp = _resolve(tp, data)
        if isinstance(part, int) and typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0]
            data = data[part] if isinstance(data, list) and part < len(data) else None
        elif _is_model(tp) and part in tp.model_fields:
            tp = tp.model_fields[part].annotation
            data = data.get(part) if isinstance(data, dict) else None
        else:
            return None
    tp = _resolve(tp, data)
    return list(tp.model_fields) if _is_model(tp) else None


def _data_path(data: Any, loc: tuple) -> KeyPath:
    """Pydantic's error location minus the union tags it inserts: a path into the data."""
    path: list = []
    node = data
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node or (
                isinstance(node, list) and isinstance(part, int) and part < len(node)):
            node = node[part]
            path.append(part)
        elif i == len(loc) - 1 and isinstance(part, str):
            path.append(part)  # a missing key
    return tuple(path)


def _locate(where: dict, path: KeyPath, fallback: str) -> str:
    for n in range(len(path), -1, -1):
        if path[:n] in where:
            return where[path[:n]]
    return fallback


def format_errors(err: ValidationError, schema: type[BaseModel], data: dict, where: dict, origin: str) -> str:
    lines = []
    for e in err.errors(include_url=False):
        path = _data_path(data, tuple(e["loc"]))
        at = _locate(where, path, origin)
        kind, msg = e["type"], e["msg"]
        if kind == "extra_forbidden":
            allowed = _schema_fields(schema, data, path[:-1]) or []
            near = difflib.get_close_matches(str(path[-1]), allowed, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            msg = f"unknown key{hint} (allowed here: {', '.join(allowed)})" if allowed else "unknown key"
        elif kind == "missing":
            msg = "required key is missing"
        elif "input" in e and not isinstance(e["input"], (dict, list)):
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"{at}: {dotted(path)}: {msg}")
    return "invalid config:\n  " + "\n  ".join(lines)


def load_config(path: str | os.PathLike, schema: type[M], overrides: typing.Sequence[str] = ()) -> M:
    """Read `path` (with includes), apply `overrides`, validate against `schema`; raise ConfigError.

    An override of an include (`model.include=configs/model/124m.yaml`, a path relative to the working directory,
    or a [list]) replaces what the file includes in that section; the section's own keys still win."""
    where: dict = {}
    switched, rest = Switched(), []
    for text in overrides:
        key, sep, raw = text.partition("=")
        parts = key.split(".")
        if sep and parts[-1] == INCLUDE_KEY:
            names = [n.strip() for n in raw.strip().strip("[]").split(",") if n.strip()]
            for name in names:
                if not Path(os.path.expanduser(name)).exists():
                    raise ConfigError(f"override '{text}': included file not found: {name}")
            switched[tuple(int(p) if p.isdigit() else p for p in parts[:-1])] = [
                str(Path(os.path.expanduser(n)).resolve()) for n in names]
        else:
            rest.append(text)
    data = _read_tree(Path(path), (), (), where, switched)
    for keypath, names in switched.items():  # a section no file has: made from the included files
        if keypath in switched.used:
            continue
        node: Any = data
        for part in keypath:
            node = node.setdefault(part, {}) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted(keypath)}.{INCLUDE_KEY}=...': '{dotted(keypath)}' is not a section")
        merged: dict = {}
        for name in names:
            merged = _merge(merged, _read_tree(Path(name), (), keypath, where))
        node.update(_merge(merged, node))
    for text in rest:
        apply_override(data, text, where)
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_errors(err, schema, data, where, str(path))) from None


def to_yaml(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def save_config(config: BaseModel, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically (a reader never sees half a file)."""
    atomic.write_text(path, to_yaml(config))
