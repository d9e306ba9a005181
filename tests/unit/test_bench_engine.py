"""The engine benchmark measures the right computation: its correctness check passes, catches a wrong
mixed-task forward before anything is timed, and a tiny run produces a complete report."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

import bench.engine as engine
from bench.__main__ import main as bench_main
from lpt.backbone import load_backbone

TINY = ["--backbone", "test_vit", "--weights", "random:0", "--img-size", "32"]


@pytest.fixture(scope="module")
def setup():
    cfg = engine.EngineConfig(backbone="test_vit", weights="random:0", img_size=32, tasks=12, tasks_per_batch=5)
    backbone = load_backbone(cfg.backbone, cfg.weights, cfg.img_size)
    single, registry = engine.make_registry(backbone, cfg)
    return backbone, single, registry


def no_autocast():
    return torch.autocast("cpu", enabled=False)


def test_registry_sets_all_have_a_pool_and_vary(setup) -> None:
    _, single, registry = setup
    assert len(registry) == 12 and single.pool_size == 20
    assert all(ps.pool_size > 0 for ps in registry)
    assert len({ps.num_classes for ps in registry}) > 1 and len({ps.pool_size for ps in registry}) > 1


@pytest.mark.parametrize(("batch", "tasks"), [(1, 1), (7, 5), (16, 5)])
def test_draw_gives_every_task_a_row(batch: int, tasks: int) -> None:
    draw = engine.draw_mixed(batch, n_tasks=12, per_batch=5, gen=torch.Generator().manual_seed(0))
    assert len(draw.task_ids) == len(set(draw.task_ids)) == tasks
    assert draw.slots.shape == (batch,) and set(draw.slots.tolist()) == set(range(tasks))
    assert sorted(torch.cat([rows for _, rows in draw.groups()]).tolist()) == list(range(batch))


def test_correctness_check_passes(setup) -> None:
    backbone, single, registry = setup
    images = torch.randn(9, 3, 32, 32)
    draw = engine.draw_mixed(9, 12, 5, torch.Generator().manual_seed(1))
    diffs = engine.check_batch(backbone.model, images, single, registry, draw, 1e-4, no_autocast)
    assert set(diffs) == {
        "ours_vs_two_pass", "append_vs_two_pass", "vpt_vs_two_pass", "plain_last_token_vs_plain", "mixed_vs_alone",
        "alone_vs_two_pass",
    }  # fmt: skip
    assert max(diffs.values()) <= 1e-4


def test_correctness_check_catches_a_wrong_mixed_forward(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    backbone, single, registry = setup
    real = engine.prompted_forward

    def swapped_slots(model, images, bank, slots=None, **kw):
        # a plausible bug: rows gather their neighbour's prompts
        if slots is not None and bank.num_slots > 1:
            slots = slots.roll(1)
        return real(model, images, bank, slots, **kw)

    monkeypatch.setattr(engine, "prompted_forward", swapped_slots)
    images = torch.randn(9, 3, 32, 32)
    draw = engine.draw_mixed(9, 12, 5, torch.Generator().manual_seed(1))
    with pytest.raises(engine.CheckFailed, match=r"task \d+"):
        engine.check_batch(backbone.model, images, single, registry, draw, 1e-4, no_autocast)


def test_correctness_check_catches_ours_differing_from_two_pass(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    backbone, single, registry = setup
    real = engine.prompted_forward

    def off_by_a_bit(model, images, bank, slots=None, **kw):
        out = real(model, images, bank, slots, **kw)
        out.logits = out.logits + 1e-3
        return out

    monkeypatch.setattr(engine, "prompted_forward", off_by_a_bit)
    draw = engine.draw_mixed(4, 12, 5, torch.Generator().manual_seed(2))
    with pytest.raises(engine.CheckFailed, match="two-pass"):
        engine.check_batch(backbone.model, torch.randn(4, 3, 32, 32), single, registry, draw, 1e-4, no_autocast)


def test_correctness_check_catches_a_wrong_last_token_forward(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    backbone, single, registry = setup
    real = engine.kv_prompted_block

    def skips_the_mlp(block, x, prompts_kv, out_tokens=None):
        # a plausible bug: the class-token-only block forgets its MLP residual
        return real(block, x, prompts_kv, out_tokens) - block.ls2(block.mlp(block.norm2(x[:, :out_tokens])))

    monkeypatch.setattr(engine, "kv_prompted_block", skips_the_mlp)
    draw = engine.draw_mixed(4, 12, 5, torch.Generator().manual_seed(2))
    with pytest.raises(engine.CheckFailed, match="plain_last_token vs plain"):
        engine.check_batch(backbone.model, torch.randn(4, 3, 32, 32), single, registry, draw, 1e-4, no_autocast)


def test_failed_check_exits_non_zero_without_timing(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def always_fails(*args, **kwargs):
        raise engine.CheckFailed("planted")

    timed = []
    monkeypatch.setattr(engine, "check_batch", always_fails)
    monkeypatch.setattr(engine, "time_round_robin", lambda *a, **k: timed.append(1))
    assert engine.main([*TINY, "--batch-sizes", "2", "--repeats", "1", "--tasks", "3"]) == 1
    assert not timed and "CORRECTNESS CHECK FAILED" in capsys.readouterr().err


def test_tiny_run_through_the_cli_writes_table_and_json(tmp_path: Path, capsys) -> None:
    out = tmp_path / "engine.json"
    args = ["engine", *TINY, "--batch-sizes", "1,4", "--repeats", "2", "--tasks", "6", "--tasks-per-batch", "3"]
    assert bench_main([*args, "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| batch | variant |" in table and "ours / two-pass" in table
    report = json.loads(out.read_text())
    assert [r["batch"] for r in report["results"]] == [1, 4]
    assert report["machine"]["torch"] == torch.__version__
    # like every benchmark's report: the command, the commit and the load average it ran under
    assert report["machine"]["command"] == "python -m bench " + " ".join([*args, "--json", str(out)])
    assert {"commit", "uncommitted", "loadavg_start", "loadavg_end"} <= set(report["machine"])
    assert set(report["checks"]) == {"1", "4"}
    for res in report["results"]:
        assert set(res["variants"]) == {
            "plain", "two_pass", "append_single", "ours_single", "ours_mixed", "per_task", "vpt_single",
            "plain_last_token",
        }  # fmt: skip
        assert {"ours_vs_plain", "vpt_vs_plain", "ours_vs_append"} <= set(res["ratios"])
        assert all(len(v["times_s"]) == 2 and v["images_per_s"] > 0 for v in res["variants"].values())
        assert res["variants"]["plain"]["vs_plain"] == 1.0
    assert report["results"][1]["distinct_tasks"] == 3


def test_round_robin_rotates_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []
    fns = {name: (lambda _d, name=name: order.append(name)) for name in ("a", "b", "c")}
    engine.time_round_robin(fns, draws=[None] * 3, warmup=0, sync=lambda: None)  # type: ignore[list-item]
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


def test_round_robin_reads_the_given_clock() -> None:
    ticks = iter(range(0, 100, 5))  # every reading advances 5 s: each call measures 5 s
    fns = {"a": lambda _d: None, "b": lambda _d: None}
    times = engine.time_round_robin(fns, [None] * 2, warmup=0, sync=lambda: None, clock=lambda: next(ticks))  # type: ignore[list-item]
    assert times == {"a": [5, 5], "b": [5, 5]}
    assert engine.CLOCKS["cpu"] is time.process_time


def test_cli_usage_and_unknown_command(capsys) -> None:
    assert bench_main([]) == 2
    assert bench_main(["no-such-benchmark"]) == 2
    assert "engine" in capsys.readouterr().err
