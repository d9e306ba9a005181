"""``bench fairness`` end to end on a small scale: a real lpt-serve, a quiet tenant measured alone and while another
floods with large PNGs. The test measures and checks the report; the ratio itself is the benchmark's to judge
(timings on a shared test machine are not asserted)."""

from __future__ import annotations

import pytest

from bench.fairness import FairnessConfig, markdown, run_fairness

pytestmark = pytest.mark.slow


def test_a_small_fairness_run_measures_the_quiet_tenant_alone_and_under_the_flood() -> None:
    cfg = FairnessConfig(
        backbone="test_vit", weights="random:0", phase_s=2.0, flood_clients=4, large_side=(1500, 1500), threads=1
    )
    report = run_fairness(cfg, ["--phase-s", "2"], log=lambda _m: None)
    alone, during = report["phases"]["beta_alone"], report["phases"]["beta_while_alpha_floods"]
    assert set(alone["statuses"]) == {"200"} and set(during["statuses"]) == {"200"}  # beta is never refused
    assert alone["requests"] > 0 and during["requests"] > 0
    flood = report["phases"]["alpha_flooding"]["statuses"]
    assert flood.get("200", 0) > 0  # alpha's images were decoded and classified too
    assert set(flood) <= {"200", "429"}  # past its decode budget alpha is refused, never failed
    assert report["p50_ratio"] == pytest.approx(during["ok_p50_ms"] / alone["ok_p50_ms"])
    assert "beta p50 ratio" in markdown(report)
