"""Building typed dataclasses from YAML data, with every problem collected.

`from_dict(cls, data)` checks each value against the field's annotation (nested dataclasses, lists,
unions with None, Literal, int/float/bool/str with YAML's quirks), names unknown keys with the
nearest valid one, runs the object's own `validate()`, and raises one `ConfigError` listing every
problem, one line each. Nothing here knows moelab's sections; `config.py` declares those.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from moelab.errors import ConfigError, UserError


def did_you_mean(name: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Check `value` against the annotation `tp`; nested dataclasses are built recursively."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _coerce(value, non_none[0], where, problems)
    if origin is Literal:
        if value in get_args(tp):
            return value
        options = [str(a) for a in get_args(tp)]
        hint = did_you_mean(str(value), options)
        problems.append(f"{where}: expected one of {', '.join(options)}, got {value!r}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping (section), got {type(value).__name__} {value!r}")
            return tp()
        return _build(tp, value, where, problems)
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {type(value).__name__} {value!r}")
            return value
        (item,) = get_args(tp) or (Any,)
        return [_coerce(v, item, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads `3e-4` (no dot) as a string
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        return value
    problems.append(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, data: dict, where: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    if hasattr(cls, "upgrade_legacy") and isinstance(data, dict):  # renamed keys in old saved configs
        data = cls.upgrade_legacy(data)
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            problems.append(f"{path}: unknown key{did_you_mean(str(key), names)}; valid keys: {', '.join(names)}")
            continue
        kwargs[key] = _coerce(value, hints[key], path, problems)
    try:
        return cls(**kwargs)
    except TypeError:  # a coercion problem already recorded; fall back to defaults
        return cls()


def from_dict(cls: type, data: dict, source: str | None = None) -> Any:
    """Build dataclass `cls` from nested dicts; raise ConfigError listing every problem."""
    problems: list[str] = []
    obj = _build(cls, data or {}, "", problems)
    if hasattr(obj, "validate"):
        try:
            problems += [p for p in obj.validate() if p not in problems]
        except (TypeError, ValueError):  # a value of the wrong type, already reported
            pass
    if problems:
        raise ConfigError(problems, source)
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (['a', 'b'], c), the value parsed as YAML (so 2, 0.1, true, null, [1,2] work)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError([f"--set {text!r}: expected key=value, e.g. moe.top_k=2"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not valid YAML ({first})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data
