"""Free TCP ports on loopback for the processes and servers the tests start: the benchmarks' own (one definition)."""

from __future__ import annotations

from bench.ports import free_port

__all__ = ["free_port"]
