"""The one launcher of real ``lpt-serve`` processes: started with arguments and environment on a free loopback
port, ready once /readyz answers 200, stopped with SIGTERM; and one-shot runs that are expected to exit."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Self

import httpx

from tests.support.ports import free_port
from tests.support.processes import LoggedProcess, clean_env, console_command
from tests.support.waiting import wait_until

START_TIMEOUT_S = 120.0  # importing torch and timm on a busy 2-core machine
SHUTDOWN_GRACE_S = 10.0
# The suite's backbone (tests/conftest.py): test_vit at 32 px, seeded random weights, on the CPU.
TEST_BACKBONE_ARGS = ("--backbone", "test_vit", "--backbone-weights", "random:0", "--img-size", "32", "--device", "cpu")


def serve_command() -> list[str]:
    """The ``lpt-serve`` command line without arguments."""
    return console_command("lpt-serve", "service.cli")


def run_lpt_serve(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``lpt-serve args`` to its exit (``--help``, or a start that must fail), output captured as text.

    Args:
        args: its arguments.
        env: variables added to the clean environment (no ``LPT_*`` of the developer's).
        timeout: seconds before the run is killed and the test fails.
    """
    return subprocess.run(
        [*serve_command(), *args],
        env=clean_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


class LptServe(LoggedProcess):
    """One ``lpt-serve`` process; a context manager that starts it, waits until it is ready, and stops it.

    Args:
        log: the file its output goes to.
        args: more arguments (``TEST_BACKBONE_ARGS``, ``--demo``, ...).
        env: variables added to the clean environment (no ``LPT_*`` of the developer's).
        port: the port it listens on; a free one when None; 0 lets it pick one (``url`` is then unknown).
        host: the address it listens on.
        data_dir: passed as ``--data-dir`` when given.
        listen_flags: pass ``--host`` and ``--port``; False when ``env`` sets ``LPT_HOST`` and ``LPT_PORT``.
        grpc_port: its Open Inference Protocol gRPC port (``--grpc-port``); 0, the default here, turns it off so
            that parallel servers never contend for the service's default port.
    """

    def __init__(
        self,
        log: Path,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        data_dir: Path | None = None,
        listen_flags: bool = True,
        grpc_port: int = 0,
    ):
        self.port = free_port() if port is None else port
        self.host = host
        self.data_dir = data_dir
        self.grpc_port = grpc_port
        command = serve_command()
        if listen_flags:
            command += ["--host", host, "--port", str(self.port), "--grpc-port", str(grpc_port)]
        else:
            env = {"LPT_GRPC_PORT": str(grpc_port), **(env or {})}
        if data_dir is not None:
            command += ["--data-dir", str(data_dir)]
        super().__init__("lpt-serve", [*command, *args], log, clean_env(env))

    @property
    def url(self) -> str:
        """``http://host:port``, for an address clients can reach (loopback)."""
        return f"http://{self.host}:{self.port}"

    def start(self, ready: bool = True, timeout: float = START_TIMEOUT_S) -> Self:
        """Start it; with ``ready``, also wait until it answers /readyz with 200."""
        super().start()
        if ready:
            try:
                self.wait_ready(timeout)
            except BaseException:
                self.stop()
                raise
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Until /readyz answers 200; fails at once, with its output, when the process exits first."""
        with httpx.Client(timeout=2.0) as http:

            def ready() -> bool:
                self.assert_alive("/readyz")
                return http.get(f"{self.url}/readyz").status_code == 200

            wait_until(
                ready, timeout, f"{self.url}/readyz", interval=0.2, retry_on=(httpx.TransportError,), details=self.tail
            )

    def stop(self, grace: float = SHUTDOWN_GRACE_S + 5) -> str:
        """SIGTERM (a graceful drain), SIGKILL past ``grace`` seconds; its whole output."""
        return super().stop(grace)
