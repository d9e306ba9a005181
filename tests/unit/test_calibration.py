"""Temperature scaling: the fit, ECE / NLL, the prompt set's optional ``temperature`` and the trainer's report."""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch

from lpt.errors import PromptSetInvalid
from lpt.forward import PromptBank
from lpt.prompt_set import DEFAULT_TEMPERATURE, TEMPERATURE_RANGE, decode, encode, load_and_validate
from tests.support.prompt_sets import make_set
from tests.support.trainer_cli import train_argv
from trainer import cli
from trainer.calibration import (
    ECE_BINS,
    calibrated_probabilities,
    calibration_report,
    ece,
    fit_temperature,
    grouped_metrics,
    nll,
    reliability,
)
from trainer.config import TrainConfig
from trainer.data import synthetic_long_tailed, write_image_folder
from trainer.evaluate import evaluate, prompt_predictor
from trainer.loop import Trainer

SMALL = dict(epochs1=2, epochs2=2, batch_size=16, prompt_length=2, pool_size=4, top_k=2, share_blocks=2, progress=False)


def sampled(temperature: float, n: int = 20000, classes: int = 5, seed: int = 0):
    """Logits and labels drawn from ``softmax(logits / temperature)``: the NLL's minimiser is near ``temperature``."""
    gen = torch.Generator().manual_seed(seed)
    logits = 4.0 * torch.randn(n, classes, generator=gen)
    labels = torch.multinomial((logits / temperature).softmax(-1), 1, generator=gen).squeeze(1)
    return logits, labels


@pytest.mark.parametrize("true_t", [0.4, 1.0, 2.5])
def test_fit_recovers_the_temperature_the_labels_were_drawn_with(true_t):
    logits, labels = sampled(true_t)
    assert fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.05)


def test_fit_is_the_nll_minimum_of_a_fine_grid():
    logits, labels = sampled(1.7, n=3000, seed=1)
    fitted = fit_temperature(logits, labels)
    grid = torch.linspace(0.5, 4.0, 701).tolist()
    best = min(grid, key=lambda t: nll(logits, labels, t))
    assert fitted == pytest.approx(best, abs=0.01)
    assert nll(logits, labels, fitted) <= min(nll(logits, labels, t) for t in grid) + 1e-9


def test_fit_stays_inside_the_allowed_range():
    logits = torch.tensor([[0.1, 0.0], [0.0, 0.1]])
    low, high = TEMPERATURE_RANGE
    assert fit_temperature(logits, torch.tensor([0, 1])) == pytest.approx(low, rel=1e-6)  # always right: T -> 0
    assert fit_temperature(logits, torch.tensor([1, 0])) == pytest.approx(high, rel=1e-6)  # always wrong: T -> inf
    with pytest.raises(ValueError):
        fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


def test_temperature_keeps_the_top1_and_sharpens_or_flattens():
    logits, _ = sampled(1.0, n=200)
    for t in (0.1, 0.7, 3.0, 15.0):
        probs = calibrated_probabilities(logits, t)
        assert torch.equal(probs.argmax(1), logits.argmax(1))
        assert torch.allclose(probs.sum(1), torch.ones(200))
    base = calibrated_probabilities(logits, 1.0).max(1).values
    assert bool((calibrated_probabilities(logits, 2.0).max(1).values <= base + 1e-7).all())
    assert bool((calibrated_probabilities(logits, 0.5).max(1).values >= base - 1e-7).all())


def test_ece_by_hand():
    # Confidences 0.9 (right), 0.9 (wrong), 0.6 (right), 0.3 (right; three classes): three occupied bins.
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.3, 0.3, 0.4]])
    labels = torch.tensor([0, 1, 0, 2])
    expected = 2 / 4 * abs(0.5 - 0.9) + 1 / 4 * abs(1.0 - 0.6) + 1 / 4 * abs(1.0 - 0.4)
    assert ece(probs, labels) == pytest.approx(expected)
    rows = reliability(probs, labels)
    assert len(rows) == ECE_BINS and sum(r["images"] for r in rows) == 4
    assert [r["low"] for r in rows][:2] == [0.0, 1 / 15] and rows[-1]["high"] == 1.0


