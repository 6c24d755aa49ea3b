"""Keep freed large buffers in the process for reuse, instead of handing them back to the kernel.

glibc serves an allocation above its mmap threshold (128 KB to start, raised
only when a larger block is freed, and an allocation the same size as the
last freed one still crosses it) with a fresh mmap, and gives it back on
free. Every 4 KB page of the new block then costs a page fault (about 2 us)
on first touch: copying into a fresh 14 MB buffer took 8 ms instead of 1.7
ms. A step of the service makes several message-sized buffers per hop (the
joined request, the bytes gRPC receives, numpy's temporaries), so at batch
4096 page faults were about half the CPU the client and coordinator spent on
a step, and a fifth of a worker's. Pinning the threshold at its maximum (32
MB) and letting up to `max_bytes` of freed memory stay at the top of each
malloc heap (every thread arena has its own) makes those buffers reuse warm
pages; the cost is that a process's resident size stays near its peak.

Linux with glibc only; elsewhere nothing changes (and the function says so).
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

# mallopt(3) parameters.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MAX_MMAP_THRESHOLD = 32 * 2**20  # glibc refuses more on 64-bit (HEAP_MAX_SIZE / 2)
DEFAULT_KEEP_FREED_MB = 512
KEEP_FREED_ENV = "GRADPOOL_KEEP_FREED_MB"


def keep_freed_memory(max_bytes: int = DEFAULT_KEEP_FREED_MB * 2**20) -> bool:
    """Let this process keep up to `max_bytes` of freed memory, and serve
    blocks up to 32 MB from it, so big buffers reuse pages instead of faulting
    them in anew. 0 leaves glibc's defaults. True when the setting took."""
    if max_bytes <= 0:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this interpreter runs on
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        log.debug("no mallopt in this C library; malloc left as it is")
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    kept = min(int(max_bytes), 2**31 - 1)
    return bool(mallopt(M_MMAP_THRESHOLD, min(MAX_MMAP_THRESHOLD, kept)) and mallopt(M_TRIM_THRESHOLD, kept))


def keep_freed_bytes_from_env() -> int:
    """GRADPOOL_KEEP_FREED_MB in bytes (the default when unset; 0 turns the tuning off)."""
    raw = os.environ.get(KEEP_FREED_ENV, "").strip()
    try:
        mb = float(raw) if raw else DEFAULT_KEEP_FREED_MB
    except ValueError:
        raise ValueError(f"{KEEP_FREED_ENV}={raw!r} is not a number of MB") from None
    return int(max(mb, 0.0) * 2**20)
