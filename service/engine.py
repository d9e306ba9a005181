"""The forward of one batch: resident sets -> prompt bank + per-row slot index -> ``lpt.forward`` -> probabilities.

Plain model code with no queue and no futures; the batch loop that calls it is ``worker.py``.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from lpt.backbone import Backbone
from lpt.forward import PromptBank, prompted_forward
from service.resident import ResidentSet

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Engine:
    """Runs mixed-task batches through the frozen backbone.

    Args:
        backbone: the frozen ViT (already on ``device``).
        device: where the forward runs.
        dtype: compute dtype; bf16/fp16 run under autocast.
    """

    def __init__(self, backbone: Backbone, device: torch.device | str, dtype: torch.dtype):
        self.backbone = backbone
        self.device = torch.device(device)
        self.dtype = dtype

    def infer(self, images: torch.Tensor, entries: list[ResidentSet]) -> list[torch.Tensor]:
        """Probabilities for each row; rows of different geometry (L, S) run as separate forwards.

        Args:
            images: ``[B, 3, H, W]`` preprocessed images (any device).
            entries: the resident prompt set of each row.
        """
        out: list[torch.Tensor | None] = [None] * len(entries)
        by_geometry: dict[tuple[int, int], list[int]] = defaultdict(list)
        for row, entry in enumerate(entries):
            by_geometry[entry.geometry].append(row)
        images = images.to(self.device, non_blocking=True)
        for rows in by_geometry.values():
            sub = images if len(rows) == len(entries) else images[torch.tensor(rows, device=self.device)]
            probs = self._forward(sub, [entries[r] for r in rows]).float().cpu()
            for i, row in enumerate(rows):
                out[row] = probs[i, : entries[row].prompt_set.num_classes]
        return out  # type: ignore[return-value]

    def _forward(self, images: torch.Tensor, entries: list[ResidentSet]) -> torch.Tensor:
        distinct = list({e.key: e for e in entries}.values())  # one slot per prompt set, in first-seen order
        slot_of = {e.key: i for i, e in enumerate(distinct)}
        if len(distinct) == 1:
            bank = distinct[0].bank  # views over the resident tensors: nothing to copy
        else:
            bank = PromptBank.stack(
                [e.prompt_set for e in distinct], self.device, self.dtype, [e.shared_kv for e in distinct]
            )
        slots = torch.tensor([slot_of[e.key] for e in entries], device=self.device)
        with torch.inference_mode(), self._autocast():
            out = prompted_forward(self.backbone.model, images, bank, slots)
            return out.logits.float().softmax(dim=-1)

    def _autocast(self):
        if self.dtype == torch.float32:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.dtype)
