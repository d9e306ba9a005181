"""Helpers every benchmark shares. Bench modules import this one; it imports no benchmark, only the leaf helpers
``bench.options`` (command-line options) and ``bench.real_data`` (where the data files are), so the dependencies
point one way.

Correctness-check failures, default weights, percentiles and latency summaries, run metadata (machine, versions,
load average), a benchmark's command (parse, run, print, write JSON), prompt sets of a given shape and resident
entries built the way the service builds them. ``bench.server`` runs a real ``lpt-serve``.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import timm
import torch
from PIL import Image

from bench.options import config_parser, option, parse_config
from bench.real_data import CIFAR_ZIP, DEIT_WEIGHTS
from lpt.backbone import BackboneInfo
from lpt.init import init_prompt_set
from lpt.prompt_set import PromptSet
from prompts_store.base import StoredVersion

if TYPE_CHECKING:
    from service.resident import ResidentSet, SetKey

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]


class CheckFailed(AssertionError):
    """A benchmark's correctness check failed: the numbers would measure a wrong computation."""


def default_weights(backbone: str) -> str:
    """The shared real DeiT-Tiny file for DeiT-Tiny when it is present; seeded random weights otherwise."""
    if backbone.split(".")[0] == "deit_tiny_patch16_224" and DEIT_WEIGHTS.is_file():
        return str(DEIT_WEIGHTS.resolve())
    return "random:0"


