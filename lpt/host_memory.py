"""Host allocator settings for tensor work on the CPU: keep freed memory instead of handing it back at once.

glibc's malloc serves blocks above a (dynamic) threshold with fresh ``mmap`` pages and returns free memory at
the top of its heaps to the kernel. A ViT forward on the CPU allocates and frees megabyte-sized activations in
every block, so with those defaults each block touches fresh pages that the kernel must fault in and zero.
Serving them from retained heap memory made a DeiT-Tiny forward 9-13 % faster (``python -m bench allocator``,
docs/benchmarks.md); the price is that the process keeps up to ``retain_bytes`` of freed
memory per heap instead of returning it. jemalloc or tcmalloc preloaded do the same; this needs no preload.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
# The largest mmap threshold glibc accepts on 64-bit (HEAP_MAX_SIZE / 2): blocks up to this come from the heap.
_MMAP_THRESHOLD_MAX = 32 * 1024**2
# Grow a heap by at least this much at a time (fewer brk calls while a forward's activations are allocated).
_TOP_PAD = 64 * 1024**2

RETAIN_BYTES = 1024**3


def retain_freed_memory(retain_bytes: int = RETAIN_BYTES) -> bool:
    """Keep up to ``retain_bytes`` of freed memory per heap and serve blocks up to 32 MiB from the heap.

    Process-wide; call it once at start, before the large allocations. A no-op (``False``) off glibc (macOS,
    musl) or for ``retain_bytes <= 0``.

    Args:
        retain_bytes: free memory at the top of a heap kept before it is returned to the kernel.

    Returns:
        whether every setting was applied.
    """
    if retain_bytes <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc only: other C libraries' mallopt take other parameters
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    retain = min(int(retain_bytes), 2**31 - 1)
    settings = ((_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX), (_M_TRIM_THRESHOLD, retain), (_M_TOP_PAD, _TOP_PAD))
    return all(mallopt(param, value) == 1 for param, value in settings)
