"""Memory accounting from inside a running ``python -m service``, for telling a leak from
allocator retention during a soak (absolute paths: the bench runs the server in its own
folder):

    SENTIMENT_MEMPROBE=$PWD/probe.log PYTHONPATH=$PWD/bench/memprobe \
        python -m bench.reliability soak --seconds 600 --calibrate 30 --json soak.json

Python imports ``sitecustomize`` from PYTHONPATH at start-up in every process; this one does
nothing unless ``SENTIMENT_MEMPROBE`` names a file and the process is the service. Every 5 s it
appends one line: seconds since start, resident anonymous and file-backed memory (MB), Python's
live allocated blocks and gc-tracked objects (a leak of Python objects grows these), and glibc's
``mallinfo2`` summed over arenas (MB): heap size, bytes in use (a native leak grows this), bytes
free but kept, and bytes in mmapped chunks.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
import threading
import time
from pathlib import Path

_FIELDS = (
    *("arena", "ordblks", "smblks", "hblks", "hblkhd"),
    *("usmblks", "fsmblks", "uordblks", "fordblks", "keepcost"),
)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in _FIELDS]


def _probe(path: Path, every_s: float = 5.0) -> None:
    mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    mallinfo2.restype = _MallInfo2
    started = time.monotonic()
    with path.open("a", buffering=1) as out:
        while True:
            status = Path("/proc/self/status").read_text().splitlines()
            kb = {line.split(":")[0]: int(line.split()[1]) for line in status if "Rss" in line}
            m = mallinfo2()
            out.write(
                f"{time.monotonic() - started:.0f} anon={kb['RssAnon'] >> 10} "
                f"file={kb['RssFile'] >> 10} blocks={sys.getallocatedblocks()} "
                f"gc={len(gc.get_objects())} arena={m.arena >> 20} inuse={m.uordblks >> 20} "
                f"free={m.fordblks >> 20} mmap={m.hblkhd >> 20}\n"
            )
            time.sleep(every_s)


_target = os.environ.get("SENTIMENT_MEMPROBE")
if _target and b"service" in Path("/proc/self/cmdline").read_bytes().split(b"\0"):
    threading.Thread(target=_probe, args=(Path(_target),), daemon=True, name="memprobe").start()
