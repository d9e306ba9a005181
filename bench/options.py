"""Command-line options of the benchmarks, generated from each benchmark's config dataclass: ``option`` declares a
field's flag and help, ``config_parser`` and ``parse_config`` turn a command line into the config, ``to_argv`` turns
it back. The option groups several benchmarks share are declared here once. A leaf: it imports no bench module.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from lpt.forward import COMPUTE_DTYPES
from lpt.options import field_default, flag_name, scalar_kind, without_none

T = TypeVar("T")
Config = TypeVar("Config")  # a benchmark's config dataclass

FLOAT32_PROBABILITY_ATOL = 1e-4
REDUCED_PROBABILITY_ATOL = 2e-2  # bf16/fp16: a row's rounding depends on the batch it shares


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str | None = None,
    flag: str | None = None,
    choices: Sequence[Any] | None = None,
    default_factory: Callable[[], Any] | None = None,
) -> Any:
    """A config dataclass field together with its command-line option (see ``add_dataclass_args``).

    Args:
        default: the field's default (sequences as tuples: a config holds no mutable defaults).
        help: the option's help (its default is appended).
        flag: the option string when it is not the field's name as ``--kebab-case``.
        choices: the allowed values (a ``Literal`` annotation gives them too).
        default_factory: computes the default instead (one that depends on the machine).
    """
    metadata = {"help": help, "flag": flag, "choices": choices}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag_of(f: dataclasses.Field) -> str:
    """The option string of a config field: ``batch_sizes`` -> ``--batch-sizes`` unless ``option(flag=...)``."""
    return f.metadata.get("flag") or flag_name(f.name)


def comma_separated(item: Callable[[str], Any], container: type = list) -> Callable[[str], Any]:
    """An argparse type reading ``8,16,32`` as a list (or tuple) of ``item``; blanks and spaces are ignored."""

    def parse(text: str) -> Any:
        return container(item(v.strip()) for v in text.split(",") if v.strip())

    parse.__name__ = f"comma-separated {getattr(item, '__name__', 'value')}"  # argparse names it in errors
    return parse


def option_kind(annotation: Any) -> dict[str, Any]:
    """argparse's ``type``, ``action`` or ``choices`` for a field annotation (``X | None`` reads as ``X``).

    Args:
        annotation: a resolved annotation: bool, int, float, str, Path, a ``Literal``, or a ``tuple[X, ...]``
            or ``list[X]`` of int, float or str (written ``8,16,32`` on the command line).

    Raises:
        TypeError: for any other annotation.
    """
    annotation, _ = without_none(annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (list, tuple) and args[0] in (int, float, str) and (origin is list or args[1:] == (Ellipsis,)):
        return {"type": comma_separated(args[0], origin), "metavar": f"{args[0].__name__.upper()},..."}
    kind = scalar_kind(annotation)
    if kind is None:
        raise TypeError(f"no option type for the annotation {annotation!r}")
    return kind


def _help(f: dataclasses.Field, default: Any) -> str | None:
    text = f.metadata.get("help")
    if isinstance(default, bool) or default is None:
        return text
    shown = ",".join(map(str, default)) if isinstance(default, list | tuple) else str(default)
    # argparse reads '%' in help as a format directive.
    return f"{text + ' ' if text else ''}(default: {shown})".replace("%", "%%")


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One option per field of the config dataclass ``cls``: flag and help from ``option``, type from the annotation.

    A bool field gets ``--name`` and ``--no-name``; tuples are comma-separated (``--batch-sizes 8,16,32``);
    ``Literal`` annotations and ``option(choices=...)`` limit the values. The parsed value lands in ``dest`` = the
    field's name, so ``from_args`` builds the config from the namespace.

    Args:
        parser: the parser to extend.
        cls: a dataclass whose fields all have defaults.
    """
    hints = typing.get_type_hints(cls)
    defaults = {}
    for f in dataclasses.fields(cls):
        kind = option_kind(hints[f.name])
        if f.metadata.get("choices") is not None:
            kind["choices"] = f.metadata["choices"]
        if "type" in kind and "choices" not in kind:
            kind.setdefault("metavar", flag_of(f)[2:].upper().replace("-", "_"))  # the flag's name, not the field's
        defaults[f.name] = field_default(f)
        parser.add_argument(flag_of(f), dest=f.name, help=_help(f, defaults[f.name]), **kind)
    # Defaults go through set_defaults: BooleanOptionalAction appends its own "(default: ...)" to the help otherwise.
    parser.set_defaults(**defaults)


