"""Reading training configs: YAML files plus `key.sub=value` overrides into nested dataclasses.

Each dataclass lives next to the code that uses it; this module only knows how to fill any of
them from plain data, so a typo'd key (in the file or on the command line) is an error that names
the full dotted key and the closest valid one.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class TrainConfigError(ValueError):
    """A training config key or value that is unknown or has the wrong type; names the dotted key."""


def from_dict(cls: type[T], data: dict[str, Any], where: str = "", base: T | None = None) -> T:
    """Build dataclass `cls` from a (nested) dict, recursing into dataclass-typed fields.

    Keys not given keep their value in `base` (default: the class defaults); a nested section
    updates the base's section key by key, while any other value (lists, mappings such as an
    inline model config) replaces the base value whole.
    """
    if not isinstance(data, dict):
        raise TrainConfigError(f"'{where or '<root>'}' must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    values = {k: copy.deepcopy(getattr(base, k)) for k in fields} if base is not None else {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else key
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(sorted(fields))})"
            raise TrainConfigError(f"unknown config key '{name}'{hint}")
        if dataclasses.is_dataclass(hints[key]):
            section_base = values.get(key)
            if section_base is None and fields[key].default_factory is not dataclasses.MISSING:
                section_base = fields[key].default_factory()
            values[key] = from_dict(hints[key], value, name, section_base)
        else:
            values[key] = _coerce(hints[key], value, name)
    try:
        return cls(**values)
    except TypeError as error:  # a required field is missing
        raise TrainConfigError(f"'{where or '<root>'}': {error}") from None


def _coerce(kind: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, name)
            except TrainConfigError as error:
                errors.append(str(error))
        raise TrainConfigError(errors[0] if len(errors) == 1 else f"'{name}' = {value!r} matches none of {kind}")
    if dataclasses.is_dataclass(kind):
        return from_dict(kind, value, name)
    if origin is typing.Literal:
        if value not in typing.get_args(kind):
            raise TrainConfigError(f"'{name}' = {value!r}: expected one of {typing.get_args(kind)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise TrainConfigError(f"'{name}' = {value!r}: expected a list")
        args = typing.get_args(kind)
        item = args[0] if args else Any
        return origin(_coerce(item, v, f"{name}[{i}]") for i, v in enumerate(value))
    if origin is dict or kind is dict:
        if not isinstance(value, dict):
            raise TrainConfigError(f"'{name}' = {value!r}: expected a mapping")
        args = typing.get_args(kind)
        return {k: _coerce(args[1], v, f"{name}.{k}") for k, v in value.items()} if args else dict(value)
    if kind is Any:
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TrainConfigError(f"'{name}' = {value!r}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`a.b=value` strings into a copy of nested dict `data`; values are parsed as YAML scalars."""
    data = _deep_copy(data)
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise TrainConfigError(f"override {override!r} is not of the form key=value")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise TrainConfigError(f"override {override!r}: '{part}' is not a section")
        node[leaf] = yaml.safe_load(raw) if raw else ""
    return data


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config file at {path}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise TrainConfigError(f"{path}: the top level must be a mapping of config keys")
    return data


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> T:
    """`cls` from a YAML file (or its defaults) with command-line overrides applied on top."""
    data = read_yaml(path) if path else {}
    try:
        return from_dict(cls, apply_overrides(data, overrides or []))
    except TrainConfigError as error:
        raise TrainConfigError(f"{path}: {error}" if path else str(error)) from None
