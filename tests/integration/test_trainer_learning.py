"""The trainer learns on real data, and the service serves exactly what it evaluated.

A small long-tailed CIFAR-10 subset (class i keeps int(100 * (1/20) ** (i / 9)) images: 100 down to 5,
335 in all) with the real DeiT-Tiny at 96 px; 50 test images per class. Trained with every recipe default, the
prompt set must beat a plain and a logit-adjusted linear probe on the same frozen backbone and images, overall
and on the tail (few-shot) classes, and phase 2 must not lose to phase 1 overall. Then the
file goes through the real service (``create_app``): upload, and one classify request per test image,
whose top-1 must equal the trainer's own evaluation image by image.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from bench.real_data import CIFAR_ZIP as ZIP
from bench.real_data import DEIT_WEIGHTS as WEIGHTS
from bench.real_data import missing
from lpt.backbone import load_backbone
from lpt.prompt_set import decode, encode, validate
from trainer.config import TrainConfig
from trainer.data import load_dataset, long_tailed_subset, per_class_subset
from trainer.evaluate import accuracy_report, summary
from trainer.loop import Trainer
from trainer.probe import extract_features, fit_linear_probe, fit_logit_adjusted_probe, probe_counts

pytestmark = [
    pytest.mark.slow,
    # about 4 minutes on an idle 2-core CPU; generous, because shared CI machines can be several times slower
    pytest.mark.timeout(1800),
    pytest.mark.skipif(missing(ZIP, WEIGHTS) is not None, reason=missing(ZIP, WEIGHTS) or ""),
]
SIZE = 96  # at 64 px the margin over the probe was within seed noise (measured: -0.2 to +3.4 points)
# Only the budget is set (4 + 4 epochs of 11 steps fit a CPU test); every recipe choice is the trainer's default.
CONFIG = dict(epochs1=4, epochs2=4, batch_size=32, progress=False, seed=0)


@pytest.fixture(scope="module")
def trained():
    backbone = load_backbone("deit_tiny_patch16_224", str(WEIGHTS), img_size=SIZE)
    train = long_tailed_subset(load_dataset(f"{ZIP}/train", "train"), imbalance_ratio=20, n_max=100)
    val = per_class_subset(load_dataset(f"{ZIP}/test", "val"), 50).with_classes(train.class_names)
    assert train.class_counts() == [100, 71, 51, 36, 26, 18, 13, 9, 6, 5]
    result = Trainer(backbone, train, val, TrainConfig(**CONFIG), log=print).fit()
    feats, targets = extract_features(backbone, train)
    val_feats, val_targets = extract_features(backbone, val)
    probes = {}
    for name, probe in (
        ("linear probe", fit_linear_probe(feats, targets, num_classes=10)),
        ("logit-adjusted probe", fit_logit_adjusted_probe(feats, targets, num_classes=10)),
    ):
        counts = probe_counts(probe, val_feats, val_targets, 10)
        probes[name] = summary(accuracy_report(counts, train.class_counts(), train.class_names))
    return backbone, val, result, probes


def test_lpt_beats_both_probes_overall_and_on_the_tail(trained):
    _, _, result, probes = trained
    lpt, phase1 = summary(result.report), summary(result.report["phase1"])
    print("".join(f"\n{name:22s} {r}" for name, r in [*probes.items(), ("phase 1", phase1), ("LPT", lpt)]))
    for name, probe in probes.items():
        assert lpt["overall"] > probe["overall"], name
        assert lpt["few"] > probe["few"], name
    assert lpt["overall"] >= phase1["overall"]


def test_the_service_returns_the_trainers_top1(trained, tmp_path):
    backbone, val, result, _ = trained
    data = encode(result.prompt_set)
    validate(decode(data), backbone.info)
    images = _raw_images(val)
    try:
        served = _serve_top1(backbone, data, images, tmp_path)
    except ImportError as exc:  # the service package is optional for the trainer
        pytest.skip(f"service not importable: {exc}")
    assert len(served) == len(result.predictions) == len(images)
    mismatches = [i for i, (a, b) in enumerate(zip(served, result.predictions, strict=True)) if a != b]
    assert not mismatches, f"{len(mismatches)} of {len(images)} images differ, e.g. {mismatches[:5]}"


def _raw_images(dataset) -> list[bytes]:
    """The JPEG bytes of each test image, as a client would upload them."""
    source = dataset.source
    with zipfile.ZipFile(source.archive) as zf:
        return [zf.read(member) for member in source.members]


def _serve_top1(backbone, data: bytes, images: list[bytes], tmp_path: Path) -> list[int]:
    import anyio

    from tests.support.service_app import make_config, serve

    config = make_config(
        tmp_path, backbone="deit_tiny_patch16_224", backbone_weights=str(WEIGHTS), img_size=SIZE, max_batch_size=8
    )

    async def run() -> list[int]:
        async with serve(config, backbone) as (_app, client):
            headers = {"Content-Type": "application/octet-stream"}
            r = await client.post("/v1/prompts", params={"task": "cifar-lt"}, content=data, headers=headers)
            assert r.status_code in (200, 201), r.text
            top1 = []
            for image in images:
                r = await client.post(
                    "/v1/classify",
                    params={"task": "cifar-lt", "top_k": 1},
                    content=image,
                    headers={"Content-Type": "image/jpeg"},
                )
                assert r.status_code == 200, r.text
                top1.append(r.json()["predictions"][0]["index"])
            return top1

    return anyio.run(run)