def from_args(cls: type[Config], namespace: argparse.Namespace) -> Config:
    """The config dataclass ``cls`` built from a namespace parsed with ``add_dataclass_args``."""
    return cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)})


def fields_from(cls: type[T], source: Any, **overrides: Any) -> T:
    """The dataclass ``cls`` with each field that the dataclass ``source`` has a field of the same name taken from it
    (``overrides`` win; the other fields keep their defaults): a benchmark's option feeds the setting it names.

    Args:
        cls: the dataclass to build (``ServeOptions``, ``TrainConfig``).
        source: a benchmark's config.
        overrides: values that replace or add to what ``source`` gives.
    """
    given = {f.name for f in dataclasses.fields(source)}
    values = {f.name: getattr(source, f.name) for f in dataclasses.fields(cls) if f.name in given}
    return cls(**(values | overrides))


def to_argv(cfg: Any) -> list[str]:
    """The options that ``config_parser`` parses back into ``cfg`` (fields left at None are left out)."""
    argv = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, bool):
            argv.append(flag_of(f) if value else "--no-" + flag_of(f)[2:])
        elif value is not None:
            argv += [flag_of(f), ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)]
    return argv


def config_parser(cls: type, prog: str, doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's parser: one option per field of ``cls`` and ``--json`` (the report's path).

    Args:
        cls: the benchmark's config dataclass.
        prog: ``python -m bench <command>``.
        doc: the module docstring; its first paragraph is the description.
    """
    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n\n")[0])
    add_dataclass_args(parser, cls)
    parser.add_argument("--json", type=Path, default=None, help="write the full report (raw numbers included) here")
    return parser


def parse_config(
    parser: argparse.ArgumentParser, cls: type[Config], argv: list[str] | None
) -> tuple[Config, argparse.Namespace]:
    """Parse ``argv`` into (config, namespace); a config that rejects its values (``ValueError``) is a usage error.

    Args:
        parser: from ``config_parser`` (plus any options of the benchmark's own).
        cls: the config dataclass.
        argv: the options (``sys.argv[1:]`` when None).
    """
    namespace = parser.parse_args(argv)
    try:
        return from_args(cls, namespace), namespace
    except ValueError as exc:
        parser.error(str(exc))


@dataclass
class ServedBackbone:
    """The backbone of the ``lpt-serve`` a benchmark starts (its options, shared by those benchmarks)."""

    backbone: str = option("deit_tiny_patch16_224")
    weights: str = option("random:0")


@dataclass
class BackboneOptions:
    """The backbone a benchmark loads in its own process (its options, shared by those benchmarks)."""

    backbone: str = option("deit_tiny_patch16_224", help="timm ViT name")
    weights: str | None = option(None, help="hub | PATH | random:SEED (default: the shared DeiT-Tiny file if present)")


@dataclass
class ComputeOptions:
    """Where and in which dtype a benchmark computes (its options, shared by those benchmarks)."""

    device: str = option("cpu")
    dtype: str = option(
        "float32", choices=sorted(COMPUTE_DTYPES), help="the dtype sets are kept in and forwards run in (autocast)"
    )

    def probability_atol(self, given: float | None = None) -> float:
        """How far a probability computed twice may differ: ``given``, else the default for the dtype (larger in a
        reduced precision, where the batch a row shares changes the rounding)."""
        if given is not None:
            return given
        return FLOAT32_PROBABILITY_ATOL if self.dtype == "float32" else REDUCED_PROBABILITY_ATOL


@dataclass
class ProbabilityCheck:
    """The probability tolerance of a benchmark's checks before timing (served answers against the engine, mixed
    rows against each task alone); ``ComputeOptions.probability_atol`` resolves the default."""

    atol: float | None = option(
        None,
        help=f"probability tolerance (default: {FLOAT32_PROBABILITY_ATOL:g} in float32, {REDUCED_PROBABILITY_ATOL:g}"
        " under bf16/fp16, where the batch a row shares changes the rounding)",
    )


@dataclass
class ProcessThreads:
    """The torch threads of the benchmark process itself (its option, shared by the benchmarks that compute
    in-process)."""

    threads: int | None = option(None, help="torch threads of the benchmark process (default: torch's choice)")

    def set_threads(self) -> None:
        """Apply ``threads`` to this process; torch keeps its own choice when it is unset."""
        if self.threads:
            torch.set_num_threads(self.threads)
