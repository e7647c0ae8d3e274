"""The process's malloc: jemalloc where it is installed, chosen before the service starts.

Batches of every shape from 1 x 16 to 64 x 400 tokens pass through the inference thread while
request handling allocates Python objects of every size in the same heaps. glibc's malloc keeps
the holes this leaves: in ten-minute soaks its resident memory grew by 10-19% in some runs and
not in others, although what the service held stayed flat; on jemalloc it stayed flat in every
run (docs/reliability.md, "Memory"). An allocator can only be swapped before a process starts,
so ``python -m service`` executes itself again, once, with jemalloc in ``LD_PRELOAD``: the
container, ``make serve`` and ``pip install`` + ``python -m service`` all get it the same way.
Where jemalloc is not installed the service runs on the C library's malloc and says so at start.

jemalloc's defaults give allocations above 8 MB (this model's larger batches allocate tensors
of up to 26 MB) to an arena that returns their pages at once, so every such batch faults its
pages in afresh: 0.77x of glibc's throughput at saturation. ``oversize_threshold:0`` keeps them
in the ordinary arenas, whose unused pages go back after ``dirty_decay_ms`` (1 s instead of
10 s, so that memory does not follow the last ten seconds of batch shapes), handed back by
jemalloc's own thread (``background_thread``) rather than whichever thread allocates next:
the throughput of glibc, at the memory level of jemalloc's defaults.
"""

from __future__ import annotations

import ctypes.util
import gc
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

# Used unless MALLOC_CONF is set already (docs/reliability.md, "Memory").
JEMALLOC_CONF = "oversize_threshold:0,dirty_decay_ms:1000,background_thread:true"


def jemalloc_library() -> str | None:
    """jemalloc's shared library as the dynamic loader finds it (``libjemalloc.so.2``)."""
    return ctypes.util.find_library("jemalloc")


def exec_on_jemalloc(
    environ: Mapping[str, str] = os.environ, allocator_flag: str | None = None
) -> None:
    """Replace this process with itself on jemalloc, unless it already is, the ``allocator``
    setting (``allocator_flag``, the ``--allocator`` flag, else ``SENTIMENT_ALLOCATOR``) says
    ``system``, or there is no jemalloc to load. Call it first thing in ``main``: the new
    process starts from scratch (same PID, same arguments)."""
    choice = allocator_flag or environ.get("SENTIMENT_ALLOCATOR", "jemalloc")
    if sys.platform != "linux" or choice != "jemalloc":
        return
    if "jemalloc" in environ.get("LD_PRELOAD", ""):  # already on it, or tried: never loops
        return
    library = jemalloc_library()
    if library is None:
        return
    preload = ":".join(p for p in (library, environ.get("LD_PRELOAD", "")) if p)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(
        sys.executable,
        sys.orig_argv,
        {"MALLOC_CONF": JEMALLOC_CONF, **environ, "LD_PRELOAD": preload},
    )


def in_use() -> str:
    """``jemalloc`` if this process has it mapped, else ``system``."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return "jemalloc" if "libjemalloc" in maps else "system"


def report(setting: str) -> None:
    """One line at start saying which malloc serves, and a warning where jemalloc was wanted
    but is not there."""
    if in_use() == "jemalloc":
        log.info("malloc: jemalloc (MALLOC_CONF=%s)", os.environ.get("MALLOC_CONF", ""))
    elif setting == "jemalloc":
        log.warning(
            "malloc: the C library's; jemalloc was not found (Debian: apt-get install "
            "libjemalloc2). Resident memory can drift by 10-20%% under sustained load; "
            "MALLOC_ARENA_MAX=2 narrows it (docs/reliability.md)"
        )
    else:
        log.info("malloc: the C library's (SENTIMENT_ALLOCATOR=system)")


def freeze_long_lived() -> None:
    """Leave what the process holds for good (the model, the app, the imported modules: about
    200,000 objects) out of Python's garbage collections from now on. A full collection walks
    every object it tracks: 237 ms here, the event loop stopped meanwhile, and new objects (a
    burst of connections, requests) start one every so often: a thousand connections opened at
    once stalled ``/health`` for 220 ms. What is frozen is still freed when nothing refers to
    it (a model replaced by a reload); only cycles among frozen objects would stay, so the
    garbage is collected first (at start the whole heap, once; later only what is not frozen,
    which is quick)."""
    gc.collect()
    gc.freeze()
    log.info("%d long-lived objects left out of garbage collection", gc.get_freeze_count())


def refreeze() -> None:
    """``freeze_long_lived`` again (a reload's new model), where the process froze at start."""
    if gc.get_freeze_count():
        freeze_long_lived()
