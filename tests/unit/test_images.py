"""The shared decoder ``lpt.images``: EXIF orientation 1-8, corrupt EXIF, CMYK and progressive JPEGs, the reduced
decode (DCT scale for JPEG, ``reduce`` for the rest) against a full decode, and the trainer reading through it."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from lpt.backbone import load_backbone
from lpt.images import REDUCE_GAP, EvalTransform, apply_exif_orientation, decode_side, load_image, resize_side
from tests.support.photos import ORIENTATION, STORED_AS, encode, photo, sideways
from trainer.data import image_folder, load_dataset, train_transform


def mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).mean())


# -- orientation -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_comes_out_upright(orientation):
    upright = photo((240, 240))  # square: all eight variants compare pixel for pixel
    got = load_image(encode(upright, orientation=orientation))
    assert got.mode == "RGB" and got.size == upright.size
    assert mean_abs_diff(got, upright) < 3  # JPEG noise only
    for other, transpose in STORED_AS.items():  # ...while every other orientation is far from it
        if other != 1:
            assert mean_abs_diff(got, upright.transpose(transpose)) > 20, (orientation, other)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_orientation_also_applies_to_png(orientation):
    upright = photo((96, 64))
    got = load_image(encode(upright, "PNG", orientation=orientation))
    assert np.array_equal(np.asarray(got), np.asarray(upright))  # lossless: exactly upright


def test_orientation_applies_after_a_reduced_decode():
    upright = photo((800, 600))
    got = load_image(encode(upright, orientation=6), min_side=100)
    assert got.size == (200, 150)  # 1/4 DCT scale of the stored 600x800, then turned upright
    assert mean_abs_diff(got, upright.resize(got.size, Image.Resampling.BOX)) < 4


def _ifd(entries: list[tuple[int, int, int, bytes]]) -> bytes:
    out = len(entries).to_bytes(2, "little")
    for tag, kind, count, value in entries:
        out += tag.to_bytes(2, "little") + kind.to_bytes(2, "little") + count.to_bytes(4, "little") + value
    return out + b"\x00\x00\x00\x00"


TIFF_LE = b"Exif\x00\x00II*\x00\x08\x00\x00\x00"  # EXIF header, little-endian TIFF, first IFD at offset 8
CORRUPT_EXIF = {
    "ifd-offset-past-end": b"Exif\x00\x00MM\x00\x2a\xff\xff\xff\x00",
    "bad-byte-order": b"Exif\x00\x00XX\x00\x2a\x00\x00\x00\x08",
    "truncated-ifd": b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\x00\x05\x01\x12\x00\x03",
    "orientation-count-past-end": TIFF_LE + _ifd([(ORIENTATION, 3, 0x7FFFFFFF, b"\x06\x00\x00\x00")]),
    "orientation-out-of-range": TIFF_LE + _ifd([(ORIENTATION, 3, 1, b"\xff\xff\x00\x00")]),
    "garbage": b"Exif\x00\x00" + bytes(range(256)) * 3,
    "one-byte": b"Exif\x00\x00M",
}


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns "Corrupt EXIF data"; decoding must go on
@pytest.mark.parametrize("name", sorted(CORRUPT_EXIF))
def test_a_corrupt_exif_block_still_decodes_with_orientation_ignored(name):
    upright = photo()
    buf = io.BytesIO()
    upright.save(buf, "JPEG", quality=95, exif=CORRUPT_EXIF[name])
    got = load_image(buf.getvalue(), min_side=60)
    assert got.size == (80, 60)  # decoded (at 1/4 scale), not transposed
    assert mean_abs_diff(got, upright.resize(got.size, Image.Resampling.BOX)) < 4


def test_exif_that_pillow_cannot_parse_means_no_orientation(monkeypatch):
    image = load_image(encode(photo(), orientation=6))

    def unreadable(self):
        raise SyntaxError("not a TIFF file")  # what older Pillows raise for some corrupt blocks

    monkeypatch.setattr(Image.Image, "getexif", unreadable)
    assert apply_exif_orientation(image) is image
    assert load_image(encode(photo(), orientation=6)).size == (240, 320)  # as stored, no error


# -- modes and JPEG flavours -----------------------------------------------------------------------------------
def test_cmyk_jpeg_decodes_to_rgb_at_the_reduced_scale():
    cmyk = photo().convert("CMYK")
    data = encode(cmyk)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    full, reduced = load_image(data), load_image(data, min_side=60)
    assert full.mode == reduced.mode == "RGB"
    assert full.size == (320, 240) and reduced.size == (80, 60)
    assert mean_abs_diff(reduced, full.resize(reduced.size, Image.Resampling.BOX)) < 4


def test_progressive_jpeg_decodes_like_a_baseline_one():
    upright = photo((640, 480))
    baseline, progressive = encode(upright), encode(upright, progressive=True)
    assert Image.open(io.BytesIO(progressive)).info.get("progressive")
    for min_side in (None, 100):
        a, b = load_image(baseline, min_side), load_image(progressive, min_side)
        assert a.size == b.size == ((640, 480) if min_side is None else (160, 120))
        assert mean_abs_diff(a, b) < 1.5


def test_greyscale_palette_and_alpha_come_out_rgb():
    for image in (photo().convert("L"), photo().convert("P"), photo().convert("RGBA")):
        assert load_image(encode(image, "PNG")).mode == "RGB"


# -- the reduced decode ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "min_side", "expected"),
    [
        ((4000, 3000), 248, (500, 375)),  # 12 MP: 1/8 (375 >= 248)
        ((3000, 4000), 248, (375, 500)),  # portrait: the shorter side decides
        ((1632, 1224), 248, (408, 306)),  # 2 MP: 1/4 (1/8 would give 153 < 248)
        ((640, 480), 248, (640, 480)),  # 1/2 would give 240 < 248: stays full size...
        ((640, 496), 248, (320, 248)),  # ...exactly 248 is enough
        ((200, 150), 248, (200, 150)),  # smaller than needed: full size, never upscaled
    ],
)
def test_jpeg_uses_the_smallest_dct_scale_that_keeps_the_resize_side(size, min_side, expected):
    data = encode(Image.new("RGB", size, (90, 120, 30)), quality=80)
    got = load_image(data, min_side)
    assert got.size == expected
    assert min(got.size) >= min(min_side, *size)


def test_non_jpeg_is_box_reduced_only_when_several_times_too_large():
    big = photo((2400, 1800))
    data = encode(big, "PNG", compress_level=1)
    got = load_image(data, min_side=248)
    factor = 1800 // (REDUCE_GAP * 248)
    assert factor == 3 and got.size == (800, 600)
    assert min(got.size) >= REDUCE_GAP * 248
    assert load_image(encode(photo((900, 700)), "PNG"), min_side=248).size == (900, 700)  # < 2x too large: kept


def test_resize_side_reads_timms_crop_pct_and_input_size():
    deit = {"input_size": (3, 224, 224), "crop_pct": 0.9, "crop_mode": "center", "interpolation": "bicubic"}
    assert resize_side(deit) == 248 == math.floor(224 / 0.9)
    assert resize_side({"input_size": (3, 224, 320), "crop_pct": 0.875}) == math.floor(320 / 0.875)
    assert resize_side({"input_size": (3, 224, 224), "crop_pct": None}) == math.floor(224 / timm.data.DEFAULT_CROP_PCT)
    assert resize_side({"input_size": (3, 224, 224), "crop_pct": 0.9, "crop_border_pixels": 4}) is None


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("test_vit", "random:0", img_size=32)


def test_the_backbone_eval_transform_names_its_resize_side_and_is_timms(tiny):
    transform = tiny.eval_transform
    assert isinstance(transform, EvalTransform)
    assert decode_side(transform) == resize_side(tiny.info.data_config) == math.floor(32 / tiny.info.crop_pct)
    timm_resize = next(t for t in transform.transform.transforms if type(t).__name__ == "Resize")
    assert timm_resize.size == transform.resize_side  # the side timm's own Resize uses
    assert decode_side(train_transform(tiny.info.data_config)) is None  # random crops decode fully


def test_reduced_and_full_decodes_give_the_same_tensor_up_to_resampling(tiny):
    data = encode(photo((1600, 1200)), quality=90)
    reduced = tiny.eval_transform(load_image(data, decode_side(tiny.eval_transform)))
    full = tiny.eval_transform(load_image(data))
    assert reduced.shape == full.shape == (3, 32, 32)
    assert float((reduced - full).abs().mean()) < 0.02  # normalised units: a fraction of one grey level on average


# -- the trainer reads through the same decoder ----------------------------------------------------------------
def test_the_trainer_dataset_decodes_through_lpt_images(tiny, tmp_path, monkeypatch):
    import lpt.images
    import trainer.data

    for i, orientation in enumerate((1, 6, 8)):
        folder = tmp_path / "train" / f"class_{i}"
        folder.mkdir(parents=True)
        (folder / "0.jpg").write_bytes(encode(photo((320, 240), seed=i), orientation=orientation))
    dataset = image_folder(tmp_path / "train")
    dataset.transform = tiny.eval_transform
    calls = []

    def spy(source, min_side=None, *args, **kwargs):
        calls.append(min_side)
        return lpt.images.load_image(source, min_side, *args, **kwargs)

    monkeypatch.setattr(trainer.data, "load_image", spy)
    tensors = [dataset[i][0] for i in range(len(dataset))]
    assert calls == [tiny.eval_transform.resize_side] * 3
    for i, tensor in enumerate(tensors):  # the same tensor the service's preprocessing makes of the upright photo
        upright = tiny.eval_transform(load_image(encode(photo((320, 240), seed=i)), tiny.eval_transform.resize_side))
        assert float((tensor - upright).abs().mean()) < 0.05


def test_zip_members_decode_like_files(tmp_path):
    import zipfile

    data = encode(photo(), orientation=6)
    with zipfile.ZipFile(tmp_path / "set.zip", "w") as zf:
        zf.writestr("train/a/0.jpg", data)
        zf.writestr("train/b/0.jpg", encode(photo(seed=1)))
    dataset = load_dataset(f"{tmp_path / 'set.zip'}/train", "train")
    assert np.array_equal(np.asarray(dataset[0][0]), np.asarray(load_image(data)))
    assert dataset[0][0].size == (320, 240)  # upright


def test_the_trainer_loader_classifies_a_sideways_photo_like_the_upright_one(tiny, tmp_path):
    from lpt.forward import PromptBank, prompted_forward
    from lpt.init import init_prompt_set

    ps = init_prompt_set(tiny.info, [f"c{i}" for i in range(10)], 4, 4, tiny.info.depth // 2, 2, 20.0, seed=3)
    upright = photo((400, 300), seed=5)
    for name, orientation in (("upright", None), ("sideways", 6), ("untagged", 1)):
        folder = tmp_path / "photos" / name
        folder.mkdir(parents=True)
        # untagged: the sideways pixels without their tag, what ignoring the orientation would see
        data = sideways(upright) if name == "untagged" else encode(upright, orientation=orientation)
        (folder / "0.jpg").write_bytes(data)
    dataset = image_folder(tmp_path / "photos")
    dataset.transform = tiny.eval_transform
    batch = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.inference_mode():
        probs = prompted_forward(tiny.model, batch, PromptBank.stack([ps])).logits[:, : ps.num_classes].softmax(-1)
    by_name = dict(zip(dataset.class_names, probs, strict=True))
    tagged, upright_p, untagged = by_name["sideways"], by_name["upright"], by_name["untagged"]
    assert int(tagged.argmax()) == int(upright_p.argmax())
    assert float((tagged - upright_p).abs().max()) < 0.02
    assert float((untagged - upright_p).abs().max()) > 0.02  # the test can fail: orientation matters here
