"""Strict loading of YAML mappings into typed dataclasses.

Config dataclasses declare each field with :func:`option`, which records the documentation
shown by ``ctrserve config-reference`` and in the README. :func:`build` turns a mapping into a
dataclass, refusing unknown keys (every unknown key of the mapping in one error, each with a "did
you mean" hint where one is close) and wrong types, and naming the file and dotted key path in
every message. A field declared with ``option(..., no_effect=reason)`` is accepted (another
system's key, e.g. PERSIA's) and logged once per load, with the reason, when a file gives it.
A field typed with an :class:`enum.Enum` takes the
member's value as its YAML spelling. Range checks live in each dataclass's
``__post_init__`` and raise :class:`ValueError`; :func:`build` re-raises them as
:class:`ConfigError` with the key path attached.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import logging
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from embedding_server.core.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")

log = logging.getLogger("ctrserve.config")


def option(
    default: Any = dataclasses.MISSING,
    *,
    doc: str,
    default_factory: Any = dataclasses.MISSING,
    no_effect: str = "",
) -> Any:
    """A dataclass field carrying its documentation string.

    Args:
        default: the default value (omit, with no ``default_factory``, for a required key).
        doc: what the key does, for ``ctrserve config-reference``.
        default_factory: a function giving the default, for mutable defaults.
        no_effect: for a key accepted only so another system's files load (PERSIA's): why it
            changes nothing here. :func:`build` logs it once per load when a file gives the key.
    """
    metadata = {"doc": doc, "no_effect": no_effect} if no_effect else {"doc": doc}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def log_no_effect(source: str, path: str, reason: str) -> None:
    """The one log line of a given key that has no effect here (see :func:`option`)."""
    log.info("%s: '%s' is accepted but has no effect here: %s", source, path, reason)


def read_yaml(path: str | Path) -> Mapping[str, Any]:
    """Read a YAML file that must hold a mapping (an empty file is an empty mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def build(cls: type[T], data: Any, source: str, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, validating keys and types.

    Every unknown key of ``data`` (nested sections included) is reported in one error. Keys
    declared with ``no_effect`` are logged once each (see :func:`option`).

    Args:
        cls: the dataclass type.
        data: a mapping (usually parsed YAML).
        source: the file name (or other origin) used in error messages.
        path: the dotted key path of ``data`` inside the file.

    Raises:
        ConfigError: on unknown keys, a wrong type or a value the dataclass rejects.
    """
    where = f"{source}: " + (f"'{path}'" if path else "top level")
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    raise_unknown(source, unknown_keys(cls, data, path))
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _convert(hints[key], value, source, _join(path, key))
        if fields[key].metadata.get("no_effect"):
            log_no_effect(source, _join(path, key), fields[key].metadata["no_effect"])
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{source}: missing required key '{_join(path, missing[0])}'")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def raise_unknown(source: str, problems: list[str]) -> None:
    """Raise one :class:`ConfigError` listing every problem of :func:`unknown_keys` (none: return).

    Raises:
        ConfigError: one line per unknown key, each as ``<file>: unknown key 'dotted.key' ...``.
    """
    if len(problems) == 1:
        raise ConfigError(f"{source}: {problems[0]}")
    if problems:
        listed = "\n".join(f"  {source}: {problem}" for problem in problems)
        raise ConfigError(f"{source}: {len(problems)} unknown keys:\n{listed}")


def unknown_keys(cls: type[DataclassInstance], data: Any, path: str = "") -> list[str]:
    """Every key of ``data`` that ``cls`` does not declare, nested sections included, as
    "unknown key 'dotted.path'" plus a "did you mean" hint where a known key is close (else the
    known keys of that section). Values of the wrong shape are left to :func:`build` to report."""
    if not isinstance(data, Mapping):
        return []
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    problems = []
    for key, value in data.items():
        dotted = _join(path, key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known keys: {', '.join(sorted(fields))}"
            problems.append(f"unknown key '{dotted}'{hint}")
            continue
        problems += _unknown_below(hints[key], value, dotted)
    return problems


def _unknown_below(tp: Any, value: Any, path: str) -> list[str]:
    """The unknown keys inside one value of type ``tp`` (a section, or a mapping or list of them)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _unknown_below(inner[0], value, path) if len(inner) == 1 and value is not None else []
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return unknown_keys(tp, value, path)
    if origin is dict and isinstance(value, Mapping):
        return [p for k, v in value.items() for p in _unknown_below(args[1], v, _join(path, k))]
    if origin in (list, tuple) and isinstance(value, (list, tuple)) and args:
        return [p for i, v in enumerate(value) for p in _unknown_below(args[0], v, f"{path}[{i}]")]
    return []


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _convert(tp: Any, value: Any, source: str, path: str) -> Any:
    if tp is Any:  # validated by the section's own loader (e.g. an optimizer's parameters)
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, source, path)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return build(tp, value, source, path)
    if origin is dict:
        key_tp, val_tp = args
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: '{path}' must be a mapping, got {type(value).__name__}")
        return {
            _convert(key_tp, k, source, path): _convert(val_tp, v, source, _join(path, k)) for k, v in value.items()
        }
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{path}' must be a list, got {type(value).__name__}")
        item_tp = args[0]
        items = [_convert(item_tp, v, source, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _convert_enum(tp, value, source, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{path}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: '{path}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads 1e-3 (no dot) as a string; accept what is plainly a number.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{path}' must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{source}: '{path}' must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: '{path}' must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config field type {tp!r} at {path}")


def _convert_enum(tp: type[enum.Enum], value: Any, source: str, path: str) -> enum.Enum:
    """The member of ``tp`` that ``value`` (a string) names; the enum's own ``_missing_`` may
    accept other spellings (e.g. PERSIA's ``Train``)."""
    if isinstance(value, str):
        try:
            return tp(value)
        except ValueError:
            pass
    allowed = ", ".join(repr(member.value) for member in tp)
    raise ConfigError(f"{source}: '{path}' must be one of {allowed}, got {value!r}")


def _shown(value: Any) -> str:
    """A default as ``ctrserve config-reference`` prints it: an enum member as its YAML value."""
    return repr(value.value if isinstance(value, enum.Enum) else value)


def describe(cls: type[DataclassInstance], prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, documentation) for every field of ``cls``, nested ones included."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = _join(prefix, f.name)
        tp = hints[f.name]
        doc = f.metadata.get("doc", "")
        if f.metadata.get("no_effect"):
            doc = f"{doc}. No effect here: {f.metadata['no_effect']}"
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            rows.append((key, "(section)", doc))
            rows.extend(describe(tp, key))
            continue
        if f.default is not dataclasses.MISSING:
            default = _shown(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = _shown(f.default_factory())
        else:
            default = "(required)"
        rows.append((key, default, doc))
    return rows
