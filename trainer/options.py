"""Every ``TrainConfig`` field as an ``lpt-train`` flag and a ``--config`` key, generated from the field.

The type comes from the annotation, the help and default from the field (``trainer.config.setting``), so a new
field is a new flag with nothing else to write. ``--config`` values (JSON or YAML) are checked against the same
types, with the key named in every refusal.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, Literal

from lpt.options import field_default, flag_name, scalar_kind, without_none
from trainer.config import TrainConfig

# Each setting's resolved annotation (config.py postpones annotations, so the fields hold strings).
FIELD_TYPES: dict[str, Any] = typing.get_type_hints(TrainConfig)


def add_field_flags(group: argparse._ArgumentGroup) -> None:
    """One flag per ``TrainConfig`` field: type from the annotation, help and default from the field."""
    for f in dataclasses.fields(TrainConfig):
        if "help" not in f.metadata:
            raise TypeError(f"TrainConfig.{f.name} has no help: declare it with trainer.config.setting")
        # The defaults go in through set_defaults below: BooleanOptionalAction given a default appends its own
        # "(default: True)" to the help.
        group.add_argument(flag_name(f.name), dest=f.name, help=_field_help(f), **argparse_kind(FIELD_TYPES[f.name]))
    group.set_defaults(**{f.name: field_default(f) for f in dataclasses.fields(TrainConfig)})


def _field_help(f: dataclasses.Field) -> str:
    default = field_default(f)
    if default is None:
        shown = f.metadata.get("unset") or "unset"
    elif isinstance(default, bool):
        shown = "on" if default else "off"
    elif isinstance(default, tuple | list):
        shown = " ".join(str(v) for v in default)
    else:
        shown = str(default)
    # argparse treats '%' in help as a format directive.
    return f"{f.metadata['help']} (default: {shown})".replace("%", "%%")


def _sequence_items(annotation: Any) -> tuple[Any, int | None]:
    """The item type of ``tuple[X, ...]``, ``tuple[X, X]`` or ``list[X]``, and the fixed length if there is one."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is list or args[-1] is Ellipsis:
        return args[0], None
    if len(set(args)) != 1:
        raise TypeError(f"no flag type for the mixed tuple {annotation!r}")
    return args[0], len(args)


def argparse_kind(annotation: Any) -> dict[str, Any]:
    """argparse's action, type, choices and nargs for a field's annotation (``X | None`` is treated as ``X``).

    Args:
        annotation: a resolved annotation: bool, int, float, str, Path, a ``Literal``, or a tuple or list of
            one of those.
    """
    annotation, _ = without_none(annotation)
    if typing.get_origin(annotation) in (tuple, list):
        item, length = _sequence_items(annotation)
        if item is bool or typing.get_origin(item) in (tuple, list):
            raise TypeError(f"no flag type for {annotation!r}")
        return {"nargs": length or "+", **argparse_kind(item)}
    kind = scalar_kind(annotation)
    if kind is None:
        raise TypeError(f"no flag type for annotation {annotation!r}")
    return kind


BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def coerce(annotation: Any, value: Any) -> Any:
    """A ``--config`` value as the field's type (YAML and JSON give bools, numbers, strings, lists, null).

    Raises:
        ValueError: the value does not fit the annotation (the message says what was expected).
    """
    annotation, optional = without_none(annotation)
    origin = typing.get_origin(annotation)
    if value is None:
        if optional:
            return None
        raise ValueError("expected a value, got null")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in BOOL_WORDS:
            return BOOL_WORDS[value.lower()]
        raise ValueError(f"expected true or false, got {value!r}")
    if origin in (tuple, list):
        item, length = _sequence_items(annotation)
        if not isinstance(value, list | tuple) or (length is not None and len(value) != length):
            raise ValueError(f"expected a list of {length or 'one or more'} values, got {value!r}")
        items = [coerce(item, v) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is Literal:
        if value not in typing.get_args(annotation):
            raise ValueError(f"expected one of {', '.join(map(str, typing.get_args(annotation)))}, got {value!r}")
        return value
    return _coerce_scalar(annotation, value)


def _coerce_scalar(annotation: Any, value: Any) -> Any:
    if isinstance(value, bool) or (annotation is not Path and isinstance(value, Path)):
        raise ValueError(f"expected {annotation.__name__}, got {value!r}")
    if annotation is int and isinstance(value, int | str):
        with contextlib.suppress(ValueError):
            return int(value)
    elif annotation is float and isinstance(value, int | float | str):
        with contextlib.suppress(ValueError):
            return float(value)
    elif annotation is str and isinstance(value, str):
        return value
    elif annotation is Path and isinstance(value, str | Path):
        return Path(value)
    raise ValueError(f"expected {annotation.__name__}, got {value!r}")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or YAML config: a mapping of option -> value, keys as written (dashes or underscores)."""
    text = Path(path).read_text()
    if str(path).endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise SystemExit(f"lpt-train: {path} must hold a mapping of option -> value")
    return {str(k): v for k, v in data.items()}


def config_defaults(parser: argparse.ArgumentParser, values: dict[str, Any]) -> dict[str, Any]:
    """A config file's values as parser defaults: settings typed and checked, ``no_X: true`` as ``X: false``.

    Raises:
        ValueError: an unknown key, or a setting's value that does not fit its type (naming the key).
    """
    options = {a.dest for a in parser._actions} - {"help", "version", "config"}
    negations = {f"no_{name}": name for name, kind in FIELD_TYPES.items() if kind is bool}
    unknown = [key for key in values if _dest(key) not in options | set(negations)]
    if unknown:
        raise ValueError(f"unknown keys: {', '.join(sorted(unknown))}")
    out: dict[str, Any] = {}
    for key, value in values.items():
        negated = _dest(key) in negations
        name = negations[_dest(key)] if negated else _dest(key)
        if name in out:
            raise ValueError(f"{key}: {name} is set twice")
        if name not in FIELD_TYPES:
            out[name] = value
            continue
        try:
            typed = coerce(FIELD_TYPES[name], value)
        except ValueError as exc:
            raise ValueError(f"{key}: {exc}") from None
        out[name] = not typed if negated else typed
    return out


def _dest(key: str) -> str:
    """The argparse dest of a config key (``batch-size`` and ``batch_size`` -> ``batch_size``)."""
    return key.replace("-", "_")
