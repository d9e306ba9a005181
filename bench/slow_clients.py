"""Slow clients against a real ``lpt-serve``: how long an idle connection, headers and a body sent a byte at a
time stay open, and whether a normal client is served while hundreds of such connections trickle.

The server runs with the service's own deadlines unless ``--header-timeout`` / ``--body-timeout`` are given.
Target (the service's promise): each slow connection is closed within 30 s, and the normal client's requests
all succeed while ``--slow-connections`` connections trickle.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import httpx
import torch

from bench.common import BenchmarkCommand, checklist, noise_jpeg, percentile, run_metadata
from bench.options import ServedBackbone, fields_from, option
from bench.server import LptServe, ServeOptions

TENANTS = {"alpha": "alpha-slowclient-key-0123"}
TASK = "demo"
PROMISE_S = 30.0


@dataclass
class SlowClientsConfig(ServedBackbone):
    """Defaults: the service's own deadlines, a byte every 2 s, 200 trickling connections."""

    header_timeout: float | None = option(None, help="the server's --header-timeout (default: the service's)")
    body_timeout: float | None = option(None, help="the server's --body-timeout (default: the service's)")
    every_s: float = option(2.0, help="seconds between the bytes a slow client sends")
    slow_connections: int = option(200, help="trickling connections while the normal client is served")
    normal_requests: int = option(20, help="classify requests of the normal client per phase")


def open_for(host: str, port: int, first: bytes, trickle: bytes, every_s: float, limit_s: float) -> dict[str, Any]:
    """Seconds until the server closes a connection that sends ``first`` and then ``trickle`` a byte per
    ``every_s``, and the status line it answered with (empty when it only closed)."""
    started = time.monotonic()
    with socket.create_connection((host, port), timeout=limit_s) as sock:
        sock.sendall(first)
        sock.settimeout(every_s)
        i = 0
        while time.monotonic() - started < limit_s:
            try:
                if trickle:
                    sock.send(trickle[i % len(trickle) : i % len(trickle) + 1])
                    i += 1
                data = sock.recv(4096)
                if not data or data.startswith(b"HTTP/"):
                    return {"closed_after_s": time.monotonic() - started, "answer": data.split(b"\r\n")[0].decode()}
            except TimeoutError:
                continue
            except OSError:
                return {"closed_after_s": time.monotonic() - started, "answer": ""}
    return {"closed_after_s": None, "answer": "still open"}


class Trickle:
    """``n`` connections that each send one byte every ``every_s`` (a request head that never ends)."""

    def __init__(self, host: str, port: int, n: int, every_s: float):
        self.socks = [socket.create_connection((host, port), timeout=10) for _ in range(n)]
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for sock in self.socks:
                with contextlib.suppress(OSError):  # the server closed it: what it should do
                    sock.send(b"G")
            self._stop.wait(self.every_s)

    def __enter__(self) -> Trickle:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(self.every_s + 5)
        for sock in self.socks:
            sock.close()


def normal_client(url: str, requests: int) -> dict[str, Any]:
    image, latencies, statuses = noise_jpeg(240, 320, quality=90), [], []
    with httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {TENANTS['alpha']}"}) as http:
        for _ in range(requests):
            started = time.perf_counter()
            statuses.append(http.post("/v1/classify", params={"task": TASK}, content=image).status_code)
            latencies.append(time.perf_counter() - started)
    return {"statuses": statuses, "p50_ms": percentile(latencies, 50) * 1000}


def run_slow_clients(cfg: SlowClientsConfig, argv: list[str], log=print) -> dict[str, Any]:
    extra: list[str] = []
    if cfg.header_timeout is not None:
        extra += ["--header-timeout", str(cfg.header_timeout)]
    if cfg.body_timeout is not None:
        extra += ["--body-timeout", str(cfg.body_timeout)]
    report: dict[str, Any] = {
        "benchmark": "slow_clients",
        "config": asdict(cfg),
        "machine": run_metadata(torch.device("cpu"), ["slow-clients", *argv]),
    }
    opts = fields_from(ServeOptions, cfg, extra_args=tuple(extra))
    with LptServe(opts, TENANTS) as serve:
        serve.upload_demo_set(TASK)
        host, port = "127.0.0.1", int(serve.url.rsplit(":", 1)[1])
        limit = PROMISE_S + 10
        key = f"Authorization: Bearer {TENANTS['alpha']}\r\n".encode()
        body_head = b"POST /v1/classify?task=demo HTTP/1.1\r\nHost: x\r\n" + key + b"Content-Length: 100000\r\n\r\n"
        report["idle"] = open_for(host, port, b"", b"", cfg.every_s, limit)
        report["slow_headers"] = open_for(
            host, port, b"", b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 64, cfg.every_s, limit
        )
        report["slow_body"] = open_for(host, port, body_head, b"\xff" * 64, cfg.every_s, limit)
        log(f"[slow-clients] idle {report['idle']}, headers {report['slow_headers']}, body {report['slow_body']}")
        report["normal_alone"] = normal_client(serve.url, cfg.normal_requests)
        with Trickle(host, port, cfg.slow_connections, cfg.every_s):
            report["normal_with_trickle"] = normal_client(serve.url, cfg.normal_requests)
    report["checks"] = checks(report)
    return report


def checks(report: dict[str, Any]) -> dict[str, bool]:
    closed = [report[k]["closed_after_s"] for k in ("idle", "slow_headers", "slow_body")]
    return {
        f"every slow connection closed within {PROMISE_S:g} s": all(c is not None and c <= PROMISE_S for c in closed),
        "the slow body answered 408": report["slow_body"]["answer"].startswith("HTTP/1.1 408"),
        "every normal request succeeded among the trickling connections": set(report["normal_with_trickle"]["statuses"])
        == {200},
    }


def markdown(report: dict[str, Any]) -> str:
    rows = ["| slow client | closed after (s) | answer |", "|---|---|---|"]
    for name in ("idle", "slow_headers", "slow_body"):
        r = report[name]
        closed = "never" if r["closed_after_s"] is None else f"{r['closed_after_s']:.1f}"
        rows.append(f"| {name} | {closed} | {r['answer'] or '(closed)'} |")
    alone, trickle = report["normal_alone"], report["normal_with_trickle"]
    rows += [
        "",
        f"normal client p50: {alone['p50_ms']:.1f} ms alone, {trickle['p50_ms']:.1f} ms among "
        f"{report['config']['slow_connections']} trickling connections (statuses {sorted(set(trickle['statuses']))})",
        "",
    ]
    rows += checklist(report["checks"])
    return "\n".join(rows)


COMMAND = BenchmarkCommand("slow-clients", SlowClientsConfig, run_slow_clients, markdown, __doc__)
parse_args = COMMAND.parse_args
main = COMMAND.main
