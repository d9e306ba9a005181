"""Every benchmark's options come from its config dataclass: every field has a flag that parses back to the
value, the parsed defaults are the dataclass defaults, and every ``python -m bench`` command in docs/ parses."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import shlex
import types
import typing
from pathlib import Path
from typing import Any, Literal

import pytest

from bench import COMMANDS
from bench.common import REPO
from bench.options import add_dataclass_args, config_parser, from_args, option, to_argv

COMMAND_IN_DOCS = re.compile(r"python -m bench ([a-z_-]+)([^`\"\n#|)]*)")


def documented_commands() -> list[tuple[str, str]]:
    """(command, options) of every ``python -m bench`` line in docs/ (backslash continuations joined)."""
    found = set()
    for path in sorted((REPO / "docs").rglob("*")):
        if path.suffix in (".md", ".json"):
            text = re.sub(r"\\\n\s*", " ", path.read_text())
            found.update((m.group(1), m.group(2).strip()) for m in COMMAND_IN_DOCS.finditer(text))
    return sorted(found)


def parse(command: str, argv: list[str]) -> Any:
    """The config that ``python -m bench <command> <argv>`` runs with."""
    return importlib.import_module(COMMANDS[command][0]).parse_args(argv)[0]


def other_value(value: Any, annotation: Any, choices: typing.Sequence[Any] | None) -> Any:
    """A value of the field's type that differs from ``value`` where the type allows (a valid one)."""
    if isinstance(annotation, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if choices:
        return next(c for c in choices if c != value)
    if typing.get_origin(annotation) in (tuple, list):
        item = typing.get_args(annotation)[0]
        return (*value, value[-1]) if value else (item(1),)
    others = {bool: lambda v: not v, int: lambda v: (v or 0) + 1, float: lambda v: (v or 0.0) + 0.5}
    others |= {str: lambda v: (v or "") + "x", Path: lambda _v: Path("/tmp/elsewhere")}
    return others[annotation](value)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_defaults_are_the_dataclass_defaults_and_every_field_parses_back(command: str) -> None:
    cfg = parse(command, [])
    cls = type(cfg)
    assert dataclasses.is_dataclass(cls) and cfg == cls()
    parser = config_parser(cls, "prog", None)
    flags = {a.dest: a.option_strings for a in parser._actions}
    assert all(flags.get(f.name) for f in dataclasses.fields(cls)), "a field without a flag"

    hints = typing.get_type_hints(cls)
    changed = cls(
        **{
            f.name: other_value(getattr(cfg, f.name), hints[f.name], f.metadata.get("choices"))
            for f in dataclasses.fields(cls)
        }
    )
    assert changed != cfg
    assert parse(command, to_argv(changed)) == changed


@pytest.mark.parametrize(("command", "options"), documented_commands())
def test_every_documented_command_parses(command: str, options: str) -> None:
    parse(command, shlex.split(options))


def test_documented_flags_keep_their_names_and_meaning() -> None:
    assert len(documented_commands()) > 20  # the docs are found at all
    engine = parse("engine", ["--batch-sizes", "8, 16,32", "--host-memory-retain-bytes", "0", "--clock", "cpu"])
    assert engine.batch_sizes == (8, 16, 32) and engine.host_memory_retain == 0 and engine.clock == "cpu"
    http = parse("http", ["--duration", "8", "--warmup", "2", "--half-load", "3", "--scenarios", "zipf"])
    assert (http.duration_s, http.warmup_s, http.half_load_s, http.scenarios) == (8.0, 2.0, 3.0, ("zipf",))
    assert parse("loading", ["--no-http", "--stores", "embedded"]).http is False
    assert parse("memory", ["--budgets", "0.5,2"]).budgets_gib == (0.5, 2.0)
    photos = parse("photos", ["--agreement", "--side-factors", "2,1,2", "--kinds", "12MP"])
    assert photos.agreement and photos.side_factors == (1, 2) and photos.kinds == ("12MP",)
    assert parse("accuracy", ["--la-scales", "5,10"]).la_scales == (5.0, 10.0)


@pytest.mark.parametrize(
    ("command", "argv"),
    [
        ("engine", ["--batch-sizes", "8,x"]),  # not an int
        ("engine", ["--dtype", "float64"]),  # not a compute dtype
        ("engine", ["--repeats", "0"]),  # the config refuses it
        ("photos", ["--kinds", "40MP"]),
        ("scaling", ["--tasks", "10", "--tasks-per-batch", "1,64"]),
        ("memory", ["--sets", "1"]),
        ("http", ["--no-such-flag", "1"]),
    ],
)
def test_bad_values_are_usage_errors(command: str, argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(command, argv)
    assert exc.value.code == 2 and "error:" in capsys.readouterr().err


@dataclasses.dataclass
class Every:
    flag_on: bool = option(True, help="on unless --no-flag-on")
    maybe: int | None = option(None)
    sizes: tuple[int, ...] = option((8, 16))
    mode: Literal["a", "b"] = option("a")
    where: Path = option(Path("/x"), flag="--place")  # noqa: RUF009


def test_option_kinds_come_from_the_annotations(capsys) -> None:
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, Every)
    assert from_args(Every, parser.parse_args([])) == Every()
    got = from_args(Every, parser.parse_args(["--no-flag-on", "--maybe", "3", "--sizes", "1,2", "--mode", "b"]))
    assert got == Every(flag_on=False, maybe=3, sizes=(1, 2), mode="b")
    assert from_args(Every, parser.parse_args(["--place", "/y"])).where == Path("/y")
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "c"])
    parser.print_help()
    assert "(default: 8,16)" in capsys.readouterr().out

    @dataclasses.dataclass
    class Nested:
        grid: tuple[tuple[int, ...], ...] = ((1,),)

    with pytest.raises(TypeError, match="no option type"):
        add_dataclass_args(argparse.ArgumentParser(), Nested)
