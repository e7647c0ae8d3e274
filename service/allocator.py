"""The C allocator, tuned for a long-running server: fewer arenas, free pages handed back.

glibc gives each thread that allocates its own arena, up to eight per core, and keeps the
pages of freed memory for reuse: it returns only the free top of a heap to the kernel, never
the free holes below a block still in use. Batches of every size from 1 x 16 to 64 x 400
tokens pass through the inference thread, torch's intra-op threads and the tokenizer's threads,
while request handling allocates Python objects of every size in the same heaps, so resident
memory climbs by a batch's working set or more and drifts with fragmentation. In the service's
soaks (docs/reliability.md, "Soak") it moved by 10-19% in ten minutes in some runs and not in
others, while the memory the service actually held stayed flat; with jemalloc preloaded
(``LD_PRELOAD``, as the container and ``make serve`` do) it stayed flat. This module
leaves a preloaded allocator alone. Under glibc, two remedies, both on by default:
- ``limit_arenas``: at most N arenas for the threads created from now on (the same as
  ``MALLOC_ARENA_MAX``, which wins when set).
- ``release_free_memory`` (``malloc_trim(0)``): hand every whole free page in every arena back
  to the kernel. It takes 3-20 ms; the service runs it every few seconds on its inference
  thread, between batches. It lowers memory (docs/reliability/allocator.json) but cannot
  return pages that a live allocation shares.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import logging
import os
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # <malloc.h>


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc (it has mallopt and malloc_trim); None elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt.argtypes, libc.mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = (ctypes.c_size_t,), ctypes.c_int
    except (OSError, AttributeError):  # musl, macOS: nothing to tune
        return None
    return libc


def preloaded_allocator() -> str | None:
    """jemalloc or tcmalloc when ``LD_PRELOAD`` puts one in place of glibc's malloc."""
    preload = os.environ.get("LD_PRELOAD", "")
    return next((name for name in ("jemalloc", "tcmalloc") if name in preload), None)


def limit_arenas(count: int) -> bool:
    """Let threads created from now on share at most ``count`` arenas. True if applied; False
    where the C library is not glibc, another allocator is preloaded, or ``MALLOC_ARENA_MAX``
    already decided."""
    if (other := preloaded_allocator()) is not None:
        log.info("malloc: %s is preloaded; glibc's arenas are not used", other)
        return False
    if "MALLOC_ARENA_MAX" in os.environ:
        log.info(
            "malloc arenas: MALLOC_ARENA_MAX=%s from the environment",
            os.environ["MALLOC_ARENA_MAX"],
        )
        return False
    libc = _glibc()
    if libc is None:
        log.info("malloc arenas: this C library has no mallopt; left as it is")
        return False
    applied = libc.mallopt(M_ARENA_MAX, count) == 1
    log.info("malloc arenas: at most %d (%s)", count, "applied" if applied else "refused")
    return applied


def can_release() -> bool:
    """True where glibc's malloc serves this process (``malloc_trim`` has work to do)."""
    return _glibc() is not None and preloaded_allocator() is None


def release_free_memory() -> bool:
    """Hand the kernel every whole free page in every arena; True if any was handed back."""
    libc = _glibc()
    released = libc is not None and libc.malloc_trim(0) == 1
    log.debug("malloc_trim: %s", "memory released" if released else "nothing to release")
    return released


async def release_periodically(
    interval_s: float, run_in_worker: Callable[[Callable[[], object]], Awaitable[None]]
) -> None:
    """Release free memory now and then every ``interval_s``, on the thread that
    ``run_in_worker`` runs on (the inference thread, so that it never waits for an arena lock
    while a batch runs, nor holds the event loop). Runs until cancelled."""
    while True:
        await run_in_worker(release_free_memory)
        await asyncio.sleep(interval_s)
