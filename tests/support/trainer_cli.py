"""``lpt-train`` command lines: settings by ``TrainConfig`` field name, and a short run on the suite's backbone."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from lpt.options import flag_name
from tests.support.lpt_serve import TEST_BACKBONE_ARGS

# Both phases, one epoch each, with short prompts: the shortest run through the whole trainer.
ONE_EPOCH_EACH: dict[str, object] = {
    "epochs1": 1,
    "epochs2": 1,
    "prompt_length": 2,
    "share_blocks": 2,
    "progress": False,
}


def setting_args(settings: Mapping[str, object]) -> list[str]:
    """The flags of ``TrainConfig`` settings given by field name (a bool is ``--name`` or ``--no-name``)."""
    args: list[str] = []
    for name, value in settings.items():
        if isinstance(value, bool):
            args.append(flag_name(name if value else f"no_{name}"))
        else:
            args += [flag_name(name), str(value)]
    return args


def train_argv(train: str | Path, val: str | Path, out: Path, report: Path, **settings: object) -> list[str]:
    """A short ``lpt-train`` run: the data, the suite's backbone on the CPU, the outputs, then ``ONE_EPOCH_EACH``
    with ``settings`` over it (a flag given twice takes its last value, so ``img_size`` can differ too)."""
    return [
        *("--train", str(train), "--val", str(val), *TEST_BACKBONE_ARGS),
        *("--out", str(out), "--report", str(report)),
        *setting_args({**ONE_EPOCH_EACH, **settings}),
    ]
