"""The engine benchmark's report: per-variant summaries, paired ratios against the targets, markdown tables."""

from __future__ import annotations

import statistics
from typing import Any

from bench.common import percentile

TARGETS = {"ours_vs_two_pass": 1.25, "ours_vs_plain": 0.64, "mixed_vs_single": 0.95, "vpt_vs_plain": 0.97}
TARGET_LABELS = {
    "ours_vs_two_pass": "ours / two-pass",
    "ours_vs_plain": "ours / plain",
    "mixed_vs_single": "mixed / single",
    "vpt_vs_plain": "deep VPT / plain",
}
EXTRA_RATIOS = {
    "ours_vs_append": "ours / append",
    "mixed_vs_plain": "mixed / plain",
    "per_task_vs_mixed": "per-task / mixed",
    "ours_vs_plain_last_token": "ours / plain-last-token",
    "vpt_vs_plain_last_token": "deep VPT / plain-last-token",
}


def summarise(batch: int, times: dict[str, list[float]]) -> dict[str, Any]:
    """Medians, images/s and paired ratios (median over repeats of per-repeat time ratios)."""

    def ratio(fast: str, slow: str) -> float:
        # throughput ratio fast/slow within each repeat = time(slow)/time(fast)
        return statistics.median(s / f for f, s in zip(times[fast], times[slow], strict=True))

    variants = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        variants[name] = {
            "median_ms": med * 1e3,
            "iqr_pct": 100 * (percentile(ts, 75) - percentile(ts, 25)) / med,
            "images_per_s": batch / med,
            "vs_plain": ratio(name, "plain"),
            "times_s": ts,
        }
    derived = {
        "ours_vs_two_pass": ratio("ours_single", "two_pass"),
        "ours_vs_plain": ratio("ours_single", "plain"),
        "mixed_vs_single": ratio("ours_mixed", "ours_single"),
        "vpt_vs_plain": ratio("vpt_single", "plain"),
        "ours_vs_append": ratio("ours_single", "append_single"),
        "mixed_vs_plain": ratio("ours_mixed", "plain"),
        "per_task_vs_mixed": ratio("per_task", "ours_mixed"),
        "ours_vs_plain_last_token": ratio("ours_single", "plain_last_token"),
        "vpt_vs_plain_last_token": ratio("vpt_single", "plain_last_token"),
    }
    return {"batch": batch, "variants": variants, "ratios": derived}


def _mark(value: float, target: float) -> str:
    return f"{value:.2f} {'ok' if value >= target else 'MISS'}"


def _allocator(machine: dict[str, Any]) -> str:
    retained = machine.get("host_memory_retained")
    return "glibc defaults" if not retained else "retaining freed memory (lpt.host_memory)"


def markdown(report: dict[str, Any]) -> str:
    """Two tables: per-variant throughput, then the target ratios per batch size."""
    cfg, machine = report["config"], report["machine"]
    lines = [
        f"{cfg['backbone']} ({cfg['weights']}), {cfg['dtype']}, {machine['device']} ({machine['cpu']}), "
        f"{machine['torch_threads']} threads, clock {cfg['clock']}, median of {cfg['repeats']} repeats, "
        f"{cfg['tasks']} tasks registered, host allocator {_allocator(machine)}, {machine['date']}",
        "",
        "| batch | variant | tasks in batch | median ms | IQR % | images/s | x plain |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for res in report["results"]:
        for name, v in res["variants"].items():
            tasks = res["distinct_tasks"] if name in ("ours_mixed", "per_task") else 1
            lines.append(
                f"| {res['batch']} | {name} | {tasks} | {v['median_ms']:.1f} | {v['iqr_pct']:.0f} "
                f"| {v['images_per_s']:.1f} | {v['vs_plain']:.2f} |"
            )
    heads = [f"{TARGET_LABELS[n]} (>= {t})" for n, t in TARGETS.items()] + list(EXTRA_RATIOS.values())
    lines += ["", "| batch | " + " | ".join(heads) + " |", "|---:|" + "---:|" * len(heads)]
    for res in report["results"]:
        r = res["ratios"]
        marks = [_mark(r[name], target) for name, target in TARGETS.items()]
        extra = [f"{r[name]:.2f}" for name in EXTRA_RATIOS]
        lines.append("| " + " | ".join([str(res["batch"]), *marks, *extra]) + " |")
    return "\n".join(lines)
