"""Typed configs from YAML: nested frozen dataclasses built from plain mappings, with every
unknown key, wrong type and invalid value reported by its dotted path before anything runs."""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aurora_jax.errors import ConfigError

log = logging.getLogger(__name__)


def from_dict(cls, raw: Any, source: str):
    """`cls(**raw)` with nested dataclasses built the same way; `source` names the place in
    errors (a file name, then dotted keys)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of settings, got {type(raw).__name__}")
    raw = _renamed(cls, raw, source)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"{source}: unknown key {key!r}{hint}")
        kwargs[key] = _coerce(hints[key], value, f"{source}.{key}")
    try:
        return cls(**kwargs)
    except (ConfigError, ValueError) as e:
        raise ConfigError(f"{source}: {e}") from e


def _renamed(cls, raw: dict, source: str) -> dict:
    """`raw` with the keys `cls.RENAMED` (old key -> new dotted key) moved to their new place,
    each named in a deprecation warning; a setting given both ways is an error."""
    renamed: dict[str, str] = getattr(cls, "RENAMED", {})
    old = [k for k in raw if k in renamed]
    if not old:
        return raw
    raw = dict(raw)
    for key in old:
        value = raw.pop(key)
        *parents, leaf = renamed[key].split(".")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}.{p}: expected a mapping of settings")
        if isinstance(node.get(leaf), dict) and isinstance(value, dict):
            both = node[leaf].keys() & value.keys()
            if both:
                raise ConfigError(f"{source}: {key}.{sorted(both)[0]} and "
                                  f"{renamed[key]}.{sorted(both)[0]} both set; keep "
                                  f"{renamed[key]} (the key {key!r} is deprecated)")
            node[leaf] = {**value, **node[leaf]}
        elif leaf in node:
            raise ConfigError(f"{source}: {key} and {renamed[key]} both set; keep "
                              f"{renamed[key]} (the key {key!r} is deprecated)")
        else:
            node[leaf] = value
        log.warning("%s: the key %r is deprecated; use %r (same settings)", source, key,
                    renamed[key])
    return raw


def _coerce(tp, value, where: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, where)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is typing.Literal:
        if isinstance(value, bool) and {True: "on", False: "off"}[value] in args:
            value = "on" if value else "off"  # YAML 1.1 reads a bare off / on as a boolean
        if value not in args:
            near = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"{where} must be one of {list(args)}, got {value!r}{hint}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    ok = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          bool: lambda v: isinstance(v, bool), str: lambda v: isinstance(v, str)}.get(tp)
    if ok is not None and not ok(value):
        raise ConfigError(f"{where} must be {tp.__name__}, got {value!r}")
    return float(value) if tp is float else value


def load_config(cls, path: str | Path | None, overrides: Sequence[str] = ()):
    """A command's config: YAML `path` (or the defaults), then `key.sub=value` overrides."""
    raw = read_yaml(path) if path else {}
    return from_dict(cls, apply_overrides(raw, list(overrides)), str(path) if path else "config")


def read_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    return raw or {}


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`key.sub=value` strings (value parsed as YAML) applied onto a nested mapping."""
    import yaml

    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. scenario.requests=8)")
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[leaf] = yaml.safe_load(text)
    return raw
