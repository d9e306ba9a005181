"""Helpers shared by the service-level benchmarks (http, loading, memory, scaling).

Latency summaries, run metadata (machine, versions, load average), prompt sets of a given shape, resident
entries built the way ``service.resident`` builds them, and a real ``lpt-serve`` subprocess.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import torch

from bench.engine import CheckFailed, default_weights
from bench.engine_report import machine_info
from bench.real_data import CIFAR_ZIP
from lpt.backbone import BackboneInfo
from lpt.init import init_prompt_set
from lpt.prompt_set import PromptSet
from prompts_store.base import StoredVersion
from service.resident import ResidentSet, make_resident

__all__ = [
    "CheckFailed",
    "LptServe",
    "default_weights",
    "latency_summary",
    "loadavg",
    "make_set",
    "on_engine_thread",
    "percentile",
    "resident",
    "run_metadata",
    "sync",
    "write_json",
]

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` in [0, 100] (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """count, mean, p50/p95/p99 and max in milliseconds."""
    ms = [s * 1e3 for s in seconds]
    return {
        "count": len(ms),
        "mean_ms": sum(ms) / len(ms) if ms else math.nan,
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms) if ms else math.nan,
    }


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
    return init_prompt_set(info, names, prompt_length, pool_size, share_blocks, top_k, 20.0, seed=seed)


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
    return make_resident(StoredVersion(tenant, task, version, "", 0, 0.0), ps, device, dtype, model)


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


def on_engine_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` in a fresh dedicated thread and return its result, as the service runs every forward.

    The service's forwards run in the ``EngineWorker`` thread, not the main thread; timing the engine the
    same way keeps the comparison fair (on a busy machine, torch's OpenMP team of the main thread behaved
    very differently from a worker thread's).
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-engine") as pool:
        return pool.submit(fn, *args).result()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServeOptions:
    """The ``lpt-serve`` flags a benchmark sets (everything else stays the service default)."""

    backbone: str = "deit_tiny_patch16_224"
    weights: str = "random:0"
    img_size: int | None = None
    device: str = "cpu"
    dtype: str = "float32"
    store: str | None = None  # None: an embedded store in the server's temp dir
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    queue_size: int = 1024
    request_timeout: float = 30.0
    threads: int | None = None  # OMP/torch threads of the server process; None: torch's default


class LptServe:
    """A real ``lpt-serve`` subprocess on a free loopback port, with API keys, stopped on exit.

    Args:
        opts: the flags.
        keys: tenant -> secret (sent as ``LPT_API_KEYS``).
        ready_timeout: seconds to wait for ``/readyz``.
        repo: the checkout whose code the server runs (another one: a before/after comparison in one run).
    """

    def __init__(self, opts: ServeOptions, keys: dict[str, str], ready_timeout: float = 300.0, repo: Path = REPO):
        self.repo = Path(repo)
        self.opts = opts
        self.keys = keys
        self.ready_timeout = ready_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._tmp = tempfile.TemporaryDirectory(prefix="lpt-bench-serve-")
        self.log_path = Path(self._tmp.name) / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        o = self.opts
        cmd = [sys.executable, "-m", "service.cli", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--backbone", o.backbone, "--backbone-weights", o.weights, "--device", o.device, "--dtype", o.dtype]
        cmd += ["--store", o.store or str(Path(self._tmp.name) / "store"), "--data-dir", self._tmp.name]
        cmd += ["--max-batch-size", str(o.max_batch_size), "--max-wait-ms", str(o.max_wait_ms)]
        cmd += ["--queue-size", str(o.queue_size), "--request-timeout", str(o.request_timeout)]
        cmd += ["--log-level", "warning"]
        if o.img_size:
            cmd += ["--img-size", str(o.img_size)]
        return cmd

    def start(self) -> LptServe:
        env = dict(os.environ)
        env["LPT_API_KEYS"] = ",".join(f"{t}:{s}" for t, s in self.keys.items())
        env["PYTHONPATH"] = str(self.repo) + os.pathsep + env.get("PYTHONPATH", "")
        if self.repo != REPO:
            env["PYTHONDONTWRITEBYTECODE"] = "1"  # leave the other checkout as it is
        if self.opts.threads:
            env["OMP_NUM_THREADS"] = str(self.opts.threads)
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(self.command(), cwd=self.repo, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.ready_timeout
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"lpt-serve exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    if client.get(f"{self.url}/readyz").status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"lpt-serve not ready within {self.ready_timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def headers(self, tenant: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[tenant]}"}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self._tmp.cleanup()

    def __enter__(self) -> LptServe:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def scrape(client: httpx.Client, url: str) -> dict[str, float]:
    """The server's Prometheus counters and histogram sums/counts, as ``name{labels} -> value``."""
    out: dict[str, float] = {}
    for line in client.get(f"{url}/metrics").text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


def metric_delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def run_cli(
    name: str,
    argv: list[str] | None,
    parse_args: Callable[[list[str]], tuple[Any, str | None]],
    run: Callable[..., dict],
    markdown: Callable[[dict], str],
) -> int:
    """The shared ``main`` of the service benchmarks: parse, run (correctness checked first), print, write JSON.

    Args:
        name: benchmark name for messages.
        argv: command-line arguments (``sys.argv[1:]`` when None).
        parse_args: argv -> (config, JSON path or None).
        run: ``run(config, argv, log=...)`` -> report; raises CheckFailed before timing anything wrong.
        markdown: report -> table text.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, json_path = parse_args(argv)
    try:
        report = run(cfg, argv, log=lambda m: print(m, file=sys.stderr, flush=True))
    except CheckFailed as exc:
        print(f"{name} benchmark: CORRECTNESS CHECK FAILED, nothing timed: {exc}", file=sys.stderr)
        return 1
    print(markdown(report))
    write_json(json_path, report)
    return 0
