"""The Open Inference Protocol rows of ``bench http``: the load generator's OIP REST body is the binary tensor
extension's (read back by the service's own codec), and the report compares OIP with /v1 at the same clients."""

from __future__ import annotations

import pytest

from bench.http_e2e import HttpConfig, markdown, oip_ratio
from bench.loadgen import LoadSpec, oip_rest_body, run
from service.oip.codec import parse_rest_request


def test_the_oip_rest_body_is_one_binary_image_tensor():
    body, header_length = oip_rest_body(b"\xff\xd8jpeg bytes")
    request = parse_rest_request(body, header_length)
    assert request.images == [b"\xff\xd8jpeg bytes"]
    assert request.outputs[0].binary


def test_unknown_protocols_are_refused():
    with pytest.raises(ValueError, match="protocol"):
        run(LoadSpec(url="http://127.0.0.1:9", targets=[], images=[b"x"], protocol="soap", duration_s=0.1))
    with pytest.raises(ValueError, match="v1"):
        HttpConfig(protocols=("oip-rest",))


def row(protocol: str, images_per_s: float) -> dict:
    lat = {"p50_ms": 10.0, "p95_ms": 20.0, "p99_ms": 30.0}
    return {
        "scenario": "zipf", "concurrency": 16, "protocol": protocol, "images_per_s": images_per_s, "latency": lat,
        "error_rate": 0.0, "rate_429": 0.0, "mean_batch": 8.0, "mean_tasks": 6.0, "engine_images_per_s": 40.0,
        "ratio": 0.9,
    }  # fmt: skip


def test_the_report_marks_oip_against_v1_at_the_same_clients():
    report = {"sweep": [row("v1", 40.0), row("oip-rest", 39.0), row("oip-grpc", 36.0)], "half_load": []}
    table = markdown(report)
    assert "| zipf | 16 | oip-rest | 39.0 | 40.0 | 0.97 ok |" in table
    assert "| zipf | 16 | oip-grpc | 36.0 | 40.0 | 0.90 MISS |" in table


def test_the_ratio_is_the_median_of_the_per_repeat_ratios():
    v1, oip = row("v1", 30.0), row("oip-rest", 30.0)
    v1["runs"] = [{"images_per_s": 20.0}, {"images_per_s": 40.0}, {"images_per_s": 30.0}]
    oip["runs"] = [{"images_per_s": 19.0}, {"images_per_s": 42.0}, {"images_per_s": 27.0}]
    assert oip_ratio(oip, v1) == pytest.approx(0.95)  # the ratios 0.95, 1.05, 0.9
