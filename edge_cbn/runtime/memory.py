"""Give freed model-sized buffers back to the operating system at once (glibc only; elsewhere a no-op).

glibc's malloc raises its mmap threshold each time a large block is freed (up to 32 MB), so after the first
refold the 19 MB flatbuffer copies that refolding builds and drops come from the heap and stay counted in
the process's RSS; and every thread that allocates gets an arena of its own.  A fixed threshold (128 KiB,
glibc's initial one) and at most two arenas keep a long stream's peak near what it holds live
(device/README.md, Memory)."""
from __future__ import annotations

import ctypes
import sys

_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8


def return_freed_memory() -> bool:
    """Set glibc's malloc so freed large blocks are unmapped at once; True when it took effect."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt to call)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, 128 * 1024)) and bool(mallopt(_M_ARENA_MAX, 2))
