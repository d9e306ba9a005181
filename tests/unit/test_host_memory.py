"""``lpt.host_memory``: after ``retain_freed_memory`` a freed block stays in the heap, ready for the next one."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

from lpt.host_memory import retain_freed_memory

glibc = sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "mallinfo2")
pytestmark = pytest.mark.skipif(not glibc, reason="glibc's allocator (mallinfo2) only")

# A fresh interpreter allocates and frees 24 MiB, then prints the heap's free bytes (mallinfo2().fordblks).
PROBE = """
import ctypes, sys
from lpt.host_memory import retain_freed_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
applied = retain_freed_memory(int(sys.argv[1]))
block = libc.malloc(24 * 1024**2)
ctypes.memset(block, 1, 24 * 1024**2)
libc.free(block)
print(int(applied), libc.mallinfo2().fordblks)
"""


def freed_bytes_kept(retain_bytes: int) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, str(retain_bytes)], capture_output=True, text=True, check=True)
    applied, kept = out.stdout.split()
    return applied == "1", int(kept)


def test_a_freed_block_is_kept_for_reuse():
    applied, kept = freed_bytes_kept(1024**3)
    assert applied
    assert kept >= 24 * 1024**2


def test_with_zero_the_allocator_keeps_its_defaults():
    applied, kept = freed_bytes_kept(0)
    assert not applied
    assert kept < 24 * 1024**2  # glibc maps a block that large afresh and unmaps it when freed


def test_nothing_is_applied_for_a_non_positive_budget():
    assert retain_freed_memory(0) is False
    assert retain_freed_memory(-1) is False
