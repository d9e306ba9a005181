"""Bounded polling: wait until a condition holds, or fail the test saying what never happened.

``wait_until`` sleeps the calling thread; ``wait_until_async`` awaits, for a test running on the event loop of the
app it polls (a blocking sleep there would stop the app it waits for).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio

DEFAULT_INTERVAL_S = 0.05


def _holds(predicate: Callable[[], object], retry_on: tuple[type[BaseException], ...]) -> bool:
    try:
        return bool(predicate())
    except retry_on:
        return False


def _timed_out(what: str, timeout: float, details: Callable[[], str] | None) -> AssertionError:
    extra = f"\n{details()}" if details is not None else ""
    return AssertionError(f"timed out after {timeout:g} s waiting for {what}{extra}")


def wait_until(
    predicate: Callable[[], object],
    timeout: float,
    what: str = "the condition",
    *,
    interval: float = DEFAULT_INTERVAL_S,
    retry_on: tuple[type[BaseException], ...] = (),
    details: Callable[[], str] | None = None,
) -> float:
    """Call ``predicate`` every ``interval`` seconds until it returns true; the seconds that took.

    The predicate is called at least once, even with no time left. An exception it raises ends the wait (so a
    predicate can fail at once, say when the process it waits for has died) unless it is one of ``retry_on``.

    Args:
        predicate: the condition; any truthy result ends the wait.
        timeout: seconds after which the wait fails with an ``AssertionError``.
        what: what is awaited, for the failure message.
        interval: seconds between calls.
        retry_on: exceptions that mean "not yet" (connection refused while a server starts).
        details: called on timeout; its text (a log tail) is added to the failure message.
    """
    started = time.monotonic()
    while not _holds(predicate, retry_on):
        if time.monotonic() - started >= timeout:
            raise _timed_out(what, timeout, details)
        time.sleep(interval)
    return time.monotonic() - started


async def wait_until_async(
    predicate: Callable[[], object],
    timeout: float,
    what: str = "the condition",
    *,
    interval: float = 0.01,
    retry_on: tuple[type[BaseException], ...] = (),
    details: Callable[[], str] | None = None,
) -> float:
    """``wait_until`` for a test on an event loop: the predicate runs on the loop, the pauses are awaited.

    Args:
        predicate: the condition (sync, cheap: it runs on the event loop).
        timeout: seconds after which the wait fails with an ``AssertionError``.
        what: what is awaited, for the failure message.
        interval: seconds between calls.
        retry_on: exceptions that mean "not yet".
        details: called on timeout; its text is added to the failure message.
    """
    started = time.monotonic()
    while not _holds(predicate, retry_on):
        if time.monotonic() - started >= timeout:
            raise _timed_out(what, timeout, details)
        await anyio.sleep(interval)
    return time.monotonic() - started
