"""A real ``lpt-serve`` subprocess for the benchmarks that measure the service from outside: its flags
(``ServeOptions``), the process on a free loopback port (``LptServe``) and its Prometheus counters (``scrape``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.common import REPO
from bench.options import ServedBackbone
from bench.ports import free_port
from lpt.backbone import load_backbone
from lpt.init import init_prompt_set
from lpt.prompt_set import encode


@dataclass
class ServeOptions(ServedBackbone):
    """The ``lpt-serve`` flags a benchmark sets (everything else stays the service default)."""

    img_size: int | None = None
    device: str = "cpu"
    dtype: str = "float32"
    store: str | None = None  # None: an embedded store in the server's temp dir
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    queue_size: int = 1024
    request_timeout: float = 30.0
    threads: int | None = None  # OMP/torch threads of the server process; None: torch's default
    grpc: bool = False  # serve the Open Inference Protocol over gRPC too (on a free port, ``LptServe.grpc_port``)
    extra_args: tuple[str, ...] = ()  # further lpt-serve flags, as given


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
        self.grpc_port = free_port() if opts.grpc else 0
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
        return [*cmd, *o.extra_args]

    def start(self) -> LptServe:
        env = dict(os.environ)
        env["LPT_API_KEYS"] = ",".join(f"{t}:{s}" for t, s in self.keys.items())
        env["PYTHONPATH"] = str(self.repo) + os.pathsep + env.get("PYTHONPATH", "")
        env["LPT_GRPC_PORT"] = str(self.grpc_port)  # a variable: checkouts without the setting ignore it
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

    def upload_demo_set(self, task: str) -> None:
        """Upload one small seeded set for the server's backbone (10 classes, L=10, P=8) as ``task`` of every
        tenant: for the benchmarks that measure the service around a set, not the set."""
        o = self.opts
        info = load_backbone(o.backbone, o.weights, o.img_size).info
        data = encode(init_prompt_set(info, [f"c{i}" for i in range(10)], prompt_length=10, pool_size=8, seed=0))
        with httpx.Client(base_url=self.url, timeout=60) as client:
            for tenant in self.keys:
                r = client.post("/v1/prompts", params={"task": task}, content=data, headers=self.headers(tenant))
                if r.status_code not in (200, 201):
                    raise RuntimeError(f"uploading the demo set for {tenant} answered {r.status_code}: {r.text}")

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
