"""``python -m bench photos --agreement``: does the reduced decode change answers? (run by ``bench.photos``)

CIFAR-10 test images upscaled to photo sizes (0.3 / 2 / 12 MP in turn, plus ``--noise`` grey levels of Gaussian
noise, 0 for none), each decoded by the service's decoder (smallest DCT scale that covers the resize) and at full
resolution, then classified by a CIFAR-10 cosine head (unit-length class means of DeiT features of CIFAR training
images, the kind of head LPT puts on the backbone) and by DeiT's own ImageNet-1k head. Next to it the same share
for a trivial change (the photo saved at JPEG quality 85 instead of 90): how stable each head's top-1 is on these
images to begin with. The CIFAR-10 head's top-1 accuracy against the images' own labels is counted per decode
too: whether a decode changes how often the answer is right, not only which near-ties flip.
With ``--side-factors 1,2`` the same images are also decoded keeping twice the resize side (one DCT scale
larger), in the same run: how much of the disagreement the scale choice accounts for.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import timm
import torch
from PIL import Image

from bench.common import default_weights, run_metadata
from bench.photos_shared import (
    AGREEMENT_SIZES,
    MAX_BYTES,
    MAX_PIXELS,
    PhotosConfig,
    base_images,
    base_labels,
    decoders,
    encode,
    target_mark,
    upscale,
)
from lpt.backbone import load_backbone
from lpt.prompt_set import DEFAULT_HEAD_SCALE
from service.images import ImageDecoder

TARGET_AGREEMENT = 0.99


def class_means(
    model: torch.nn.Module, transform, cifar_zip: Path, per_class: int, device
) -> tuple[torch.Tensor, list[str]] | None:
    """``[10, D]`` unit-length mean DeiT features of ``per_class`` CIFAR-10 training JPEGs per class, and the class
    names in row order: a cosine nearest-class-mean head for the ten classes the photos show (the shape of head
    LPT puts on the backbone)."""
    if not Path(cifar_zip).is_file():
        return None
    with zipfile.ZipFile(cifar_zip) as zf:
        names = sorted(n for n in zf.namelist() if n.startswith("train/") and n.endswith(".jpg"))
        classes = sorted({n.split("/")[1] for n in names})
        means = []
        for c in classes:
            members = [n for n in names if n.split("/")[1] == c][:per_class]
            batch = torch.stack([transform(Image.open(io.BytesIO(zf.read(n))).convert("RGB")) for n in members])
            means.append(torch.nn.functional.normalize(features(model, batch.to(device)), dim=-1).mean(0))
    return torch.nn.functional.normalize(torch.stack(means), dim=-1), classes


def head_labels(names: list[str], classes: list[str]) -> list[int]:
    """Each image's class name as its row in a head over ``classes`` (all ten, whichever the sample holds)."""
    return [classes.index(n) for n in names]


def features(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.forward_head(model.forward_features(batch), pre_logits=True)


class WiderDecode:
    """The eval transform, asking the decoder to keep ``factor`` times its resize side."""

    def __init__(self, transform, factor: int):
        self.transform = transform
        self.resize_side = factor * transform.resize_side

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image)


def variant_name(factor: int) -> str:
    return "reduced" if factor == 1 else f"reduced-x{factor}"


