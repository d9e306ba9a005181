"""Resumable training checkpoints: prompt parameters, optimiser momentum and the loop's position.

One safetensors file: tensors ``param/<name>`` and ``momentum/<name>``, and a JSON ``state`` entry in its
metadata (phase, epochs done, history, the phase-1 evaluation, and the settings the run depends on).
Nothing is pickled and nothing of the training data is stored. Files are written to a temporary name
and renamed, so an interrupted save never leaves a torn checkpoint behind.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

FORMAT = "lpt-train-checkpoint/1"


@dataclass
class Checkpoint:
    """The loop's resumable state.

    Attributes:
        params: ``shared_prompt``, ``head_weight`` and (with a pool) ``group_prompts``, ``group_keys``.
        momentum: SGD momentum buffers of the current phase's trainable parameters, by name.
        phase: the phase in progress (1 or 2; 3 once training finished).
        epoch: epochs completed in that phase.
        state: JSON-able extras: history, phase-1 report, settings fingerprint.
    """

    params: dict[str, torch.Tensor]
    momentum: dict[str, torch.Tensor] = field(default_factory=dict)
    phase: int = 1
    epoch: int = 0
    state: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"param/{k}": v.detach().to("cpu").contiguous() for k, v in ckpt.params.items()}
    tensors.update({f"momentum/{k}": v.detach().to("cpu").contiguous() for k, v in ckpt.momentum.items()})
    state = {"phase": ckpt.phase, "epoch": ckpt.epoch, **ckpt.state}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    safetensors.torch.save_file(tensors, str(tmp), metadata={"format": FORMAT, "state": json.dumps(state)})
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by ``save_checkpoint``.

    Raises:
        ValueError: the file is not a trainer checkpoint.
    """
    with safetensors.safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not an {FORMAT} file (format={meta.get('format')!r})")
        # clone: the tensors own their memory once the file is closed
        tensors = {k: fh.get_tensor(k).clone() for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    state = json.loads(meta["state"])
    params = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("param/")}
    momentum = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("momentum/")}
    phase, epoch = int(state.pop("phase")), int(state.pop("epoch"))
    return Checkpoint(params=params, momentum=momentum, phase=phase, epoch=epoch, state=state)
