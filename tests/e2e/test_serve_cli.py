"""The ``lpt-serve`` and ``lpt`` processes themselves: generated ``--help``, ``--version``, "ready" only once the
socket accepts connections (with the backbone's input size), a taken port, and the access log of the demo."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from importlib.metadata import version
from pathlib import Path

import httpx
import pytest

from service.settings import ServiceSettings, env_name
from tests.e2e.test_serve_subprocess import START_TIMEOUT_S, _command, _env

pytestmark = pytest.mark.timeout(240)

SERVE = _command("lpt-serve", "service.cli")
TEST_BACKBONE = ["--backbone", "test_vit", "--backbone-weights", "random:0", "--img-size", "32", "--device", "cpu"]
READY = re.compile(r"lpt-serve ready on http://127\.0\.0\.1:(\d+): backbone test_vit \(input 3x32x32, ")


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env=_env(**env))


def test_help_lists_every_setting_once_with_its_default_and_variable():
    r = run(*SERVE, "--help")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())  # argparse wraps help lines
    for name, info in ServiceSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        entries = re.findall(rf"^  {re.escape(flag)}(?:[ ,]|$)", r.stdout, re.MULTILINE)  # an option's own line
        assert len(entries) == 1, flag
        assert text.count(f"env {env_name(name)})") == 1, name
        if info.default is not None and not isinstance(info.default, bool):
            assert f"(default: {info.default}; env {env_name(name)})" in text, name
    assert text.count("(default: ") == len(ServiceSettings.model_fields)


def test_version_of_both_commands_is_the_installed_package_version():
    for command, module in (("lpt-serve", "service.cli"), ("lpt", "lpt.cli")):
        r = run(*_command(command, module), "--version")
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == [command, version("lpt-serve")]


def test_a_taken_port_fails_at_once_with_a_clear_error_and_no_ready(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        r = run(*SERVE, "--port", port, "--data-dir", str(tmp_path), *TEST_BACKBONE)
    assert r.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}: the address is already in use" in r.stderr, r.stderr
    assert "lpt-serve ready" not in r.stdout + r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "store").exists()  # it stopped before loading or opening anything


def test_ready_is_logged_once_the_socket_accepts_and_the_demo_logs_each_request(tmp_path):
    log = tmp_path / "serve.log"
    args = [*SERVE, "--port", "0", "--data-dir", str(tmp_path), "--demo", *TEST_BACKBONE]
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_env())
    try:
        port = _wait_for_ready(proc, log)
        # No retry: the moment "ready" is in the log, the port answers.
        r = httpx.get(f"http://127.0.0.1:{port}/healthz?probe=1", timeout=10)
        assert r.status_code == 200
        deadline = time.monotonic() + 10
        while '"GET /healthz?probe=1 HTTP/1.1" 200' not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline, f"no access log line:\n{log.read_text(errors='replace')}"
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait(10)


def _wait_for_ready(proc: subprocess.Popen, log: Path) -> int:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        found = READY.search(log.read_text(errors="replace"))
        if found:
            return int(found.group(1))
        assert proc.poll() is None, f"lpt-serve exited with {proc.returncode}:\n{log.read_text(errors='replace')}"
        time.sleep(0.05)
    raise AssertionError(f"no ready line within {START_TIMEOUT_S}s:\n{log.read_text(errors='replace')}")