def test_bins_are_right_closed():
    # Confidence exactly 1/15 belongs to the first bin, (0, 1/15]; exactly 1.0 to the last.
    probs = torch.tensor([[1 / 15] * 15, [1.0] + [0.0] * 14], dtype=torch.float64)
    rows = reliability(probs, torch.tensor([0, 0]))
    assert rows[0]["images"] == 1 and rows[-1]["images"] == 1


def test_well_calibrated_scores_have_a_small_ece_and_overconfident_ones_a_large_one():
    logits, labels = sampled(1.0, n=20000, seed=2)
    assert ece(calibrated_probabilities(logits, 1.0), labels) < 0.02
    assert ece(calibrated_probabilities(logits, 0.3), labels) > 0.1


def test_report_groups_by_training_count_and_calibration_lowers_the_nll():
    logits, labels = sampled(3.0, n=3000, classes=3, seed=3)
    counts = [500, 50, 5]  # many, medium, few
    report = calibration_report((logits, labels), (logits, labels), counts, "the evaluation set")
    assert report["temperature"] == pytest.approx(3.0, rel=0.1)
    assert report["after"]["overall"]["nll"] < report["before"]["overall"]["nll"]
    assert report["after"]["overall"]["ece"] < report["before"]["overall"]["ece"]
    assert report["after"]["overall"]["top1"] == report["before"]["overall"]["top1"]
    for group, cls in (("many", 0), ("medium", 1), ("few", 2)):
        assert report["after"][group]["images"] == int((labels == cls).sum())
    json.dumps(report)  # JSON-able: it goes into the report file and the checkpoint
    assert grouped_metrics(logits[labels == 0], labels[labels == 0], 1.0, counts)["few"] is None


# -- the prompt set's optional temperature ----------------------------------------------------------------------------
def test_a_set_without_temperature_scores_at_one_and_encodes_as_before(backbone):
    ps = make_set(backbone.info)
    data = encode(ps)
    assert b"temperature" not in data[: 8 + struct.unpack("<Q", data[:8])[0]]
    back = decode(data)
    assert back.temperature is None and back.score_temperature == DEFAULT_TEMPERATURE == 1.0
    assert encode(back) == data


def test_temperature_round_trips_and_is_not_an_extra(backbone):
    ps = make_set(backbone.info)
    ps.temperature = 1.2345678901234
    back = load_and_validate(encode(ps), backbone.info)
    assert back.temperature == ps.temperature and back.score_temperature == ps.temperature
    assert "temperature" not in back.extra


def with_raw_temperature(ps, raw: str) -> bytes:
    ps.extra = {"temperature": raw}  # metadata() writes extras first, then the known keys (temperature is None)
    return encode(ps)


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "0", "-1", "0.01", "25", "1e9", "abc", ""])
def test_an_invalid_temperature_is_refused_naming_the_field(backbone, raw):
    with pytest.raises(PromptSetInvalid) as err:
        load_and_validate(with_raw_temperature(make_set(backbone.info), raw), backbone.info)
    assert err.value.code == "bad_metadata" and err.value.field == "temperature"


@pytest.mark.parametrize("raw", [str(TEMPERATURE_RANGE[0]), "1", "0.731", str(TEMPERATURE_RANGE[1])])
def test_temperatures_inside_the_range_are_accepted(backbone, raw):
    assert load_and_validate(with_raw_temperature(make_set(backbone.info), raw), backbone.info).temperature == float(
        raw
    )


# -- the trainer ------------------------------------------------------------------------------------------------------
def data(seed: int = 0):
    train = synthetic_long_tailed(num_classes=4, n_max=24, imbalance_ratio=6, img_size=32, seed=seed)
    val = synthetic_long_tailed(num_classes=4, n_max=6, imbalance_ratio=1, img_size=32, seed=seed + 1)
    return train, val


