"""The linear-probe baseline: a linear classifier on frozen, un-prompted backbone features.

Used by the accuracy ablation and the learning test as the bar LPT has to clear. Features come from the
backbone's own eval transform (no augmentation); the classifier is multinomial logistic regression with
a small L2 penalty, fitted full-batch with L-BFGS on the (long-tailed, instance-balanced) training set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lpt.backbone import Backbone
from lpt.forward import embed, pool_features
from trainer.data import ImageDataset
from trainer.evaluate import EvalCounts


@torch.no_grad()  # not inference_mode: the probe's autograd uses these features
def extract_features(
    backbone: Backbone, dataset: ImageDataset, device: torch.device | str = "cpu", batch_size: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final-norm class-token features ``[N, D]`` and targets ``[N]`` of the plain (prompt-free) backbone.

    Args:
        backbone: frozen backbone.
        dataset: images; its transform is set to the backbone's eval transform.
        device: where the forward runs.
        batch_size: images per forward.
    """
    dataset.transform = backbone.eval_transform
    model = backbone.model.to(device)
    feats, targets = [], []
    for images, target in DataLoader(dataset, batch_size=batch_size):
        feats.append(pool_features(model, _blocks(model, images.to(device))).float().cpu())
        targets.append(target)
    return torch.cat(feats), torch.cat(targets)


def _blocks(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    # the prompt-free forward up to the final norm, with the same embedding as the prompted forward
    return model.blocks(embed(model, images))


def fit_linear_probe(
    features: torch.Tensor, targets: torch.Tensor, num_classes: int, weight_decay: float = 1e-4, steps: int = 300
) -> torch.nn.Linear:
    """Multinomial logistic regression on standardised features (L-BFGS, full batch).

    Args:
        features: ``[N, D]`` training features.
        targets: ``[N]`` class indices.
        num_classes: C.
        weight_decay: L2 penalty on the weights.
        steps: L-BFGS iterations.
    """
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    x = (features - mean) / std
    linear = torch.nn.Linear(x.shape[1], num_classes)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    opt = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(linear(x), targets) + weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    # fold the standardisation into the layer, so it applies to raw features
    with torch.no_grad():
        linear.weight.div_(std)
        linear.bias.sub_(linear.weight @ mean)
    return linear


LA_PROBE_SCALE = 16.0  # chosen on the default CIFAR-10-LT split among 5-30 (docs/accuracy.md)


class CosineProbe(torch.nn.Module):
    """``scale * cos(feature - center, w_c)``: the probe form of LPT's own cosine head."""

    def __init__(self, center: torch.Tensor, weight: torch.Tensor, scale: float):
        super().__init__()
        self.register_buffer("center", center)
        self.weight = torch.nn.Parameter(weight)
        self.scale = scale

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        f = F.normalize(features - self.center, dim=1)
        return self.scale * f @ F.normalize(self.weight, dim=1).t()


def fit_logit_adjusted_probe(
    features: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    scale: float = LA_PROBE_SCALE,
    steps: int = 300,
) -> CosineProbe:
    """The long-tail baseline: a cosine classifier trained with the logit-adjusted loss (Menon et al. 2021).

    Training minimises cross-entropy on ``s * cos(f - mu, w_c) + log prior_c`` (prior: the training class
    frequencies), so the classifier itself learns no preference for frequent classes; prediction uses the
    cosine logits alone. Features are centred at the mean of the class means; ``s`` is fixed (learnt, it grows
    until the training set is fitted and the prior no longer matters). Full batch L-BFGS on the same frozen
    features as the plain probe.

    Args:
        features: ``[N, D]`` training features.
        targets: ``[N]`` class indices.
        num_classes: C.
        scale: s.
        steps: L-BFGS iterations.
    """
    counts = torch.bincount(targets, minlength=num_classes).double()
    log_prior = (counts.clamp_min(1) / counts.sum()).log().float()
    sums = torch.zeros(num_classes, features.shape[1]).index_add_(0, targets, features.float())
    means = sums / counts.clamp_min(1)[:, None].float()
    center = means[counts > 0].mean(0)
    probe = CosineProbe(center, F.normalize(means - center, dim=1), scale)
    opt = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(probe(features) + log_prior, targets)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return probe


def probe_counts(
    linear: torch.nn.Module, features: torch.Tensor, targets: torch.Tensor, num_classes: int
) -> EvalCounts:
    """Per-class top-1 counts of a fitted probe on ``features``."""
    with torch.no_grad():
        pred = linear(features).argmax(1)
    total = torch.bincount(targets, minlength=num_classes)
    correct = torch.bincount(targets[pred == targets], minlength=num_classes)
    return EvalCounts(correct=correct, total=total, predictions=pred.tolist(), targets=targets.tolist())
