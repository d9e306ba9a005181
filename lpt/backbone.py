"""Load the frozen timm ViT, fingerprint its weights, and expose its eval preprocessing.

Weights come from one of three sources (``weights`` argument):

- ``hub``: timm's pretrained tag for the model name (needs the internet or a warm HF cache);
- a local file path: ``.safetensors``, ``.pth``/``.bin`` (through timm's own loading and checkpoint
  filters, so position embeddings are resampled for other image sizes), or ``.npz`` (big_vision/JAX);
- ``random:SEED``: seeded random init, for offline demos and tests. Announced loudly.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
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
        """Every field but ``data_config`` (timm's, kept for building transforms), as JSON values (tuples as
        lists): what ``GET /v1/backbone`` and a trained set's ``backbone`` record show."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "data_config"}
        return {name: list(v) if isinstance(v, tuple) else v for name, v in values.items()}


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
            return _create_from_hub(name, kwargs)
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


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub's host answers a TCP connect (seconds, instead of a minute of retries)."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """huggingface_hub's offline mode for one call: the local cache only, no network retries."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _create_from_hub(name: str, kwargs: dict[str, Any]) -> VisionTransformer:
    """timm's pretrained weights: from the hub when it is reachable, else from the local cache, else one clear
    error (not a minute of retried requests)."""
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE and _hub_reachable():
        return timm.create_model(name, pretrained=True, **kwargs)
    with _hub_offline():
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as exc:
            raise BackboneError(
                "weights_unavailable",
                f"cannot get {name}'s pretrained weights: the Hugging Face hub is not reachable from this machine "
                "and they are not in the local cache; pass a local weights file instead (--backbone-weights "
                "PATH, .safetensors, .pth or .npz)",
                "backbone_weights",
            ) from exc


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


# What makes a prompt set servable on a backbone, in the order a mismatch is reported: the model's name,
# then the input size it was built for (it changes the position embeddings), then its weights. The
# fingerprint covers all three; the other two say which one differs.
IDENTITY_FIELDS = ("name", "input_size", "fingerprint")


def mismatched_field(expected: Mapping[str, Any], got: Mapping[str, Any]) -> str | None:
    """The first of ``name``, ``input_size``, ``fingerprint`` that differs between two backbones; None if they match.

    Args:
        expected: a ``BackboneInfo.to_dict()`` (or ``GET /v1/backbone``) of the backbone that will run the set.
        got: the same keys for the other side; a missing ``input_size`` (older prompt sets) is not compared.
    """
    if expected.get("fingerprint") == got.get("fingerprint"):
        return None
    for key in IDENTITY_FIELDS:
        mine, theirs = expected.get(key), got.get(key)
        if key == "input_size" and (mine is None or theirs is None):
            continue
        if _normalised(mine) != _normalised(theirs):
            return key
    return "fingerprint"


def describe_mismatch(
    expected: Mapping[str, Any], got: Mapping[str, Any], expected_is: str = "expected", got_is: str = "got"
) -> str:
    """One sentence naming what differs between two backbones (name, input size or weights); "" when they match.

    Args:
        expected: ``BackboneInfo.to_dict()`` or ``GET /v1/backbone`` of the backbone that will run the set.
        got: the same keys of the backbone the set was (or will be) trained on.
        expected_is: how the message names the expected side, e.g. "the service runs".
        got_is: how the message names the other side, e.g. "the prompt set was trained on".
    """
    key = mismatched_field(expected, got)
    if key is None:
        return ""
    if key == "name":
        return f"backbone name differs: {expected_is} {expected.get('name')}, {got_is} {got.get('name')}"
    if key == "input_size":
        return (
            f"backbone input size differs: {expected_is} {_size(expected)}, {got_is} {_size(got)} "
            f"(both {expected.get('name')})"
        )
    sizes_known = bool(expected.get("input_size") and got.get("input_size"))
    what, same = ("weights differ", "name and input size") if sizes_known else ("weights or input size differ", "name")
    spec = ""
    if expected.get("weights") and got.get("weights"):
        spec = f"; weights {expected['weights']!r} vs {got['weights']!r}"
    return (
        f"backbone {what} (same {same}, {expected.get('name')}): {expected_is} fingerprint "
        f"{str(expected.get('fingerprint'))[:16]}..., {got_is} {str(got.get('fingerprint'))[:16]}...{spec}"
    )


def _normalised(value: Any) -> Any:
    return tuple(int(v) for v in value) if isinstance(value, list | tuple) else value


def _size(info: Mapping[str, Any]) -> str:
    return "x".join(str(v) for v in info["input_size"])


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
