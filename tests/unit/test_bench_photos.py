"""The photo benchmark's pure parts: deterministic photos of the promised sizes and formats, the per-repeat
ratio to the small images, and the reduced and full decoders it compares."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from bench.photos import parse_args, summarise
from bench.photos_shared import KINDS, base_images, base_labels, decoders, make_kind, upscale
from bench.real_data import CIFAR_ZIP, missing
from lpt.backbone import load_backbone


def test_photos_are_deterministic_and_of_the_promised_sizes(tmp_path):
    bases = base_images(2, tmp_path / "absent.zip")  # no CIFAR zip: seeded noise pictures
    assert [img.size for _, img in bases] == [(32, 32)] * 2
    for kind in KINDS[:3]:
        first, again = make_kind(kind, bases, seed=5), make_kind(kind, bases, seed=5)
        assert first == again and len(first) == 2 and first[0] != first[1]
        opened = Image.open(io.BytesIO(first[0]))
        assert opened.format == kind.fmt and opened.size == (kind.size or (32, 32))


def test_summary_is_the_median_of_per_repeat_ratios():
    runs = {"small": [10.0, 20.0, 30.0], "12MP": [6.0, 10.0, 21.0]}
    report = {"kinds": {k: {"runs": [{"images_per_s": v, "error_rate": 0.0} for v in vs]} for k, vs in runs.items()}}
    summarise(report["kinds"])
    assert report["kinds"]["12MP"]["images_per_s"] == 10.0
    assert report["kinds"]["12MP"]["vs_small"] == pytest.approx(0.6)  # ratios 0.6, 0.5, 0.7
    assert report["kinds"]["small"]["vs_small"] == 1.0


def test_the_full_decoder_really_decodes_at_full_size():
    backbone = load_backbone("test_vit", "random:0", img_size=32)
    reduced, full = decoders(backbone)
    assert reduced.min_side == backbone.eval_transform.resize_side and full.min_side is None
    buf = io.BytesIO()
    Image.new("RGB", (800, 600), (20, 40, 60)).save(buf, "JPEG")
    assert reduced.decode(buf.getvalue()).size == (800 // 8, 600 // 8)
    assert full.decode(buf.getvalue()).size == (800, 600)
    assert reduced(buf.getvalue()).shape == full(buf.getvalue()).shape == (3, 32, 32)


def test_unknown_kinds_are_refused():
    assert parse_args(["--kinds", "12MP"])[0].kinds == ("12MP",)
    with pytest.raises(SystemExit):
        parse_args(["--kinds", "40MP"])


def test_a_wider_reduced_decode_keeps_twice_the_side_and_the_agreement_report_names_it(tmp_path):
    from bench.photos_agreement import WiderDecode, markdown, run_agreement
    from service.images import ImageDecoder

    backbone = load_backbone("test_vit", "random:0", img_size=32)
    reduced, _ = decoders(backbone)
    wider = ImageDecoder(WiderDecode(backbone.eval_transform, 4), 10 << 20, 40_000_000)
    assert wider.min_side == 4 * reduced.min_side
    buf = io.BytesIO()
    Image.new("RGB", (800, 600), (20, 40, 60)).save(buf, "JPEG")
    assert min(reduced.decode(buf.getvalue()).size) < 4 * reduced.min_side <= min(wider.decode(buf.getvalue()).size)

    cfg, _ = parse_args(["--agreement", "--count", "3", "--side-factors", "1,4", "--weights", "random:0"])
    cfg.backbone, cfg.cifar_zip = "test_vit", tmp_path / "absent.zip"
    report = run_agreement(cfg, [], log=lambda *_: None)
    assert report["decodes"] == ["reduced", "reduced-x4"] and report["images"] == 3
    assert set(report["agreement"]) == {"imagenet1k/reduced", "imagenet1k/reduced-x4", "imagenet1k/requality"}
    assert "imagenet1k/reduced-x4" in markdown(report)
    assert set(report["mean_pixel_diff"]) == {"reduced", "reduced-x4", "requality"}
    assert report["accuracy"] == {}  # no CIFAR zip: no labels, no CIFAR-10 head


def test_noise_zero_is_the_upscaled_image_itself_and_noise_changes_it():
    img = Image.new("RGB", (32, 32), (10, 200, 90))
    plain = upscale(img, (64, 48), seed=3, sigma=0)
    assert plain.tobytes() == img.resize((64, 48), Image.Resampling.BICUBIC).tobytes()
    assert upscale(img, (64, 48), seed=3, sigma=10).tobytes() != plain.tobytes()


@pytest.mark.skipif(missing(CIFAR_ZIP) is not None, reason=str(missing(CIFAR_ZIP)))
def test_accuracy_is_counted_when_the_sample_misses_classes():
    from bench.photos_agreement import head_labels, run_agreement

    # 5 images spread over the test set skip every other class: labels must still index the head's ten rows
    labels = base_labels(5, CIFAR_ZIP)
    assert len(set(labels)) < 10
    cfg, _ = parse_args(["--agreement", "--count", "5", "--per-class", "2", "--weights", "random:0", "--noise", "0"])
    cfg.backbone = "test_vit"
    ten = sorted({"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"})
    assert head_labels(["cat", "ship"], ten) == [3, 8]  # rows of the ten-class head, not of the classes sampled
    report = run_agreement(cfg, [], log=lambda *_: None)
    assert set(report["accuracy"]) == {"cifar10/full", "cifar10/reduced", "cifar10/requality"}
    assert all(0.0 <= v <= 1.0 for v in report["accuracy"].values())
    assert report["config"]["noise"] == 0.0
