"""Cap glibc's malloc arenas, so that a long-running server keeps less freed memory.

glibc gives each thread that allocates its own arena, up to eight per core, and an arena keeps
the pages of the tensors freed in it for reuse. Batches of every size from 1 x 16 to 64 x 400
tokens pass through the inference thread, torch's intra-op threads and the tokenizer's threads,
so resident memory climbs by a batch's working set or more before it levels off. With two
arenas it climbed less in-process, at the same speed; in the server's soaks the difference
was lost in the noise (docs/reliability.md, "Soak"). The same cap can be set before start with
``MALLOC_ARENA_MAX``; a value set there wins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # <malloc.h>


def limit_arenas(count: int) -> bool:
    """Let threads created from now on share at most ``count`` arenas. True if applied; False
    where the C library is not glibc or ``MALLOC_ARENA_MAX`` already decided."""
    if "MALLOC_ARENA_MAX" in os.environ:
        log.info(
            "malloc arenas: MALLOC_ARENA_MAX=%s from the environment",
            os.environ["MALLOC_ARENA_MAX"],
        )
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        log.info("malloc arenas: this C library has no mallopt; left as it is")
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    applied = mallopt(M_ARENA_MAX, count) == 1
    log.info("malloc arenas: at most %d (%s)", count, "applied" if applied else "refused")
    return applied
