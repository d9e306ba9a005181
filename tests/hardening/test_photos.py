"""Photos as users send them, through the real app: an EXIF-rotated photo answers like the upright one, camera-size
and CMYK/progressive JPEGs are served, and the service decodes exactly as the trainer's data loader does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.demo import DEMO_CLASSES
from tests.support.photos import encode, photo, sideways
from tests.support.service_app import make_config
from tests.support.service_app import serve_in_thread as serve
from trainer.data import image_folder

URL = f"/v1/classify?task=demo&top_k={len(DEMO_CLASSES)}"


@pytest.fixture(scope="module")
def served(backbone, tmp_path_factory):
    config = make_config(tmp_path_factory.mktemp("photos"), demo=True)
    with serve(config, backbone) as s:
        yield s


def scores(served, data: bytes) -> torch.Tensor:
    r = served.post(URL, content=data, headers={"content-type": "image/jpeg"})
    assert r.status_code == 200, r.text
    out = torch.zeros(len(DEMO_CLASSES))
    for p in r.json()["predictions"]:
        out[p["index"]] = p["score"]
    return out


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_a_rotated_photo_with_its_orientation_tag_classifies_like_the_upright_one(served, orientation):
    upright = photo((1600, 1200), seed=orientation)
    expected = scores(served, encode(upright))
    got = scores(served, encode(upright, orientation=orientation))
    assert int(got.argmax()) == int(expected.argmax())
    assert float((got - expected).abs().max()) < 0.02


def test_ignoring_the_tag_would_change_the_answer(served):
    # Without this the test above could pass for a model that does not care how a photo is turned.
    upright = photo((1600, 1200), seed=6)
    assert float((scores(served, sideways(upright)) - scores(served, encode(upright))).abs().max()) > 0.02


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("12mp-jpeg", lambda: encode(photo((4000, 3000)), quality=85)),
        ("cmyk-jpeg", lambda: encode(photo((1200, 900)).convert("CMYK"))),
        ("progressive-jpeg", lambda: encode(photo((1200, 900)), progressive=True)),
        ("large-png", lambda: encode(photo((2000, 1500)), "PNG", compress_level=1)),
    ],
)
def test_camera_sized_and_unusual_photos_are_served(served, name, make):
    probs = scores(served, make())
    assert np.isfinite(probs.numpy()).all() and abs(float(probs.sum()) - 1.0) < 1e-3, name


def test_the_service_decodes_exactly_as_the_trainer_loader(served, tmp_path):
    datas = [encode(photo((1600, 1200), seed=1), orientation=6), encode(photo((900, 700)), "PNG")]
    for i, data in enumerate(datas):
        folder = tmp_path / f"class_{i}"
        folder.mkdir()
        (folder / ("0.jpg" if i == 0 else "0.png")).write_bytes(data)
    dataset = image_folder(tmp_path)
    dataset.transform = served.state.backbone.eval_transform
    for i, data in enumerate(datas):
        assert torch.equal(served.state.classifier.decode_pool.decoder(data), dataset[i][0])
