"""Benchmarks for lpt-serve, run as ``python -m bench <command> [options]``.

Each command is a module exposing ``main(argv: list[str] | None) -> int`` that owns its own argument
parser. To add a benchmark, write the module and add one line to ``COMMANDS``.
"""

from __future__ import annotations

# command name -> (module path, one-line description). Modules are imported only when their command runs,
# so one benchmark's heavy or optional dependencies never slow down or break another.
COMMANDS: dict[str, tuple[str, str]] = {
    "engine": ("bench.engine", "prompted forward throughput on one device: plain vs two-pass vs ours"),
    "accuracy": ("bench.accuracy", "CIFAR-10-LT with DeiT-Tiny: linear probe vs phase 1 (deep VPT) vs full LPT"),
    "http": ("bench.http_e2e", "end to end over HTTP: lpt-serve subprocess, closed-loop sweep, vs the engine"),
    "photos": ("bench.photos", "camera-size JPEGs and a large PNG end to end vs small images; reduced-decode top-1"),
    "loading": ("bench.loading", "prompt-set cache-miss loads (Redis, embedded) and upload-to-first-served"),
    "memory": ("bench.memory", "device bytes per resident prompt set; how many fit in a budget"),
    "scaling": ("bench.scaling", "engine throughput vs distinct tasks per batch and registered tasks"),
    "allocator": ("bench.allocator", "the host allocator setting on and off in fresh processes: CPU forward times"),
    "fairness": (
        "bench.fairness",
        "a quiet tenant's latency while another keeps large PNGs in flight (decode fairness)",
    ),
    "slow-clients": ("bench.slow_clients", "idle, slow-header and slow-body connections: when they are closed"),
    "overload": ("bench.overload", "lpt-serve at 2x/5x capacity: 429 latency, accepted p99, tenant fairness, soak"),
}
