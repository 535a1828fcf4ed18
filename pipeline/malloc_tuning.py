"""Give big freed buffers back to the system at once (glibc's malloc), in the build's process and
the workers it forks.

glibc serves an allocation of at least M_MMAP_THRESHOLD (128 KiB at start) with a mapping of its
own and unmaps it when it is freed, but each such free raises the threshold to the freed size (up
to 32 MiB). After the first photos, the image buffers (source bytes, decoded pixels, the JPEG:
0.1-10 MB each) then come from the heap, between the long-lived small objects that the runner
keeps (thin records, shuffle entries), and the heap holds freed space it cannot give back. On a
20k-photo build on the in-process runner, malloc held 65 MiB free at the job's end (25 MiB at 2k),
and the peak RSS was 471 MiB; with the threshold fixed, 440 MiB at the same speed
(bench/bench_memory.py).

Setting M_MMAP_THRESHOLD (any mallopt of it turns the raise off) keeps every big buffer in its own
mapping, gone from RSS when freed. The raise also doubled M_TRIM_THRESHOLD, the free space the heap
keeps at its top; that is set back to glibc's starting value with it. A MALLOC_MMAP_THRESHOLD_ in the environment is the user's
choice and is left alone; so is a C library that is not glibc (macOS, musl)."""
from __future__ import annotations

import ctypes
import logging
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
MMAP_THRESHOLD_BYTES = TRIM_THRESHOLD_BYTES = 128 << 10  # glibc's own starting values
log = logging.getLogger(__name__)


def glibc():
    """The process's C library when it is glibc, else None."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only
    except (OSError, AttributeError):
        return None
    return libc


def fix_mmap_threshold(nbytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at nbytes for this process (and the processes it forks from now
    on); False where it is not glibc or the environment already sets it."""
    libc = glibc()
    if libc is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    done = libc.mallopt(M_MMAP_THRESHOLD, nbytes) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    if not done:
        log.debug("mallopt of the mmap and trim thresholds was refused")
    return done
