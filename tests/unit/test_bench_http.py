"""The HTTP benchmark's pure parts: latency statistics, the load generator's window and popularity, and the
check that a classify response equals the engine's scores (it must catch wrong versions, labels and scores)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from bench import loadgen
from bench.common import CheckFailed, latency_summary, make_set, percentile, resident
from bench.http_e2e import compare_answer, markdown
from lpt.backbone import load_backbone


@pytest.fixture(scope="module")
def entry():
    info = load_backbone("test_vit", "random:0", 32).info
    return resident("t", "task", 3, make_set(info, 5, pool_size=4, seed=1), "cpu", torch.float32)


def answer_for(entry, probs: torch.Tensor, version: int | None = None) -> dict:
    names = entry.prompt_set.class_names
    preds = [{"index": i, "label": names[i], "score": float(probs[i])} for i in probs.argsort(descending=True)]
    return {"task": "task", "version": entry.key.version if version is None else version, "predictions": preds}


def test_percentile_interpolates_like_numpy() -> None:
    xs = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert percentile(xs, 50) == 3.0 and percentile(xs, 0) == 1.0 and percentile(xs, 100) == 5.0
    assert percentile(xs, 99) == pytest.approx(4.96)
    summary = latency_summary([0.001, 0.002, 0.003])
    assert summary["count"] == 3 and summary["p50_ms"] == pytest.approx(2.0) and summary["max_ms"] == pytest.approx(3.0)


def test_zipf_weights_and_picker_follow_the_popularity() -> None:
    w = loadgen.zipf_weights(100, 1.0)
    assert sum(w) == pytest.approx(1.0) and all(a > b for a, b in itertools.pairwise(w))
    targets = [loadgen.Target(f"z{i}", "s", weight) for i, weight in enumerate(w)]
    pick = loadgen._Picker(targets, random.Random(0))
    counts: dict[str, int] = {}
    for _ in range(20_000):
        t = pick()
        counts[t.task] = counts.get(t.task, 0) + 1
    assert counts["z0"] / 20_000 == pytest.approx(w[0], abs=0.02)
    assert counts["z0"] > counts.get("z9", 0) > 0


def test_summary_counts_only_the_window() -> None:
    records = [
        (0.5, 1.2, 200),  # started in warm-up: not a latency sample, but completes in the window
        (1.0, 1.5, 200),
        (1.5, 2.5, 429),
        (2.0, 3.5, 200),  # completes after the window: a latency sample, not throughput
        (2.5, 2.6, 0),
    ]
    s = loadgen._summarise(records, 1.0, 3.0, sent=5)
    assert s["requests"] == 4 and s["completed_ok"] == 2 and s["images_per_s"] == pytest.approx(1.0)
    assert s["statuses"] == {"200": 2, "429": 1, "0": 1}
    assert s["error_rate"] == pytest.approx(0.5) and s["rate_429"] == pytest.approx(0.25)
    assert sorted(s["latencies_s"]) == pytest.approx([0.5, 1.5])


def test_compare_answer_accepts_the_engine_scores(entry) -> None:
    probs = torch.softmax(torch.randn(5), 0)
    assert compare_answer(answer_for(entry, probs), entry, probs, 1e-6) == pytest.approx(0.0, abs=1e-7)


def test_compare_answer_catches_wrong_version_label_scores_and_missing_classes(entry) -> None:
    probs = torch.softmax(torch.randn(5), 0)
    with pytest.raises(CheckFailed, match="version"):
        compare_answer(answer_for(entry, probs, version=2), entry, probs, 1e-4)
    swapped = answer_for(entry, probs)
    swapped["predictions"][0]["label"] = entry.prompt_set.class_names[swapped["predictions"][1]["index"]]
    with pytest.raises(CheckFailed, match="label"):
        compare_answer(swapped, entry, probs, 1e-4)
    with pytest.raises(CheckFailed, match="differ"):
        compare_answer(answer_for(entry, probs + 1e-3), entry, probs, 1e-4)
    short = answer_for(entry, probs)
    short["predictions"] = short["predictions"][:3]
    with pytest.raises(CheckFailed, match="classes"):
        compare_answer(short, entry, probs, 1e-4)


def test_markdown_marks_targets() -> None:
    lat = {"p50_ms": 10.0, "p95_ms": 20.0, "p99_ms": 30.0}
    report = {
        "sweep": [
            {
                "scenario": "1task",
                "concurrency": 4,
                "images_per_s": 9.0,
                "latency": lat,
                "error_rate": 0.0,
                "rate_429": 0.0,
                "mean_batch": 3.5,
                "mean_tasks": 1.0,
                "engine_images_per_s": 10.0,
                "ratio": 0.9,
            }
        ],
        "half_load": [
            {
                "scenario": "1task",
                "peak_images_per_s": 9.0,
                "peak_concurrency": 4,
                "peak_engine_images_per_s": 10.0,
                "peak_engine_batch": 4,
                "peak_ratio": 0.7,
                "rate": 4.5,
                "mean_batch": 1.2,
                "latency": lat,
                "p99_bound_ms": 40.0,
            }
        ],
    }
    table = markdown(report)
    assert "0.70 MISS" in table and "| 30 | 40 | ok |" in table
