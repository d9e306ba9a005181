"""``python -m bench allocator``: both sides run in their own processes, and only one has the setting applied."""

from __future__ import annotations

import ctypes
import json
import sys

import pytest

from bench.allocator import main

glibc = sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "gnu_get_libc_version")


@pytest.mark.skipif(not glibc, reason="the setting applies to glibc only")
def test_both_sides_are_timed_and_only_one_retains(tmp_path, capsys):
    out = tmp_path / "allocator.json"
    argv = ["--backbone", "test_vit", "--weights", "random:0", "--batch", "2", "--rounds", "1", "--calls", "1"]
    assert main([*argv, "--warmup", "0", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["applied"] == {"retained": True, "glibc": False}
    for side in ("retained", "glibc"):
        assert set(report["median_ms"][side]) == {"plain", "lpt", "deep_vpt"}
        assert all(ms > 0 for ms in report["median_ms"][side].values())
    assert "| deep_vpt |" in capsys.readouterr().out
