"""Calibrated scores end to end: the trainer fits a temperature, the real app serves ``softmax(logits / T)`` with it
(the trainer's own probabilities within 1e-5), shows it, refuses a broken one, and serves a set without one exactly
as the plain softmax."""

from __future__ import annotations

import io

import pytest
import torch

from lpt.forward import PromptBank, autocast, prompted_forward
from lpt.prompt_set import encode
from prompts_store.base import StoredVersion
from service.engine import Engine
from service.images import ImageDecoder
from service.resident import make_resident
from tests.integration.service_helpers import SCORE_ATOL, classify, scores_of, upload
from tests.support.images import image_bytes
from tests.support.prompt_sets import make_set
from tests.support.service_app import error_code, make_config, serve
from trainer.calibration import calibrated_probabilities
from trainer.config import TrainConfig
from trainer.data import synthetic_long_tailed
from trainer.evaluate import evaluate, prompt_predictor
from trainer.loop import Trainer

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(180)]

SMALL = dict(epochs1=2, epochs2=2, batch_size=16, prompt_length=2, pool_size=4, top_k=2, share_blocks=2, progress=False)


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def trained(backbone):
    """A prompt set from the trainer (with its fitted temperature), its evaluation images as PNG bytes and labels,
    and the trainer's own probabilities of those images: calibrated and at T = 1."""
    train = synthetic_long_tailed(num_classes=4, n_max=24, imbalance_ratio=6, img_size=32, seed=0)
    val = synthetic_long_tailed(num_classes=4, n_max=6, imbalance_ratio=1, img_size=32, seed=1)
    result = Trainer(backbone, train, val, TrainConfig(**SMALL), log=lambda _m: None).fit()
    ps = result.prompt_set
    counts = evaluate(
        prompt_predictor(backbone.model, PromptBank.stack([ps])), val, 4, torch.device("cpu"), keep_logits=True
    )
    images = [png(val.source.load(i)) for i in range(len(val))]
    return {
        "result": result,
        "images": images,
        "labels": counts.logit_targets,
        "calibrated": calibrated_probabilities(counts.logits, ps.score_temperature),
        "uncalibrated": calibrated_probabilities(counts.logits, 1.0),
    }


async def test_served_scores_are_the_trainers_calibrated_probabilities(backbone, tmp_path, trained):
    result, expected = trained["result"], trained["calibrated"]
    ps = result.prompt_set
    assert ps.temperature == result.report["calibration"]["temperature"]
    assert (expected - trained["uncalibrated"]).abs().max() > 1e-3  # the temperature visibly moves the scores
    async with serve(make_config(tmp_path), backbone) as (_app, c):
        assert (await upload(c, "calibrated", encode(ps))).status_code == 201
        assert (await c.get("/v1/prompts/calibrated")).json()["temperature"] == ps.temperature
        served = []
        for data in trained["images"]:
            r = await classify(c, "calibrated", data)
            assert r.status_code == 200, r.text
            served.append(scores_of(r.json()["predictions"]))
    served = torch.stack(served)
    assert torch.allclose(served, expected, atol=SCORE_ATOL, rtol=0), (served - expected).abs().max().item()
    assert served.argmax(1).tolist() == result.predictions  # top-1 unchanged: the trainer's predictions
    top1 = 100.0 * float((served.argmax(1) == trained["labels"]).double().mean())
    assert top1 == pytest.approx(result.report["overall"])


async def test_a_set_without_temperature_shows_one_and_an_invalid_one_is_refused(backbone, tmp_path):
    plain = make_set(backbone.info, seed=3)
    broken = make_set(backbone.info, seed=4)
    broken.temperature = 50.0
    async with serve(make_config(tmp_path), backbone) as (_app, c):
        assert (await upload(c, "plain", encode(plain))).status_code == 201
        assert (await c.get("/v1/prompts/plain")).json()["temperature"] == 1.0
        r = await upload(c, "broken", encode(broken))
        assert r.status_code == 422 and error_code(r) == "bad_metadata"
        assert r.json()["error"]["field"] == "temperature"
        assert (await c.get("/v1/prompts/broken")).status_code == 404


def resident(backbone, ps, version: int):
    info = StoredVersion("t", f"task{version}", version, f"{version:064x}", 0, 0.0, {})
    return make_resident(info, ps, "cpu", torch.float32, backbone.model)


def test_mixed_batch_divides_each_row_by_its_own_sets_temperature(backbone):
    """One forward over rows of three sets (T = 2.5, T = 0.4, none): each row's scores are its set's calibrated
    softmax, and the row of the set without a temperature is bit for bit the plain softmax of the logits."""
    hot, cold, plain = (make_set(backbone.info, seed=s) for s in (1, 2, 3))
    hot.temperature, cold.temperature = 2.5, 0.4
    entries = [resident(backbone, ps, v) for v, ps in enumerate((hot, cold, plain), start=1)]
    decoder = ImageDecoder(backbone.eval_transform, 1 << 20, 1 << 24)
    images = torch.stack([decoder(image_bytes(seed=s)) for s in range(6)])
    rows = [entries[i % 3] for i in range(6)]
    engine = Engine(backbone, "cpu", torch.float32)
    served = engine.infer(images, rows)
    for i, entry in enumerate(rows):
        with torch.inference_mode(), autocast(torch.device("cpu"), torch.float32):
            logits = prompted_forward(backbone.model, images[i : i + 1], entry.bank).logits.float()[0]
        expected = (logits / entry.prompt_set.score_temperature).softmax(-1)
        assert torch.allclose(served[i], expected, atol=SCORE_ATOL, rtol=0)
        assert int(served[i].argmax()) == int(logits.argmax())
    # The set without a temperature: the engine's scores equal the plain softmax of the same forward exactly.
    alone = engine.infer(images[2::3], [entries[2]] * 2)
    with torch.inference_mode():
        plain_probs = prompted_forward(backbone.model, images[2::3], entries[2].bank).logits.float().softmax(-1)
    assert all(torch.equal(alone[j], plain_probs[j]) for j in range(2))
