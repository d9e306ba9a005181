"""The forward of one batch: resident sets -> prompt bank + per-row slot index -> ``lpt.forward`` -> probabilities.

Plain model code with no queue and no futures; the batch loop that calls it is ``worker.py``.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from lpt.backbone import Backbone
from lpt.forward import PromptBank, autocast, prompted_forward
from lpt.init import init_prompt_set
from service.resident import ResidentSet


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
        """Probabilities ``softmax(logits / T)`` for each row, with T its set's temperature (1 for a set without
        one); rows of different geometry (L, S) run as separate forwards.

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
        bank = batch_bank(distinct, self.device, self.dtype)
        slots = torch.tensor([slot_of[e.key] for e in entries], device=self.device)
        # Each set's calibrated temperature: scores are softmax(logits / T); T = 1 (no temperature) divides exactly.
        temperature = torch.tensor([e.prompt_set.score_temperature for e in distinct], device=self.device)
        with torch.inference_mode(), autocast(self.device, self.dtype):
            out = prompted_forward(self.backbone.model, images, bank, slots)
            return (out.logits.float() / temperature[slots][:, None]).softmax(dim=-1)

    def warm_up(self) -> None:
        """One mixed two-task forward (with and without a group-prompt pool), so the first request pays no lazy
        initialisation (kernel selection, allocator growth)."""
        info = self.backbone.info
        sets = [
            init_prompt_set(info, ["a", "b"], prompt_length=2, pool_size=p, share_blocks=info.depth // 2, seed=i)
            for i, p in enumerate((2, 0))
        ]
        bank = PromptBank.stack(sets, device=self.device, dtype=self.dtype)
        images = torch.zeros(2, *info.input_size, device=self.device)
        with torch.inference_mode(), autocast(self.device, self.dtype):
            prompted_forward(self.backbone.model, images, bank, torch.tensor([0, 1], device=self.device))


def batch_bank(distinct: list[ResidentSet], device: torch.device, dtype: torch.dtype) -> PromptBank:
    """The bank of a batch's distinct resident sets, slot ``i`` for ``distinct[i]``.

    One set uses its own bank (views over the resident tensors: nothing is copied); several are stacked with the
    shared-prompt keys/values they keep resident, so no batch recomputes them.

    Args:
        distinct: the resident set of each slot, in slot order (the engine passes each of a batch's sets once).
        device: where the forward runs.
        dtype: the compute dtype.
    """
    if len(distinct) == 1:
        return distinct[0].bank
    return PromptBank.stack([e.prompt_set for e in distinct], device, dtype, [e.shared_kv for e in distinct])