def test_trainer_fits_a_temperature_per_set_and_reports_before_and_after(backbone):
    train, val = data()
    result = Trainer(backbone, train, val, TrainConfig(**SMALL), log=lambda _m: None).fit()
    calibration = result.report["calibration"]
    assert calibration["data"] == "the evaluation set" and calibration["images"] == len(val)
    t = calibration["temperature"]
    assert result.prompt_set.temperature == t and TEMPERATURE_RANGE[0] <= t <= TEMPERATURE_RANGE[1]
    phase1 = result.report["phase1"]["calibration"]
    assert result.phase1_prompt_set.temperature == phase1["temperature"]
    for report in (calibration, phase1):
        before, after = report["before"]["overall"], report["after"]["overall"]
        assert after["nll"] <= before["nll"] + 1e-9  # fitted on these images: the NLL cannot rise
        assert after["top1"] == before["top1"]
        assert set(report["before"]) == {"overall", "many", "medium", "few"}
        assert len(report["reliability"]["after"]) == ECE_BINS
    assert calibration["before"]["overall"]["top1"] == pytest.approx(result.report["overall"])

    # The report's "after" numbers are the served probabilities of the written set on the evaluation images.
    ps = result.prompt_set
    counts = evaluate(
        prompt_predictor(backbone.model, PromptBank.stack([ps])), val, ps.num_classes, torch.device("cpu"),
        keep_logits=True,
    )  # fmt: skip
    probs = calibrated_probabilities(counts.logits, ps.score_temperature)
    assert ece(probs, counts.logit_targets) == pytest.approx(calibration["after"]["overall"]["ece"], abs=1e-9)


def test_trainer_fits_on_the_calibration_set_when_given_one(backbone):
    train, val = data()
    held_out = synthetic_long_tailed(num_classes=4, n_max=5, imbalance_ratio=1, img_size=32, seed=7)
    trainer = Trainer(
        backbone, train, val, TrainConfig(**{**SMALL, "epochs2": 1}), log=lambda _m: None, calibration_set=held_out
    )
    result = trainer.fit()
    calibration = result.report["calibration"]
    assert calibration["data"] == "the calibration set" and calibration["images"] == len(held_out)
    assert calibration["before"]["overall"]["images"] == len(val)  # measured on the evaluation set
    ps = result.prompt_set
    counts = evaluate(
        prompt_predictor(backbone.model, PromptBank.stack([ps])), held_out, 4, torch.device("cpu"), keep_logits=True
    )
    assert ps.temperature == pytest.approx(fit_temperature(counts.logits, counts.logit_targets), rel=1e-6)


def test_cli_writes_the_temperature_the_report_and_the_reliability_plot(tmp_path):
    train, val = data()
    write_image_folder(train, tmp_path / "train")
    write_image_folder(val, tmp_path / "val")
    held_out = write_image_folder(
        synthetic_long_tailed(num_classes=4, n_max=5, imbalance_ratio=1, img_size=32, seed=9), tmp_path / "held"
    )
    out, report_path, plot = tmp_path / "set.safetensors", tmp_path / "report.json", tmp_path / "plot.png"
    flags = {**SMALL, "epochs2": 1}
    argv = train_argv(
        tmp_path / "train", tmp_path / "val", out, report_path, calibration_data=held_out, plot=plot, **flags
    )
    assert cli.main(argv) == 0
    report = json.loads(report_path.read_text())
    ps = decode(out.read_bytes())
    assert ps.temperature == report["calibration"]["temperature"]
    assert report["calibration"]["source"] == f"--calibration-data {held_out}"
    stored = json.loads(ps.extra["evaluation"])["calibration"]
    assert stored["temperature"] == ps.temperature and set(stored["before"]) == {"ece", "nll"}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert math.isfinite(report["calibration"]["after"]["overall"]["ece"])
