"""A-GCL: the asymmetric Gaussian-clouded logit loss of LPT (method note, "Training").

For cosine logits ``z`` in ``[-1, 1]``:

1. per-class cloud size ``m_c = log(n_max) - log(n_c)``, normalised by ``max(m)``;
2. ``z'_j = z_j - noise_mul * |e_j| * m_j / max(m)``, ``e ~ N(0, 1/3)`` clipped to ``[-1, 1]``, new noise every step;
3. subtract the margin from the target logit and multiply by the scale ``s``;
4. asymmetric single-label loss on ``softmax(z')`` with label smoothing.

``N(0, 1/3)`` is read as the authors' code reads it, ``torch.distributions.Normal(0, 1/3)``: standard deviation 1/3.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lpt.prompt_set import DEFAULT_HEAD_SCALE

# Focusing exponents of the two branches (method note): class-balanced and instance-balanced batches.
CB_GAMMAS = (0.0, 4.0)
IB_GAMMAS = (0.5, 8.0)


def cloud_sizes(class_counts: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """``m_c / max(m)`` with ``m_c = log(n_max) - log(n_c)``: 0 for the largest class, 1 for the rarest.

    A balanced set (all ``m_c = 0``) gets zeros rather than 0/0.

    Args:
        class_counts: training images per class (every count must be >= 1).
    """
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if bool((counts < 1).any()):
        raise ValueError("every class needs at least one training image for A-GCL")
    m = counts.log().max() - counts.log()
    top = m.max()
    return (m / top if top > 0 else torch.zeros_like(m)).float()


def sample_noise(shape: torch.Size | tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
    """``e ~ N(0, 1/3)`` (standard deviation 1/3) clipped to ``[-1, 1]``, drawn on the CPU for reproducibility.

    Args:
        shape: ``[B, C]``, one draw per logit.
        generator: the trainer's noise stream (seeded per epoch so that resuming repeats the same draws).
    """
    return (torch.randn(shape, generator=generator) / 3.0).clamp_(-1.0, 1.0)


@dataclass(frozen=True)
class AGCL:
    """A-GCL for one branch.

    Args:
        class_counts: training images per class (defines the cloud sizes).
        gamma_pos: focusing exponent of the target term, ``(1 - p_t) ** gamma_pos``.
        gamma_neg: focusing exponent of the other classes, ``p_j ** gamma_neg``.
        scale: ``s``, multiplies the perturbed cosine logits.
        margin: subtracted from the target cosine logit.
        noise_mul: 0.5 in the method note.
        eps: label smoothing.
    """

    class_counts: tuple[int, ...]
    gamma_pos: float
    gamma_neg: float
    scale: float = DEFAULT_HEAD_SCALE
    margin: float = 0.1
    noise_mul: float = 0.5
    eps: float = 0.1

    def __call__(
        self,
        cosine: torch.Tensor,
        target: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Mean loss over the batch.

        Args:
            cosine: ``[B, C]`` cosine logits in ``[-1, 1]`` (the head's logits divided by its scale).
            target: ``[B]`` class indices.
            noise: ``[B, C]`` fixed ``e`` (tests); drawn fresh with ``generator`` when ``None``.
            generator: CPU generator for the noise.
        """
        cosine = cosine.float()
        if noise is None:
            noise = sample_noise(cosine.shape, generator)
        m = cloud_sizes(self.class_counts).to(cosine.device)
        z = cosine - self.noise_mul * noise.to(cosine.device).abs() * m[None, :]
        onehot = F.one_hot(target, cosine.shape[1]).to(cosine.dtype)
        z = (z - self.margin * onehot) * self.scale
        return asymmetric_single_label_loss(z, target, self.gamma_pos, self.gamma_neg, self.eps)


def asymmetric_single_label_loss(
    logits: torch.Tensor, target: torch.Tensor, gamma_pos: float, gamma_neg: float, eps: float
) -> torch.Tensor:
    """``-(t_t (1-p_t)^g+ log p_t + sum_{j!=t} t_j p_j^g- log p_j)``, batch mean; gradients flow through the weights.

    Args:
        logits: ``[B, C]`` already perturbed, margined and scaled.
        target: ``[B]`` class indices.
        gamma_pos: exponent of the target's focusing weight.
        gamma_neg: exponent of the other classes' focusing weights.
        eps: label smoothing; ``t_t = 1 - eps + eps / C``, ``t_j = eps / C``.
    """
    num_classes = logits.shape[1]
    log_p = F.log_softmax(logits, dim=1)
    is_target = F.one_hot(target, num_classes).bool()
    # 1 - p_t as -expm1(log p_t): exact when p_t rounds to 1 in float32, where (1 - p_t) ** 0.5 would have an
    # infinite derivative at 0 and turn the step into NaN.
    base = torch.where(is_target, -torch.expm1(log_p), log_p.exp())
    gamma = torch.where(is_target, torch.full_like(log_p, gamma_pos), torch.full_like(log_p, gamma_neg))
    weight = base.clamp_min(1e-30).pow(gamma)
    smoothed = torch.where(is_target, 1.0 - eps + eps / num_classes, eps / num_classes)
    return -(smoothed * weight * log_p).sum(dim=1).mean()
