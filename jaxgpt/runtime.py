"""Process settings that make XLA on the CPU fast; applied by the programs themselves.

XLA's CPU runtime frees and reallocates its large activation buffers every
step. glibc hands buffers over its mmap threshold straight back to the
kernel, so each step page-faults on fresh memory. Keeping freed memory in one
heap removes those faults (measured here: 2.6M -> 145k minor faults over 200
steps of the CPU recipe, 41 -> 29 ms/step).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt(3) parameter numbers from glibc's malloc.h.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -4, -8


def keep_freed_memory() -> bool:
    """Tells glibc malloc to reuse freed memory instead of returning it to the OS.

    One arena (so XLA's threads share the reuse), no mmap'd allocations, and
    no trimming of the heap. A no-op (returning False) off glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = {
        M_ARENA_MAX: 1,
        M_MMAP_MAX: 0,
        M_TRIM_THRESHOLD: -1,  # glibc reads -1 as SIZE_MAX: never trim.
        M_TOP_PAD: 256 * 2**20,
    }
    return all(mallopt(param, value) == 1 for param, value in settings.items())
