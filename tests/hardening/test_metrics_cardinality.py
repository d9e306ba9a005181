"""The number of series in /metrics does not grow with the number of tasks (1 -> 1,000)."""

from __future__ import annotations

from lpt.prompt_set import encode
from tests.support.images import png_bytes
from tests.support.metrics import parse_metrics
from tests.support.prompt_sets import make_set
from tests.support.service_app import make_config, serve_in_thread


def traffic(served, tasks: list[str]) -> set[str]:
    for task in tasks:
        r = served.post(f"/v1/classify?task={task}", content=png_bytes(), headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
        assert served.get(f"/v1/prompts/{task}").status_code == 200
    assert served.post("/v1/classify?task=absent", content=png_bytes()).status_code == 404
    assert served.get("/v1/prompts").status_code == 200
    served.get("/metrics")  # so /metrics itself is counted in both rounds
    return set(parse_metrics(served.get("/metrics").text))  # one key per time series: name and label set


def test_series_do_not_grow_with_tasks(backbone, tmp_path):
    data = encode(make_set(backbone.info, classes=2, pool=0))
    # A small cache budget so the second round also evicts: eviction counters must not be per task either.
    config = make_config(tmp_path, cache_bytes=len(data) * 8, max_prompt_bytes=len(data) * 2)
    with serve_in_thread(config, backbone) as s:
        store = s.state.store
        store.put("default", "task-0", data)
        one = traffic(s, ["task-0"])
        for i in range(1, 1000):
            store.put("default", f"task-{i}", data)
        assert len(store.list_tasks("default")) == 1000
        many = traffic(s, [f"task-{i}" for i in range(0, 1000, 50)])
        assert s.state.metrics.cache_evictions._value.get() > 0  # the budget really forced evictions
    assert many == one, f"new series: {sorted(many - one)}"
    assert not any("task-" in name for name in many)
    assert len(one) < 400
