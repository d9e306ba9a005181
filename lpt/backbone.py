"""Load the frozen timm ViT, fingerprint its weights, and expose its eval preprocessing.

Weights come from one of three sources (``weights`` argument):

- ``hub``: timm's pretrained tag for the model name (needs the internet or a warm HF cache);
- a local file path: ``.safetensors``, ``.pth``/``.bin`` (through timm's own loading and checkpoint
  filters, so position embeddings are resampled for other image sizes), or ``.npz`` (big_vision/JAX);
- ``random:SEED``: seeded random init, for offline demos and tests. Announced loudly.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from lpt.errors import BackboneError
from lpt.images import EvalTransform

log = logging.getLogger(__name__)

RANDOM_PREFIX = "random:"


@dataclass(frozen=True)
class BackboneInfo:
    """What a prompt set must match, and what a trainer needs to produce a compatible one."""

    name: str
    fingerprint: str
    depth: int
    embed_dim: int
    num_prefix_tokens: int
    num_patches: int
    patch_size: int
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    crop_pct: float
    weights: str
    random_weights: bool
    num_params: int
    data_config: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "depth": self.depth,
            "embed_dim": self.embed_dim,
            "num_prefix_tokens": self.num_prefix_tokens,
            "num_patches": self.num_patches,
            "patch_size": self.patch_size,
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
            "weights": self.weights,
            "random_weights": self.random_weights,
            "num_params": self.num_params,
        }


@dataclass
class Backbone:
    """A frozen ViT with its info and eval transform (PIL image -> normalised CHW float tensor)."""

    model: VisionTransformer
    info: BackboneInfo
    eval_transform: EvalTransform

    def to(self, device: torch.device | str) -> Backbone:
        self.model.to(device)
        return self


def _create(name: str, weights: str, img_size: int | None) -> VisionTransformer:
    kwargs: dict[str, Any] = {"num_classes": 0}
    if img_size is not None:
        kwargs["img_size"] = img_size
    try:
        if weights.startswith(RANDOM_PREFIX):
            seed = int(weights[len(RANDOM_PREFIX) :])
            # fork_rng keeps the caller's global RNG untouched; the seed alone decides the init.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return timm.create_model(name, pretrained=False, **kwargs)
        if weights == "hub":
            return timm.create_model(name, pretrained=True, **kwargs)
        path = Path(weights).expanduser()
        if not path.is_file():
            raise BackboneError("weights_not_found", f"weights file not found: {path}", "backbone_weights")
        if path.suffix == ".npz":
            model = timm.create_model(name, pretrained=False, **kwargs)
            model.load_pretrained(str(path))
            return model
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
    except BackboneError:
        raise
    except ValueError as exc:
        raise BackboneError("bad_weights_spec", f"cannot parse weights {weights!r}: {exc}", "backbone_weights") from exc
    except Exception as exc:  # timm raises RuntimeError/KeyError/OSError for bad names, files or offline hubs
        raise BackboneError("backbone_load_failed", f"{name} with weights {weights!r}: {exc}", "backbone") from exc


def fingerprint(name: str, model: torch.nn.Module) -> str:
    """A stable sha256 hex digest of the model name and every parameter/buffer value.

    Values are hashed as contiguous little-endian CPU bytes in sorted key order, so the digest is
    the same on every machine and device for the same weights.
    """
    h = hashlib.sha256()
    h.update(f"lpt-backbone/1\0{name}\0".encode())
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _data_config(model: VisionTransformer) -> dict[str, Any]:
    cfg = dict(timm.data.resolve_model_data_config(model))
    # timm reports the pretrained size; a model built at another img_size needs its own.
    cfg["input_size"] = (3, *model.patch_embed.img_size)
    return cfg


def load_backbone(name: str, weights: str = "hub", img_size: int | None = None) -> Backbone:
    """Create a frozen, eval-mode timm ViT with its fingerprint and eval transform.

    Args:
        name: timm model name, e.g. ``vit_base_patch16_224.augreg_in21k`` or ``deit_tiny_patch16_224``.
        weights: ``hub``, a local weights file path, or ``random:SEED``.
        img_size: build the model for this input size (position embeddings are resampled).
    """
    model = _create(name, weights, img_size)
    if not isinstance(model, VisionTransformer) or model.cls_token is None:
        raise BackboneError("unsupported_backbone", f"{name} is not a timm VisionTransformer with a class token")
    model.eval()
    model.requires_grad_(False)
    random_weights = weights.startswith(RANDOM_PREFIX)
    if random_weights:
        log.warning(
            "!!! backbone %s uses RANDOM weights (%s): predictions are meaningless outside demos/tests", name, weights
        )
    cfg = _data_config(model)
    info = BackboneInfo(
        name=name,
        fingerprint=fingerprint(name, model),
        depth=len(model.blocks),
        embed_dim=model.embed_dim,
        num_prefix_tokens=model.num_prefix_tokens,
        num_patches=model.patch_embed.num_patches,
        patch_size=int(model.patch_embed.patch_size[0]),
        input_size=tuple(cfg["input_size"]),
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
        interpolation=str(cfg.get("interpolation", "bicubic")),
        crop_pct=float(cfg.get("crop_pct", 0.875)),
        weights=weights if random_weights or weights == "hub" else str(Path(weights).name),
        random_weights=random_weights,
        num_params=sum(p.numel() for p in model.parameters()),
        data_config=cfg,
    )
    log.info(
        "backbone %s loaded: depth=%d dim=%d fingerprint=%s", name, info.depth, info.embed_dim, info.fingerprint[:16]
    )
    return Backbone(model=model, info=info, eval_transform=eval_transform(cfg))


def eval_transform(data_config: dict[str, Any]) -> EvalTransform:
    """timm's own eval transform for a data config (resize, centre crop, to tensor, normalise), knowing the
    shorter side it resizes to, so decoders can stop at that size (``lpt.images``)."""
    return EvalTransform(data_config)