def run_agreement(cfg: PhotosConfig, argv: list[str], log=print) -> dict[str, Any]:
    """Per image: the service's reduced decode (and any wider ones), a full-resolution decode, and (the noise
    floor of the measure) a full decode of the same photo saved at JPEG quality 85; top-1 under the CIFAR-10 head
    and DeiT's ImageNet head."""
    device = torch.device(cfg.device)
    weights = cfg.weights or default_weights(cfg.backbone)
    backbone = load_backbone(cfg.backbone, weights)
    model = imagenet_classifier(cfg.backbone, weights).to(device)
    reduced, full = decoders(backbone)
    variants = {
        variant_name(f): reduced
        if f == 1
        else ImageDecoder(WiderDecode(backbone.eval_transform, f), MAX_BYTES, MAX_PIXELS)
        for f in cfg.side_factors
    }
    cifar_head = class_means(model, backbone.eval_transform, cfg.cifar_zip, cfg.per_class, device)
    heads = {"imagenet1k": None} if cifar_head is None else {"cifar10": cifar_head[0], "imagenet1k": None}
    counts = {f"{h}/{v}": 0 for h in heads for v in (*variants, "requality")}
    per_size: dict[str, dict[str, int]] = {}
    worst: dict[str, float] = {f"{h}/{v}": 0.0 for h in heads for v in variants}
    flips: list[dict[str, Any]] = []
    bases = base_images(cfg.count, cfg.cifar_zip, cfg.seed)
    # the CIFAR-10 head and the labels both come from the zip: both or neither
    labels = [] if cifar_head is None else head_labels(base_labels(cfg.count, cfg.cifar_zip) or [], cifar_head[1])
    correct = {f"cifar10/{v}": 0 for v in ("full", *variants, "requality")} if cifar_head is not None else {}
    grey = 255 * torch.tensor(backbone.info.std).view(3, 1, 1)  # normalised units -> grey levels
    pixel_diff = {v: 0.0 for v in (*variants, "requality")}
    log(f"photos --agreement: {len(bases)} CIFAR-10 test images at {len(AGREEMENT_SIZES)} photo sizes")
    for i, (_, img) in enumerate(bases):
        size = AGREEMENT_SIZES[i % len(AGREEMENT_SIZES)]
        photo = upscale(img, size, cfg.seed + i, cfg.noise)
        data, requality = encode(photo, "JPEG"), encode(photo, "JPEG", quality=85)
        decoded = [full(data), *(decode(data) for decode in variants.values()), full(requality)]
        for name, image in zip((*variants, "requality"), decoded[1:], strict=True):
            pixel_diff[name] += float(((image - decoded[0]) * grey).abs().mean())
        feats = features(model, torch.stack(decoded).to(device))
        row = per_size.setdefault(f"{size[0]}x{size[1]}", {"images": 0, **{k: 0 for k in counts}})
        row["images"] += 1
        for head, weight in heads.items():
            if weight is None:
                probs = model.get_classifier()(feats).softmax(-1)
            else:
                logits = DEFAULT_HEAD_SCALE * torch.nn.functional.normalize(feats, dim=-1) @ weight.T
                probs = logits.softmax(-1)
            top = probs.argmax(-1).tolist()
            if head == "cifar10":
                for name, pred in zip(("full", *variants, "requality"), top, strict=True):
                    correct[f"cifar10/{name}"] += pred == labels[i]
            for j, name in enumerate((*variants, "requality"), start=1):
                same = top[j] == top[0]
                counts[f"{head}/{name}"] += same
                row[f"{head}/{name}"] += same
                if name == "requality":
                    continue
                worst[f"{head}/{name}"] = max(worst[f"{head}/{name}"], float((probs[j] - probs[0]).abs().max()))
                if not same:  # how close the full decode's own call was: a near-tie flips on any change
                    best = probs[0].topk(2).values
                    flips.append(
                        {
                            "image": i,
                            "size": list(size),
                            "head": head,
                            "decode": name,
                            "margin": float(best[0] - best[1]),
                        }
                    )
        if (i + 1) % 50 == 0:
            log(f"  {i + 1} images: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    total = len(bases)
    return {
        "benchmark": "photos-agreement",
        "config": {**asdict(cfg), "weights": backbone.info.weights, "cifar": Path(cfg.cifar_zip).is_file()},
        "machine": run_metadata(device, ["photos", *argv]),
        "images": total,
        "heads": list(heads),
        "decodes": list(variants),
        "agreement": {k: v / max(1, total) for k, v in counts.items()},
        "accuracy": {k: v / max(1, total) for k, v in correct.items()},
        "mean_pixel_diff": {k: v / max(1, total) for k, v in pixel_diff.items()},
        "max_prob_diff": worst,
        "flips": flips,
        "per_size": per_size,
    }


def imagenet_classifier(name: str, weights: str) -> torch.nn.Module:
    """The backbone with its own ImageNet-1k head (the weights file carries it), in eval mode."""
    if weights.startswith("random:"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(weights.split(":", 1)[1]))
            model = timm.create_model(name, pretrained=False)
    else:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": weights})
    return model.eval().requires_grad_(False)


def agreement_cell(report: dict[str, Any], key: str) -> str:
    share = report["agreement"][key]
    return f"{share:.1%} ({target_mark(share >= TARGET_AGREEMENT)} >= {TARGET_AGREEMENT:.0%})"


def markdown(report: dict[str, Any]) -> str:
    """Agreement per photo size, head and decode, then the noise floor and the largest probability change."""
    heads, decodes = report["heads"], report.get("decodes", ["reduced"])
    keys = [f"{h}/{d}" for h in heads for d in decodes]
    lines = ["| photo size | images | " + " | ".join(f"same top-1, {k}" for k in keys) + " |"]
    lines.append("|---|---:|" + "---:|" * len(keys))
    for size, row in report["per_size"].items():
        cells = " | ".join(f"{row.get(k, row.get(k.split('/')[0], 0)) / row['images']:.1%}" for k in keys)
        lines.append(f"| {size} | {row['images']} | {cells} |")
    lines.append(f"| all | {report['images']} | " + " | ".join(agreement_cell(report, k) for k in keys) + " |")
    worst = report["max_prob_diff"]
    lines.append(
        "\nnoise floor (full decode of the photo saved at quality 85 against quality 90): "
        + ", ".join(f"{h} {report['agreement'][h + '/requality']:.1%}" for h in heads)
        + "; largest probability difference against the full decode: "
        + ", ".join(f"{k} {worst.get(k, worst.get(k.split('/')[0], 0.0)):.3f}" for k in keys)
    )
    if report.get("mean_pixel_diff"):
        lines.append(
            "\nmean absolute difference from the full decode's model input, grey levels: "
            + ", ".join(f"{k} {v:.2f}" for k, v in report["mean_pixel_diff"].items())
        )
    if report.get("accuracy"):
        lines.append(
            "\ntop-1 accuracy against the CIFAR-10 labels: "
            + ", ".join(f"{k} {v:.1%}" for k, v in report["accuracy"].items())
        )
    if report.get("flips"):
        margins = ", ".join(f"{f['head']}/{f.get('decode', 'reduced')} {f['margin']:.3f}" for f in report["flips"])
        lines.append(f"\ntop-2 probability margin of the full decode where a reduced decode differs: {margins}")
    return "\n".join(lines)
