"""bench/memprobe: the soak's memory accounting from inside a real ``python -m service``."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

PROBE_DIR = Path(__file__).resolve().parents[2] / "bench" / "memprobe"
FIELDS = {"anon", "file", "blocks", "gc", "arena", "inuse", "free", "mmap"}


def _env(log: Path, **extra: str) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(PROBE_DIR), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "SENTIMENT_MEMPROBE": str(log), **extra}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and glibc")
def test_the_probe_writes_memory_lines_from_the_service_only(trained_bundle: Path, tmp_path: Path):
    other = tmp_path / "other.log"
    subprocess.run([sys.executable, "-c", "import time; time.sleep(0.5)"], env=_env(other))
    assert not other.exists()

    log = tmp_path / "probe.log"
    env = _env(
        log,
        SENTIMENT_MODEL_DIR=str(trained_bundle.parent),
        SENTIMENT_MODEL_NAME=trained_bundle.name,
        SENTIMENT_PORT="0",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "service"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not (log.exists() and log.read_text().endswith("\n")):
            assert process.poll() is None
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        process.terminate()
        process.wait(timeout=60)
    seconds, *pairs = log.read_text().splitlines()[0].split()
    values = dict(pair.split("=") for pair in pairs)
    assert int(seconds) >= 0
    assert set(values) == FIELDS
    assert int(values["anon"]) > 0
    assert int(values["blocks"]) > 1_000
