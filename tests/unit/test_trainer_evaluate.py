"""The many / medium / few split by training count, and the accuracy report."""

from __future__ import annotations

import json

import pytest
import torch

from trainer.evaluate import EvalCounts, accuracy_report, group_of, plot_report


@pytest.mark.parametrize(
    ("count", "group"), [(500, "many"), (101, "many"), (100, "medium"), (20, "medium"), (19, "few"), (1, "few")]
)
def test_group_boundaries(count, group):
    assert group_of(count) == group


def test_report_groups_and_per_class():
    train_counts = [500, 150, 60, 20, 19, 5]
    counts = EvalCounts(correct=torch.tensor([9, 7, 5, 4, 2, 0]), total=torch.tensor([10] * 6))
    report = accuracy_report(counts, train_counts, [f"c{i}" for i in range(6)])
    assert report["overall"] == pytest.approx(100 * 27 / 60)
    assert report["many"] == pytest.approx((90 + 70) / 2)
    assert report["medium"] == pytest.approx((50 + 40) / 2)
    assert report["few"] == pytest.approx((20 + 0) / 2)
    assert [r["group"] for r in report["per_class"]] == ["many", "many", "medium", "medium", "few", "few"]
    assert report["per_class"][4] == {
        "class": "c4",
        "train_count": 19,
        "test_count": 10,
        "accuracy": 20.0,
        "group": "few",
    }
    json.dumps(report)


def test_empty_group_is_none_and_plot_is_written(tmp_path):
    counts = EvalCounts(correct=torch.tensor([3, 1]), total=torch.tensor([4, 4]))
    report = accuracy_report(counts, [50, 5], ["a", "b"])
    assert report["many"] is None
    report["history"] = [
        {"phase": 1, "global_epoch": 1, "loss": 2.0, "train_acc": 30.0},
        {"phase": 2, "global_epoch": 2, "loss": 1.5, "train_acc": 40.0},
    ]
    report["phase1"] = accuracy_report(counts, [50, 5], ["a", "b"])
    path = plot_report(report, tmp_path / "r.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
