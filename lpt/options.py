"""Command-line options from typed fields: the pieces every generated parser shares (service, trainer, bench).

Each command declares its settings once, as typed dataclass (or pydantic) fields with their help; its parser is
generated from them. What the generators share is here: reading ``X | None``, a field's default, and the argparse
arguments of a scalar annotation. How sequences are written stays each command's contract (the trainer takes
``--size 3 112 112``, the benchmarks ``--batch-sizes 8,16,32``).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

SCALARS = (int, float, str, Path)


def flag_name(name: str) -> str:
    """The flag of a setting or option (``batch_size`` -> ``--batch-size``)."""
    return f"--{name.replace('_', '-')}"


def without_none(annotation: Any) -> tuple[Any, bool]:
    """``X | None`` -> ``(X, True)``; any other annotation -> ``(it, False)``.

    Raises:
        TypeError: a union of several types besides None (no single flag type fits it).
    """
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"no flag type for the union {annotation!r}")
        return rest[0], True
    return annotation, False


def scalar_kind(annotation: Any) -> dict[str, Any] | None:
    """argparse's ``action``, ``type`` or ``choices`` for a bool, a ``Literal`` or an int, float, str or Path
    annotation (``X | None`` reads as ``X``); None for anything else (sequences: the caller's syntax)."""
    annotation, _ = without_none(annotation)
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        return {"choices": choices, "type": type(choices[0])}
    if annotation in SCALARS:
        return {"type": annotation}
    return None


def field_default(f: dataclasses.Field) -> Any:
    """A dataclass field's default value (its factory called when it has one)."""
    return f.default_factory() if f.default is dataclasses.MISSING else f.default
