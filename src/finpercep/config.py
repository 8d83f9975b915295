"""Typed configs: frozen dataclasses filled from plain dicts (JSON / YAML), unknown keys are errors.

:func:`from_dict` checks every value against the dataclass's type hints before the dataclass is
built, so ``batch_size: two`` is one line naming the key, the expected type and the value, not a
``TypeError`` deep inside training. :func:`load_yaml` reads a YAML file with its syntax errors
reported by file and line; :func:`load_config` is the one YAML -> dataclass loader every command
uses (reward model, RL, policy recipes). The ``check_*`` helpers are what the configs'
``__post_init__`` use to refuse values of the right type but out of range (``learning_rate: -1``,
``channels: 200000``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# YAML 1.1 (PyYAML) reads ``1e-4`` as a string (it wants ``1.0e-4``); a float field accepts it.
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")

RENAMED_KEYS: dict[str, str] = {"lr": "learning_rate"}
"""Config keys renamed since runs were first saved (old -> new): ``lr`` read as the low-resolution
batch as often as the learning rate. :func:`from_dict` names the new key when it meets an old one;
:func:`rename_old_keys` upgrades a saved config (a run's ``config.json``) before comparing it."""


def rename_old_keys(data: Any) -> Any:
    """``data`` (a saved config in its JSON form) with every mapping key of :data:`RENAMED_KEYS`
    replaced by its new name, at any depth; other values are returned unchanged."""
    if isinstance(data, dict):
        return {RENAMED_KEYS.get(k, k): rename_old_keys(v) for k, v in data.items()}
    if isinstance(data, list):
        return [rename_old_keys(v) for v in data]
    return data


def to_dict(cfg: Any) -> dict:
    """A dataclass as plain JSON types (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data`` (its JSON / YAML form): nested dataclasses and tuples
    are rebuilt, ints are accepted where a float is expected, missing keys take the defaults.

    ``where`` names the source in error messages: ``"cfg.yaml:"`` gives ``cfg.yaml: run.steps: ...``,
    ``"RLConfig"`` gives ``RLConfig.run.steps: ...`` (default: the class name).

    Raises ValueError naming the key for an unknown key, for a value whose type does not match the
    hint (int, float, str, bool, tuples, ``X | None``, ``Literal``, nested dataclasses), and for a
    value the dataclass's own ``__post_init__`` refuses (its message after ``where``).
    """
    here = (where or cls.__name__).rstrip(":")  # this level's messages: ``cfg.yaml: ...``, ``RLConfig.run: ...``
    if not isinstance(data, dict):
        raise ValueError(f"{here}: expected a mapping of {cls.__name__} fields, got {data!r} ({type(data).__name__})")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        renamed = [f"{k} is now {RENAMED_KEYS[k]}" for k in unknown if RENAMED_KEYS.get(k) in names]
        hint = f" ({'; '.join(renamed)})" if renamed else ""
        raise ValueError(f"{here}: unknown keys {unknown}{hint}; valid: {sorted(names)}")
    kwargs = {k: _convert(hints[k], v, _at(where or cls.__name__, k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:  # from __post_init__, which names the field: add the file / section
        raise ValueError(f"{here}: {e}" if where else str(e)) from None


def _at(where: str, key: str) -> str:
    """The location of ``key`` inside ``where``: ``cfg.yaml:`` + ``run`` -> ``cfg.yaml: run``,
    ``RLConfig`` + ``run`` -> ``RLConfig.run``."""
    return f"{where} {key}" if where.endswith(":") else f"{where}.{key}"


def _convert(tp: Any, value: Any, where: str) -> Any:
    """``value`` as type ``tp`` (tuples from lists, floats from ints); ValueError when it is not one."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return from_dict(tp, value, where)
        if isinstance(value, tp):
            return value
    elif origin in (typing.Union, types.UnionType):
        return _convert_union(tp, value, where)
    elif origin is typing.Literal:
        # ``True == 1``: compare types too, so ``amp: true`` is not taken for a Literal[1]
        if any(value == a and type(value) is type(a) for a in typing.get_args(tp)):
            return value
        raise ValueError(f"{where}: expected one of {list(typing.get_args(tp))}, got {value!r}")
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            return _convert_tuple(tp, value, where)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # a type this checker does not know: passed through unchecked
        return value
    raise ValueError(f"{where}: expected {_describe(tp)}, got {value!r} ({type(value).__name__})")


def _convert_union(tp: Any, value: Any, where: str) -> Any:
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    for arg in args:
        if dataclasses.is_dataclass(arg) and isinstance(value, dict):
            return from_dict(arg, value, where)  # its own errors name the nested key
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _convert(arg, value, where)
        except ValueError:
            continue
    raise ValueError(f"{where}: expected {_describe(tp)}, got {value!r} ({type(value).__name__})")


def _convert_tuple(tp: Any, value: list | tuple, where: str) -> tuple:
    args = typing.get_args(tp)
    if not args:
        return tuple(value)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if len(args) != len(value):
        raise ValueError(f"{where}: expected {_describe(tp)}, got {len(value)} values {list(value)!r}")
    return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))


def _describe(tp: Any) -> str:
    """A type hint in words: ``int``, ``a number``, ``a list of int``, ``a number or null``."""
    origin = typing.get_origin(tp)
    if tp is float:
        return "a number"
    if tp is type(None):
        return "null"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])}"
        return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} fields"
    return getattr(tp, "__name__", str(tp))


def load_yaml(path: str | Path) -> dict:
    """The top-level mapping of the YAML file ``path`` (``yaml.safe_load``; an empty file is ``{}``).

    Raises FileNotFoundError when there is no such file, and ValueError in one line naming the
    file, line and column of a syntax error, or when the file is not text or its top level is not
    a mapping.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config {p} not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{p}: not a text file; pass a YAML config") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(p)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{at}: not valid YAML ({problem}); fix the syntax there") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping of config keys at the top level, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path | None = None, **overrides: Any) -> T:
    """Dataclass ``cls`` from the YAML file ``path`` (``None``: the defaults), then ``overrides``
    (:func:`override`: ``None`` values are skipped, so command-line flags left unset keep the
    file's values; a dict fills a nested config, e.g. ``run={"steps": 3}``).

    Raises FileNotFoundError for a missing file and ValueError in one line, naming the file and
    key, for a YAML syntax error, an unknown key, a value of the wrong type or out of range.
    """
    data = load_yaml(path) if path is not None else {}
    cfg = from_dict(cls, data, where=f"{path}:" if path is not None else cls.__name__)
    return override(cfg, overrides)


def override(cfg: T, values: dict[str, Any]) -> T:
    """``cfg`` (a frozen dataclass) with ``values`` replaced: ``None`` values are skipped, a dict
    for a nested dataclass field overrides inside it. The dataclasses' ``__post_init__`` checks
    run again (ValueError for a value out of range); an unknown name is a TypeError."""
    changes = {}
    for name, value in values.items():
        if value is None:
            continue
        current = getattr(cfg, name, None)  # an unknown name: dataclasses.replace raises
        if isinstance(value, dict) and dataclasses.is_dataclass(current):
            value = override(current, value)
        changes[name] = value
    return dataclasses.replace(cfg, **changes) if changes else cfg


# ---------------------------------------------------------------------------------------------
# Value checks for __post_init__


def check_at_least(where: str, minimum: float, **values: float) -> None:
    """Raise ValueError ``where.name must be >= minimum`` for the first value that is not a finite
    number ``>= minimum`` (e.g. ``check_at_least("run", 1, steps=self.steps)``)."""
    for name, v in values.items():
        if not (_finite(v) and v >= minimum):
            raise ValueError(f"{where}.{name} must be >= {minimum}, got {v!r}")


def check_positive(where: str, **values: float) -> None:
    """Raise ValueError ``where.name must be > 0`` for the first value that is not a finite number > 0
    (learning rates, temperatures, standard deviations)."""
    for name, v in values.items():
        if not (_finite(v) and v > 0):
            raise ValueError(f"{where}.{name} must be a finite number > 0, got {v!r}")


def check_between(where: str, low: float, high: float, **values: float) -> None:
    """Raise ValueError ``where.name must be in [low, high]`` for the first value that is not a
    finite number in that range (probabilities; architecture sizes, bounded so that a damaged
    ``config.json`` cannot ask for terabytes before anything is allocated)."""
    for name, v in values.items():
        if not (_finite(v) and low <= v <= high):
            raise ValueError(f"{where}.{name} must be in [{low}, {high}], got {v!r}")


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
