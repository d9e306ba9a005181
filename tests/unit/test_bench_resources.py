"""The loading, memory and scaling benchmarks check what they measure: loaded sets equal the uploaded ones,
resident bytes match tensor bytes and a budget keeps the right number of sets, and mixed batches equal each
task run alone. Tiny test_vit runs; no timing assertions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import bench.loading as loading
import bench.memory as memory
import bench.scaling as scaling
import service.engine
from bench.__main__ import main as bench_main
from bench.common import CheckFailed, make_set, resident
from lpt.backbone import load_backbone
from tests.support.redis_server import RedisServer

TINY_SCALING = [
    "--backbone", "test_vit", "--weights", "random:0", "--img-size", "32", "--batch", "12",
    "--tasks-per-batch", "1,3,12", "--tasks", "20", "--registered", "4,40", "--registered-batch", "8",
    "--registered-tasks-per-batch", "3", "--repeats", "2", "--check-tasks", "3",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("test_vit", "random:0", 32)


def test_same_set_compares_tensors_and_metadata(tiny) -> None:
    a = make_set(tiny.info, 4, pool_size=3, seed=1)
    assert loading.same_set(a, make_set(tiny.info, 4, pool_size=3, seed=1), torch.float32)
    assert not loading.same_set(a, make_set(tiny.info, 4, pool_size=3, seed=2), torch.float32)
    renamed = make_set(tiny.info, 4, pool_size=3, seed=1)
    renamed.class_names[0] = "other"
    assert not loading.same_set(a, renamed, torch.float32)


def test_loading_cli_embedded_writes_table_and_json(tmp_path: Path, capsys) -> None:
    out = tmp_path / "loading.json"
    args = ["loading", "--shape-backbone", "test_vit", "--sets", "3", "--loads", "6", "--stores", "embedded"]
    assert bench_main([*args, "--no-http", "--classes", "7", "--json", str(out)]) == 0
    assert "| embedded |" in capsys.readouterr().out
    report = json.loads(out.read_text())
    miss = report["cache_miss"]["embedded"]
    assert miss["total"]["count"] == 6 and set(miss["parts_median_ms"]) == {"read", "validate", "to_device"}
    assert report["machine"]["command"].startswith("python -m bench loading")


@pytest.mark.redis
def test_loading_from_redis_loads_what_was_uploaded(tmp_path: Path) -> None:
    if not RedisServer.available():
        pytest.skip("redis-server is not installed")
    cfg = loading.LoadingConfig(shape_backbone="test_vit", sets=2, loads=4, stores=["redis"], http=False)
    report = loading.run_loading(cfg, [], log=lambda _m: None)
    assert report["cache_miss"]["redis"]["total"]["count"] == 4


def test_loading_check_catches_a_corrupting_load(monkeypatch: pytest.MonkeyPatch) -> None:
    real = loading.PromptCache._make_entry

    def scaled(self, info, ps):
        ps.head_weight = ps.head_weight * 2  # a plausible bug: the resident copy is not the uploaded set
        return real(self, info, ps)

    monkeypatch.setattr(loading.PromptCache, "_make_entry", scaled)
    cfg = loading.LoadingConfig(shape_backbone="test_vit", sets=2, loads=2, stores=["embedded"], http=False)
    with pytest.raises(CheckFailed, match="differs from the uploaded"):
        loading.run_loading(cfg, [], log=lambda _m: None)


def test_memory_run_accounts_every_byte(tmp_path: Path, capsys) -> None:
    out = tmp_path / "memory.json"
    args = ["memory", "--shape-backbone", "test_vit", "--sets", "6", "--budgets", "0.001", "--mixed-tasks", "2,4"]
    assert bench_main([*args, "--json", str(out)]) == 0
    assert "worst ratio" in capsys.readouterr().out
    report = json.loads(out.read_text())
    per_set = report["per_set"]
    assert per_set["ratios"]["cache_accounting"] == 1.0
    assert per_set["ratios"]["storage_bytes"] == pytest.approx(1.0, abs=0.01)
    assert report["budget_check"] == {"budget_sets": 3, "resident": 3, "evictions": 3}
    assert [b["tasks"] for b in report["mixed_banks"]] == [2, 4]
    # the bank the engine builds carries the resident shared-prompt keys/values, so it is counted
    assert all("shared_kv" in b["tensors"] for b in report["mixed_banks"])
    assert report["mixed_banks"][1]["bank_bytes"] == 2 * report["mixed_banks"][0]["bank_bytes"]


def test_memory_refuses_a_mixed_batch_of_one_task() -> None:
    with pytest.raises(ValueError, match="--mixed-tasks"):
        memory.MemoryConfig(mixed_tasks=(1, 8))


def test_storage_bytes_sees_a_view_pinning_a_larger_buffer(tiny) -> None:
    ps = make_set(tiny.info, 4, pool_size=3, seed=1)
    exact = resident("t", "a", 1, ps, "cpu", torch.float32)
    assert memory.storage_bytes(exact) == pytest.approx(ps.nbytes, abs=64)
    big = torch.zeros(10 * ps.head_weight.numel())
    ps.head_weight = big[: ps.head_weight.numel()].view_as(ps.head_weight)  # a view into a 10x larger buffer
    leaky = resident("t", "b", 1, ps, "cpu", torch.float32)
    assert memory.storage_bytes(leaky) > ps.nbytes + 8 * ps.head_weight.numel() * 4


def test_scaling_tiny_run_checks_and_reports(tmp_path: Path, capsys) -> None:
    out = tmp_path / "scaling.json"
    assert bench_main(["scaling", *TINY_SCALING, "--json", str(out)]) == 0
    assert "distinct tasks per batch" in capsys.readouterr().out
    report = json.loads(out.read_text())
    rows = report["tasks_per_batch"]["rows"]
    assert [v["distinct_tasks"] for v in rows.values()] == [1, 3, 12]
    assert rows["1 tasks"]["vs_baseline"] == 1.0 and all(len(v["times_s"]) == 2 for v in rows.values())
    assert [v["resident"] for v in report["registered"]["rows"].values()] == [4, 40]
    assert max(report["tasks_per_batch"]["checks"].values()) <= 1e-4


def test_scaling_check_catches_rows_reading_another_tasks_prompts(monkeypatch: pytest.MonkeyPatch) -> None:
    real = service.engine.prompted_forward

    def swapped_slots(model, images, bank, slots=None):
        if slots is not None and bank.num_slots > 1:
            slots = slots.roll(1)  # a plausible bug: rows gather their neighbour's prompts
        return real(model, images, bank, slots)

    monkeypatch.setattr(service.engine, "prompted_forward", swapped_slots)
    assert scaling.main(TINY_SCALING) == 1


def test_draw_rows_gives_every_task_a_row() -> None:
    rows = scaling.draw_rows(10, registered=50, distinct=4, gen=torch.Generator().manual_seed(0))
    assert len(rows) == 10 and len({k for _, k in rows}) == 4
    assert len({k for _, k in scaling.draw_rows(10, registered=2, distinct=8, gen=torch.Generator())}) == 2
