"""``lpt-train``'s flags and ``--config`` keys come from ``TrainConfig``: every field has both, with its help."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import sys
import typing
from pathlib import Path
from typing import Literal

import pytest
import yaml

from lpt.options import without_none
from tests.support.trainer_cli import setting_args
from trainer import cli, options
from trainer.config import TrainConfig
from trainer.evaluate import plot_report

REPO = Path(__file__).resolve().parents[2]
FIELDS = dataclasses.fields(TrainConfig)
REQUIRED_ARGV = [
    *("--train", "synthetic:2:4:1", "--val", "synthetic:2:2:1", "--backbone", "test_vit"),
    *("--backbone-weights", "random:0", "--out", "ps.safetensors", "--report", "r.json"),
]
# Loss, sampler and schedule settings, each set to a value other than its default.
LOSS_SAMPLER_SCHEDULE = {
    "margin": 0.25,
    "ib_weight": 0.75,
    "sim_weight": 0.125,
    "noise_mul": 0.3,
    "label_smoothing": 0.05,
    "images_per_class": 2,
    "warmup_lr": 0.001,
}


def parse(*argv: str) -> TrainConfig:
    return cli.train_config(cli.parse_args([*REQUIRED_ARGV, *argv]))


def write_config(tmp_path: Path, values: dict, suffix: str = ".yaml") -> str:
    path = tmp_path / f"cfg{suffix}"
    path.write_text(yaml.safe_dump(values) if suffix == ".yaml" else json.dumps(values))
    return str(path)


def other_value(f: dataclasses.Field) -> object:
    """A valid value of the field that differs from its default."""
    kind, _ = without_none(options.FIELD_TYPES[f.name])
    default = f.default
    if kind is bool:
        return not default
    if typing.get_origin(kind) is Literal:
        return next(c for c in typing.get_args(kind) if c != default)
    if kind is int:
        return (default or 0) + 3
    if kind is float:
        return (default or 0.0) + 0.5
    raise AssertionError(f"no test value for TrainConfig.{f.name}: {kind!r}")


def test_defaults_of_the_parsed_config_are_train_configs():
    assert parse() == TrainConfig()


@pytest.mark.parametrize("f", FIELDS, ids=lambda f: f.name)
def test_every_field_is_a_flag(f):
    value = other_value(f)
    assert getattr(parse(*setting_args({f.name: value})), f.name) == value


@pytest.mark.parametrize("f", FIELDS, ids=lambda f: f.name)
def test_every_field_is_a_config_key(f, tmp_path):
    value = other_value(f)
    key = f.name.replace("_", "-")  # the documented spelling; underscores are tested below
    cfg = parse("--config", write_config(tmp_path, {key: value}))
    assert getattr(cfg, f.name) == value
    assert dataclasses.replace(cfg, **{f.name: f.default}) == TrainConfig()  # nothing else moved


def test_loss_sampler_and_schedule_settings_round_trip_as_flags_and_config_keys(tmp_path):
    argv = setting_args(LOSS_SAMPLER_SCHEDULE)
    from_flags = parse(*argv)
    from_json = parse("--config", write_config(tmp_path, LOSS_SAMPLER_SCHEDULE, ".json"))
    for cfg in (from_flags, from_json):
        assert {name: getattr(cfg, name) for name in LOSS_SAMPLER_SCHEDULE} == LOSS_SAMPLER_SCHEDULE


def test_flag_beats_config_beats_default(tmp_path):
    path = write_config(tmp_path, {"margin": 0.3, "label-smoothing": 0.2, "amp": False})
    cfg = parse("--config", path, "--margin", "0.4", "--amp")
    assert (cfg.margin, cfg.label_smoothing, cfg.amp, cfg.noise_mul) == (0.4, 0.2, True, TrainConfig().noise_mul)


def test_config_sets_the_runs_own_options_and_no_x_keys(tmp_path):
    path = write_config(tmp_path, {"no-progress": True, "no_amp": False, "plot": "p.png", "data-format": "synthetic"})
    args = cli.parse_args([*REQUIRED_ARGV, "--config", path])
    assert (args.progress, args.amp, args.plot, args.data_format) == (False, True, "p.png", "synthetic")


def test_unknown_config_key_is_an_error_that_names_it(tmp_path, capsys):
    path = write_config(tmp_path, {"margin": 0.2, "marginn": 0.3, "no-device": True})
    with pytest.raises(SystemExit):
        parse("--config", path)
    err = capsys.readouterr().err
    assert "unknown keys: marginn, no-device" in err and path in err


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"epochs1": "ten"}, "epochs1: expected int, got 'ten'"),
        ({"amp": "maybe"}, "amp: expected true or false, got 'maybe'"),
        ({"prompt-init": "zeros"}, "prompt-init: expected one of data, normal, vpt, got 'zeros'"),
        ({"margin": None}, "margin: expected a value, got null"),
        ({"seed": True}, "seed: expected int, got True"),
        ({"amp": False, "no-amp": False}, "no-amp: amp is set twice"),
    ],
)
def test_config_value_of_the_wrong_type_is_an_error_that_names_the_key(tmp_path, capsys, values, message):
    with pytest.raises(SystemExit):
        parse("--config", write_config(tmp_path, values))
    assert message in capsys.readouterr().err


def test_config_values_are_typed(tmp_path):
    cfg = parse("--config", write_config(tmp_path, {"lr": None, "epochs1": "3", "warmup-lr": 1, "amp": "off"}))
    assert (cfg.lr, cfg.epochs1, cfg.warmup_lr, cfg.amp) == (None, 3, 1.0, False)
    assert isinstance(cfg.warmup_lr, float)


def test_flag_choices_come_from_the_literal(capsys):
    with pytest.raises(SystemExit):
        parse("--head-init", "zeros")
    assert "invalid choice: 'zeros'" in capsys.readouterr().err


def test_help_shows_every_fields_help_and_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag, so no help text is wrapped
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    entries = [" ".join(entry.split()) for entry in re.split(r"\n  (?=-)", out)]  # one per flag
    for f in FIELDS:
        entry = next((e for e in entries if re.match(cli.flag_name(f.name) + "[ ,]", e)), "")
        assert f.metadata["help"] in entry, f"--help lacks {f.name}'s help"
        assert "(default: " in entry
    assert "(default: 0.8 * B / 256)" in out and "--amp, --no-amp" in out


def test_annotation_kinds():
    assert options.argparse_kind(int | None) == {"type": int}
    assert options.argparse_kind(Literal["a", "b"]) == {"choices": ("a", "b"), "type": str}
    assert options.argparse_kind(tuple[float, ...]) == {"nargs": "+", "type": float}
    assert options.argparse_kind(tuple[int, int]) == {"nargs": 2, "type": int}
    assert options.argparse_kind(list[Path]) == {"nargs": "+", "type": Path}
    assert options.coerce(tuple[int, ...], [1, "2"]) == (1, 2)
    assert options.coerce(Path | None, "a/b") == Path("a/b")
    with pytest.raises(ValueError, match="a list of 2 values"):
        options.coerce(tuple[int, int], [1, 2, 3])
    with pytest.raises(TypeError):
        options.argparse_kind(dict[str, int])


def test_field_without_help_is_refused(monkeypatch):
    @dataclasses.dataclass
    class Undocumented:
        epochs1: int = 1

    monkeypatch.setattr(options, "TrainConfig", Undocumented)
    with pytest.raises(TypeError, match="epochs1 has no help"):
        cli.build_parser()


def test_docs_hold_the_generated_option_table():
    text = (REPO / "docs" / "trainer.md").read_text()
    start = text.index("\n", text.index("<!-- options: generated by")) + 1
    table = text[start : text.index("<!-- end of options -->")]
    assert table == cli.options_markdown(), "docs/trainer.md: paste the output of the command in its comment"
    for f in FIELDS:
        assert f"`{cli.flag_name(f.name)}" in table


def test_missing_matplotlib_is_named_before_training(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what a serving-only install looks like to imports
    with pytest.raises(SystemExit):
        cli.parse_args([*REQUIRED_ARGV, "--plot", "p.png"])
    assert "--plot needs matplotlib: pip install 'lpt-serve[train]'" in capsys.readouterr().err
    cli.parse_args(REQUIRED_ARGV)  # no --plot: matplotlib is not needed
    with pytest.raises(ModuleNotFoundError, match=r"plotting needs matplotlib: pip install 'lpt-serve\[train\]'"):
        plot_report({}, "p.png")


def test_missing_tqdm_is_named_unless_progress_is_off(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    with pytest.raises(SystemExit):
        cli.parse_args(REQUIRED_ARGV)
    assert "progress bars (--no-progress turns them off) needs tqdm" in capsys.readouterr().err
    assert cli.parse_args([*REQUIRED_ARGV, "--no-progress"]).progress is False


@pytest.mark.parametrize("package", ["service", "lpt", "prompts_store"])
def test_serving_code_imports_no_train_extra(package):
    for path in (REPO / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not [n for n in names if n.split(".")[0] in ("matplotlib", "tqdm")], path
