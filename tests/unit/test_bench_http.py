"""The HTTP benchmarks' parts: latency statistics (one percentile definition), the load generator's window,
popularity and concurrent streams, and the check that a classify response equals the engine's scores (it must
catch wrong versions, labels and scores)."""

from __future__ import annotations

import itertools
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from bench import loadgen, overload
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


def test_overload_rows_use_the_shared_percentile() -> None:
    result = {
        "window_s": 2.0,
        "requests": 8,
        "statuses": {"200": 5, "429": 2, "-1": 1},
        "latencies_s": [0.001, 0.002, 0.003, 0.004, 0.005],
        "rejected_latencies_s": [0.010, 0.020],
    }
    row = overload.summarise(result)
    assert row["offered_rps"] == 4.0 and row["ok_rps"] == 2.5 and row["errors"] == 1
    assert row["ok_p50_ms"] == pytest.approx(3.0) and row["ok_p99_ms"] == pytest.approx(4.96)  # interpolated
    assert row["reject_p99_ms"] == pytest.approx(1e3 * percentile([0.010, 0.020], 99)) and row["reject_max_ms"] == 20.0


class _Admits(BaseHTTPRequestHandler):
    """/v1/classify: 200 for the key ``ok``, 429 for any other (a server that admits one tenant)."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        status = 200 if self.headers["Authorization"] == "Bearer ok" else 429
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


def test_streams_run_together_are_summarised_apart() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Admits)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        window = {"url": url, "images": [b"jpeg"], "duration_s": 0.6, "warmup_s": 0.1, "timeout_s": 5.0}
        admitted = loadgen.LoadSpec(targets=[loadgen.Target("t", "ok")], concurrency=2, **window)
        refused = loadgen.LoadSpec(targets=[loadgen.Target("t", "no")], mode="open", rate=50, concurrency=8, **window)
        ok, rejected = loadgen.run_together([admitted, refused])
    finally:
        server.shutdown()
        server.server_close()
    assert set(ok["statuses"]) == {"200"} and ok["completed_ok"] > 0 and not ok["rejected_latencies_s"]
    assert set(rejected["statuses"]) == {"429"} and not rejected["latencies_s"]
    assert len(rejected["rejected_latencies_s"]) == rejected["requests"] > 5  # ~30 Poisson arrivals in 0.6 s
    with pytest.raises(ValueError, match="share"):
        loadgen.run_together([admitted, loadgen.LoadSpec(**{**window, "duration_s": 1.0}, targets=[])])


def test_the_overload_witness_times_its_own_fresh_requests() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Admits)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        witness = overload.Witness(f"http://127.0.0.1:{server.server_address[1]}", b"jpeg", every_s=0.05)
        witness.start()
        time.sleep(0.4)
        summary = witness.stop()
    finally:
        server.shutdown()
        server.server_close()
    assert not witness.is_alive() and 4 <= summary["requests"] == len(witness.latencies_s)
    assert 0 < summary["p50_ms"] <= summary["p99_ms"] <= summary["max_ms"] < 400


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
