"""What a process does just before it forks the processes that serve (gunicorn's master with `preload_app`, a Celery
worker before its pool): every forked process is charged for the parent's resident pages, and copies each shared
page it writes to (issue 15 item 4)."""

from __future__ import annotations

import contextlib
import ctypes
import gc

from sqlalchemy.orm import configure_mappers

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
# Blocks from 128 KiB up (numpy's temporaries: a batch's features, gathers) are mapped on their own and given back
# when freed. glibc's default raises this threshold to the largest block freed so far (up to 32 MiB), after which
# such temporaries come from the heap and stay resident in every process that ever held one.
_LARGE_BLOCK = 128 * 1024
# A request thread or task allocates from one of at most this many heaps, instead of up to 8 per core, each keeping
# its own free memory.
_ARENAS = 2


def settle_before_fork() -> None:
    """Build once, in the parent, what each forked process would otherwise build for itself on its first query (the
    ORM's mapper configuration); make large blocks and freed heap go back to the system (glibc); hand back the heap
    that loading freed; and move everything loaded to the collector's permanent generation, so a forked process's
    collections never write to the pages it shares."""
    configure_mappers()
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc only; the forked processes inherit these settings
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, _LARGE_BLOCK)
        libc.mallopt(_M_TRIM_THRESHOLD, _LARGE_BLOCK)
        libc.mallopt(_M_ARENA_MAX, _ARENAS)
        libc.malloc_trim(0)
    gc.freeze()
