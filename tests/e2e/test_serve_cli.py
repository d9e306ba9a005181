"""The ``lpt-serve`` and ``lpt`` processes themselves: generated ``--help``, ``--version``, "ready" only once the
socket accepts connections (with the backbone's input size), a taken port, and the access log of the demo."""

from __future__ import annotations

import re
import socket
import subprocess
from importlib.metadata import version

import httpx
import pytest

from service.settings import ServiceSettings, env_name
from tests.support.lpt_serve import START_TIMEOUT_S, TEST_BACKBONE_ARGS, LptServe, run_lpt_serve, serve_command
from tests.support.processes import clean_env, console_command
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(240)

READY = re.compile(r"lpt-serve ready on http://127\.0\.0\.1:(\d+): backbone test_vit \(input 3x32x32, ")


def test_help_lists_every_setting_once_with_its_default_and_variable():
    r = run_lpt_serve("--help")
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
    for command, argv in (("lpt-serve", serve_command()), ("lpt", console_command("lpt", "lpt.cli"))):
        r = subprocess.run([*argv, "--version"], capture_output=True, text=True, timeout=120, env=clean_env())
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == [command, version("lpt-serve")]


def test_a_taken_port_fails_at_once_with_a_clear_error_and_no_ready(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        r = run_lpt_serve("--port", port, "--data-dir", str(tmp_path), *TEST_BACKBONE_ARGS)
    assert r.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}: the address is already in use" in r.stderr, r.stderr
    assert "lpt-serve ready" not in r.stdout + r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "store").exists()  # it stopped before loading or opening anything


def test_ready_is_logged_once_the_socket_accepts_and_the_demo_logs_each_request(tmp_path):
    # Port 0: the service picks one and names it in its ready line.
    server = LptServe(tmp_path / "serve.log", ["--demo", *TEST_BACKBONE_ARGS], port=0, data_dir=tmp_path)
    with server.start(ready=False):

        def ready_line() -> re.Match | None:
            server.assert_alive("the ready line")
            return READY.search(server.output())

        wait_until(ready_line, START_TIMEOUT_S, "the ready line", details=server.output)
        port = int(ready_line().group(1))
        # No retry: the moment "ready" is in the log, the port answers.
        r = httpx.get(f"http://127.0.0.1:{port}/healthz?probe=1", timeout=10)
        assert r.status_code == 200
        access = '"GET /healthz?probe=1 HTTP/1.1" 200'
        wait_until(lambda: access in server.output(), 10, "the access log line", interval=0.1, details=server.output)
