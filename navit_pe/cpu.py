"""CPU runtime settings and facts: used by navit_pe.trainer (train.py), the study, the launcher and bench/.

By default glibc's malloc serves large blocks (a few MiB: most activations of a training step)
with fresh mmap'd memory and returns it when freed, so every step page-faults its activations
in again. `keep_freed_memory` makes malloc serve blocks up to 32 MiB from its heap and never
trim it: memory freed by one step is reused by the next. On the 2-core VM this project is
measured on, the fixed-shape 32x32 baseline step of bench/throughput.py ran ~5 % faster and
steadier with it (361 vs 378-392 ms); the packed step was unchanged (~381 ms).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
from pathlib import Path

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, glibc's <malloc.h>
_done = False


def keep_freed_memory() -> bool:
    """Keep freed memory in the process heap (glibc only; elsewhere a no-op). True if applied."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # blocks up to 32 MiB (glibc's ceiling) come from the heap; the heap is never trimmed
    _done = bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    return _done


def cores() -> int:
    """The CPU cores this process may use (its affinity, e.g. a container's share), else all."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_name() -> str:
    """The CPU's model name and core count, e.g. 'Intel(R) Xeon(R) Processor, 2 cores' (for records of runs)."""
    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name or platform.processor() or 'unknown CPU'}, {os.cpu_count()} cores"
