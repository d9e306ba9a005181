"""The phase's prompt tensors as trainable parameters, run through the forward the service runs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lpt.forward import PromptBank, cosine_logits, prompted_forward


class PromptModule(nn.Module):
    """The phase's trainable prompt tensors as parameters, with the frozen rest alongside.

    The backbone is held outside the module's registry on purpose: DDP then only sees (and syncs) prompt
    parameters, and ``parameters()`` can never hand a backbone weight to the optimiser.

    Args:
        backbone: the frozen ViT.
        tensors: all prompt tensors by name (``shared_prompt``, ``head_weight``, ``group_prompts``, ``group_keys``).
        trainable: names that get gradients in this phase.
        share_blocks: S.
        top_k: k.
        head_scale: s.
        head_dropout: dropout on the feature before the cosine head in training mode.
    """

    def __init__(
        self,
        backbone: nn.Module,
        tensors: dict[str, torch.Tensor],
        trainable: tuple[str, ...],
        share_blocks: int,
        top_k: int,
        head_scale: float,
        head_dropout: float = 0.0,
    ):
        super().__init__()
        object.__setattr__(self, "backbone", backbone)
        self.prompts = nn.ParameterDict({k: nn.Parameter(tensors[k].detach().clone()) for k in trainable})
        self.frozen = {k: v.detach() for k, v in tensors.items() if k not in trainable}
        self.share_blocks, self.top_k, self.head_scale = share_blocks, top_k, head_scale
        self.head_dropout = head_dropout

    def tensor(self, name: str) -> torch.Tensor | None:
        return self.prompts[name] if name in self.prompts else self.frozen.get(name)

    def bank(self, with_pool: bool) -> PromptBank:
        return PromptBank.from_tensors(
            self.tensor("shared_prompt"),
            self.tensor("head_weight"),
            self.share_blocks,
            pool=self.tensor("group_prompts") if with_pool else None,
            keys=self.tensor("group_keys") if with_pool else None,
            top_k=self.top_k,
            head_scale=self.head_scale,
        )

    def forward(self, images: torch.Tensor, with_pool: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        bank = self.bank(with_pool)
        out = prompted_forward(self.backbone, images, bank)
        if not (self.training and self.head_dropout > 0):
            return out.logits, out.key_sim
        features = F.dropout(out.features, self.head_dropout, training=True)
        slots = torch.zeros(len(images), dtype=torch.long, device=images.device)
        return cosine_logits(bank, slots, features), out.key_sim

    def all_tensors(self) -> dict[str, torch.Tensor]:
        out = {k: v.detach() for k, v in self.frozen.items()}
        out.update({k: v.detach() for k, v in self.prompts.items()})
        return out
