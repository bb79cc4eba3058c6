"""The machinery under the configuration tree (config.py): typed dataclass fields with help texts and checks
(`opt`), schema introspection (`iter_keys`, `type_name`), checking a raw layer (a YAML file or command-line
overrides) against a schema with coercion and one-line errors naming the key and where it came from
(`check_layer`), and merging layers into the dataclasses (`merge`, `build`). Knows no dtrain key."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import field
from typing import Any, Literal, Union

import yaml

from dtrain.errors import DtrainError


class ConfigError(DtrainError):
    """A one-line, user-facing configuration error (names the key, the source and the fix)."""


def opt(default: Any, help: str, **checks: Any) -> Any:
    """A config field with its help text (shown by `dtrain config keys`) and optional range checks.

    checks: ge/gt/le/lt bounds for numbers; choices: a function returning the allowed values (their owner's list).
    """
    meta = {"help": help, **checks}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------------------------------------------------------------
# Schema introspection
# ---------------------------------------------------------------------------------------------------------------------


def fields_of(cls: type) -> dict[str, tuple[Any, dataclasses.Field]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls)}


def iter_keys(cls: type, prefix: str = "") -> typing.Iterator[tuple[str, Any, dataclasses.Field]]:
    """Every leaf key of the schema as (dotted path, type, field)."""
    for name, (tp, f) in fields_of(cls).items():
        if dataclasses.is_dataclass(tp):
            yield from iter_keys(tp, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", tp, f


def type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) if isinstance(a, str) else str(a) for a in args)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(type_name(a) for a in inner) + " or null"
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is dict:
        return f"mapping of {type_name(args[0])} to {type_name(args[1])}"
    return getattr(tp, "__name__", str(tp))


def _all_paths(root: type) -> list[str]:
    leaves = [p for p, _, _ in iter_keys(root)]
    sections = [n for n, (tp, _) in fields_of(root).items() if dataclasses.is_dataclass(tp)]
    return leaves + sections


def _unknown_key(path: str, source: str, root: type) -> ConfigError:
    guess = difflib.get_close_matches(path, _all_paths(root), n=1, cutoff=0.6)
    hint = f" — did you mean {guess[0]}?" if guess else " — run `dtrain config keys` to list valid keys"
    return ConfigError(f"unknown key {path}{hint} ({source})")


# ---------------------------------------------------------------------------------------------------------------------
# Coercion: a raw value (from YAML or a command-line string) → the field's type, or a ConfigError
# ---------------------------------------------------------------------------------------------------------------------

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NULL = {"null", "none", "~", ""}


def _bad(path: str, tp: Any, value: Any, source: str) -> ConfigError:
    # a command-line value is text whatever it looks like: show it as typed (`got 4`, not `got '4' (str)`)
    shown = value if isinstance(value, str) and source.startswith("command-line") else \
        f"{value!r} ({type(value).__name__})"
    return ConfigError(f"{path}: expected {type_name(tp)}, got {shown} ({source})")


def _coerce(value: Any, tp: Any, path: str, source: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in _NULL):
            return None
        for a in inner:
            try:
                return _coerce(value, a, path, source)
            except ConfigError:
                pass
        raise _bad(path, tp, value, source)
    if origin is Literal:
        for choice in args:
            if type(value) is type(choice) and value == choice:
                return choice
            if isinstance(value, str) and value == str(choice):
                return choice
        raise _bad(path, tp, value, source)
    if origin is dict:
        if isinstance(value, str) and value.strip().startswith("{"):  # from the command line
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise _bad(path, tp, value, source) from None
        if not isinstance(value, dict):
            raise _bad(path, tp, value, source)
        return Mapping({str(k): _coerce(v, args[1], f"{path}.{k}", source) for k, v in value.items()})
    if origin is list:
        if isinstance(value, str):
            parsed = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
            value = parsed
        if not isinstance(value, (list, tuple)):
            raise _bad(path, tp, value, source)
        return [_coerce(v, args[0], f"{path}[{i}]", source) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise _bad(path, tp, value, source)
    if tp in (int, float):
        if isinstance(value, (int,) if tp is int else (int, float)) and not isinstance(value, bool):
            return tp(value)
        if isinstance(value, str):  # from the command line; YAML 1.1 also reads 3e-5 as a string
            try:
                return tp(value.strip())
            except ValueError:
                pass
        raise _bad(path, tp, value, source)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _bad(path, tp, value, source)
    raise TypeError(f"config schema: unsupported type {tp!r} at {path}")  # a bug in the schema, not user input


def check_layer(raw: Any, cls: type, prefix: str, source: str, root: type | None = None) -> dict[str, Any]:
    """Validate one layer (a YAML file or the overrides) against the schema `cls` (a section of `root`); return it
    with values coerced."""
    root = root or cls
    if not isinstance(raw, dict):
        where = prefix.rstrip(".") or "the top level"
        raise ConfigError(f"{where}: expected a mapping of keys, got {raw!r} ({source})")
    fields = fields_of(cls)
    out: dict[str, Any] = {}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in fields:
            while isinstance(value, dict) and len(value) == 1:  # otpim: {lr: ..} is reported as otpim.lr
                key, value = next(iter(value.items()))
                path = f"{path}.{key}"
            raise _unknown_key(path, source, root)
        tp, _ = fields[key]
        if dataclasses.is_dataclass(tp):
            value = {} if value is None else value
            if not isinstance(value, dict):
                raise ConfigError(f"{path} is a section: set its keys, e.g. {path}.{next(iter(fields_of(tp)))}=... "
                                  f"({source})")
            out[key] = check_layer(value, tp, f"{path}.", source, root)
        else:
            out[key] = _check_range(_coerce(value, tp, path, source), fields[key][1], path, source)
    return out


_BOUNDS = {"ge": (lambda v, b: v >= b, ">="), "gt": (lambda v, b: v > b, ">"),
           "le": (lambda v, b: v <= b, "<="), "lt": (lambda v, b: v < b, "<")}


def _check_range(value: Any, f: dataclasses.Field, path: str, source: str) -> Any:
    """The ge/gt/le/lt bounds declared on the field, and its `choices` (names an owner lists, e.g. the tasks)."""
    if value is not None and "choices" in f.metadata and value not in (names := f.metadata["choices"]()):
        raise ConfigError(f"{path}: expected one of {', '.join(map(repr, names))}, got {value} ({source})")
    if value is not None:
        for check, (ok, symbol) in _BOUNDS.items():
            if check in f.metadata and not ok(value, f.metadata[check]):
                raise ConfigError(f"{path}: must be {symbol} {f.metadata[check]}, got {value!r} ({source})")
    return value


class Mapping(dict):
    """A mapping-valued key's value (task.verbalizer) in a checked layer: a later layer replaces it whole (sections
    merge key by key)."""


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        section = isinstance(v, dict) and not isinstance(v, Mapping) and isinstance(out.get(k), dict)
        out[k] = merge(out[k], v) if section else v
    return out


def build(cls: type, values: dict[str, Any]) -> Any:
    kwargs = {}
    for name, (tp, _) in fields_of(cls).items():
        if name in values:
            value = values[name]
            kwargs[name] = build(tp, value) if dataclasses.is_dataclass(tp) else \
                dict(value) if isinstance(value, Mapping) else value
    return cls(**kwargs)
