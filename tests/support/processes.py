"""Child processes of the tests: the command line of a console script, a clean environment, and a process whose
output goes to a log file and that stops with SIGTERM (then SIGKILL when it does not exit in time)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Self

STOP_GRACE_S = 25.0


def console_command(script: str, module: str) -> list[str]:
    """The installed console script ``script``, or ``python -m module`` when the package is not installed."""
    exe = shutil.which(script)
    return [exe] if exe else [sys.executable, "-m", module]


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without the developer's ``LPT_*`` variables, unbuffered Python output, then ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LPT_")}
    return {**env, "PYTHONUNBUFFERED": "1", **(extra or {})}


class LoggedProcess:
    """A child process with stdin closed and stdout and stderr in one log file; a context manager.

    Args:
        name: what the process is, for failure messages.
        args: the command line.
        log: the file its output goes to (parents are created).
        env: its whole environment; this one when None.
    """

    def __init__(self, name: str, args: Sequence[str], log: Path, env: Mapping[str, str] | None = None):
        self.name = name
        self.args = list(args)
        self.log = log
        self.env = dict(env) if env is not None else None
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                self.args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=self.env
            )
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def output(self) -> str:
        """Everything it wrote so far."""
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")
        return ""

    def tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of its output, for failure messages."""
        return "\n".join(self.output().splitlines()[-lines:])

    def assert_alive(self, what: str) -> None:
        """Fail, with its output, when the process has exited while the test waits for ``what``."""
        if self.proc is not None and not self.alive:
            exited = f"{self.name} exited (code {self.returncode})"
            raise AssertionError(f"{exited} while waiting for {what}:\n{self.tail()}")

    def stop(self, grace: float = STOP_GRACE_S) -> str:
        """SIGTERM, SIGKILL if it has not exited within ``grace`` seconds; its whole output."""
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.output()

    def __enter__(self) -> Self:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