# ------------------------------------------------------------------------------------------------ statistics
def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (``q`` in [0, 100]) of ``values``, NaN for no values.

    Linear interpolation between the closest ranks (numpy's default, "linear"): the sorted values sit at
    positions 0 .. n-1 and the percentile is read at position ``(n - 1) * q / 100``. Every benchmark's
    percentiles come from this one function.

    Args:
        values: samples, in any order.
        q: the percentile, 0 (the smallest) to 100 (the largest).
    """
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """count, mean, p50/p95/p99 (``percentile``) and max in milliseconds."""
    ms = [s * 1e3 for s in seconds]
    return {
        "count": len(ms),
        "mean_ms": sum(ms) / len(ms) if ms else math.nan,
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms) if ms else math.nan,
    }


# ------------------------------------------------------------------------------------------------ run metadata
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's word for it elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    """Where the numbers come from: CPU model, cores, threads, versions, date."""
    info = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def loadavg() -> list[float]:
    """The 1/5/15-minute load averages (the machine is shared: say how busy it was)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def run_metadata(device: torch.device, command: Sequence[str]) -> dict[str, Any]:
    """Machine, versions, date, the exact command and the load average at the start."""
    info = machine_info(device)
    info["loadavg_start"] = loadavg()
    info["command"] = "python -m bench " + " ".join(command)
    info.update(git_state())
    return info


def git_state() -> dict[str, Any]:
    """The commit, and the files of the code under test (lpt/, service/, bench/) that differ from it."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = git("status", "--porcelain", "--", "lpt", "service", "bench", "prompts_store").splitlines()
    return {"commit": git("rev-parse", "--short", "HEAD").strip(), "uncommitted": [line[3:] for line in dirty]}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_json(path: Path | None, report: dict[str, Any]) -> None:
    if path is None:
        return
    report.setdefault("machine", {})["loadavg_end"] = loadavg()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))


@dataclass
class SetShape:
    """The shape of the prompt sets a benchmark makes (its options, shared by the benchmarks that make sets)."""

    shape_backbone: str = option("vit_base_patch16_224", help="sets are shaped for this backbone")
    classes: int = option(100)
    prompt_length: int = option(10, help="L, prompt tokens per block")
    pool_size: int = option(20, help="P, group prompts")
    share_blocks: int = option(6, help="S, blocks with the shared prompt only")
    top_k: int = option(2, help="k, group prompts averaged per image")

    def make_set(self, info: BackboneInfo, seed: int = 0) -> PromptSet:
        """A set of this shape for ``info``."""
        return make_set(info, self.classes, self.prompt_length, self.pool_size, self.share_blocks, self.top_k, seed)


def make_set(
    info: BackboneInfo,
    classes: int,
    prompt_length: int = 10,
    pool_size: int = 20,
    share_blocks: int = 6,
    top_k: int = 2,
    seed: int = 0,
) -> PromptSet:
    """A valid prompt set of the given shape for ``info`` (VPT-style random init, reproducible)."""
    names = [f"s{seed}-c{c}" for c in range(classes)]
    return init_prompt_set(
        info, names, prompt_length=prompt_length, pool_size=pool_size, share_blocks=share_blocks, top_k=top_k, seed=seed
    )


def resident(
    tenant: str,
    task: str,
    version: int,
    ps: PromptSet,
    device: torch.device | str,
    dtype: torch.dtype,
    model: torch.nn.Module | None = None,
) -> ResidentSet:
    """A resident entry exactly as ``PromptCache`` makes one (device copy, one-slot bank, keys/values with a model)."""
    # Imported here: the engine and allocator benchmarks measure lpt alone and never need the service.
    from service.resident import make_resident

    return make_resident(StoredVersion(tenant, task, version, "", 0, 0.0), ps, device, dtype, model)


def set_key(info: StoredVersion) -> SetKey:
    """The cache key of a stored version (what ``PromptCache.acquire`` takes)."""
    from service.resident import SetKey

    return SetKey(info.tenant, info.task, info.version, info.sha256)


def cifar_jpegs(count: int) -> list[bytes]:
    """``count`` real JPEGs (CIFAR-10 test split) from the shared zip; synthetic JPEGs when it is absent."""
    import io
    import zipfile

    if CIFAR_ZIP.is_file():
        with zipfile.ZipFile(CIFAR_ZIP) as zf:
            names = sorted(n for n in zf.namelist() if n.startswith("test/") and n.endswith(".jpg"))
            step = max(1, len(names) // count)
            return [zf.read(n) for n in names[::step][:count]]
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        arr = (torch.rand(32, 32, 3, generator=gen) * 255).to(torch.uint8).numpy()
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def noise_jpeg(height: int, width: int, quality: int) -> bytes:
    """A JPEG of seeded uniform noise (nothing for the encoder to compress away: the decoder's worst case)."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(
        buf, "JPEG", quality=quality
    )
    return buf.getvalue()


def on_engine_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` in a fresh dedicated thread and return its result, as the service runs every forward.

    The service's forwards run in the ``EngineWorker`` thread, not the main thread; timing the engine the
    same way keeps the comparison fair (on a busy machine, torch's OpenMP team of the main thread behaved
    very differently from a worker thread's).
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-engine") as pool:
        return pool.submit(fn, *args).result()


def checklist(checks: dict[str, bool]) -> list[str]:
    """A report's checks as Markdown task-list lines (``- [x] met``, ``- [ ] missed``)."""
    return [f"- [{'x' if ok else ' '}] {name}" for name, ok in checks.items()]


@dataclass(frozen=True)
class BenchmarkCommand:
    """A service benchmark's command line, ``python -m bench <name>``: options generated from its config dataclass,
    then run (correctness checked first), print the Markdown table and write the JSON report.

    Args:
        name: the command's name (``python -m bench <name>``).
        config: the config dataclass; one option per field, plus ``--json``.
        run: ``run(config, argv, log=...)`` -> report; raises ``CheckFailed`` before timing anything wrong.
        markdown: report -> table text.
        doc: the module docstring; its first paragraph is the ``--help`` description.
    """

    name: str
    config: type
    run: Callable[..., dict[str, Any]]
    markdown: Callable[[dict[str, Any]], str]
    doc: str | None = None

    def parse_args(self, argv: list[str] | None) -> tuple[Any, Path | None]:
        """Command-line options -> (config, JSON output path or None)."""
        parser = config_parser(self.config, f"python -m bench {self.name}", self.doc)
        cfg, namespace = parse_config(parser, self.config, argv)
        return cfg, namespace.json

    def main(self, argv: list[str] | None = None) -> int:
        """Run the benchmark on ``argv`` (``sys.argv[1:]`` when None); 1 when a correctness check failed."""
        argv = list(sys.argv[1:] if argv is None else argv)
        cfg, json_path = self.parse_args(argv)
        try:
            report = self.run(cfg, argv, log=lambda m: print(m, file=sys.stderr, flush=True))
        except CheckFailed as exc:
            print(f"{self.name} benchmark: CORRECTNESS CHECK FAILED, nothing timed: {exc}", file=sys.stderr)
            return 1
        print(self.markdown(report))
        write_json(json_path, report)
        return 0
