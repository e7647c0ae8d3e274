import ctypes.util
import glob
import logging
import os
import re
import time
from pathlib import Path

import httpx
import pytest

from service.allocator import can_release, limit_arenas, release_free_memory
from tests.service.conftest import serve, service_process

ROOT = Path(__file__).resolve().parents[2]
# Where the Makefile's serve target looks for it.
JEMALLOC = next(
    iter(
        glob.glob("/usr/lib/*/libjemalloc.so.2")
        + glob.glob("/usr/lib64/libjemalloc.so.2")
        + glob.glob("/usr/lib/libjemalloc.so.2")
    ),
    None,
)

glibc = pytest.mark.skipif(
    ctypes.util.find_library("c") is None or "libc.so.6" not in ctypes.util.find_library("c"),
    reason="glibc only",
)


@glibc
def test_the_arena_cap_is_applied_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert limit_arenas(2) is True


def test_malloc_arena_max_from_the_environment_wins(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    with caplog.at_level(logging.INFO, logger="service.allocator"):
        assert limit_arenas(2) is False
    assert "MALLOC_ARENA_MAX=4 from the environment" in caplog.text


def test_a_preloaded_allocator_is_left_alone(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    with caplog.at_level(logging.INFO, logger="service.allocator"):
        assert limit_arenas(2) is False
    assert "jemalloc is preloaded" in caplog.text
    assert can_release() is False


def resident_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


@glibc
def test_freed_memory_below_a_live_block_goes_back_to_the_kernel() -> None:
    # 200 MB of 100 kB blocks (below glibc's mmap threshold, so on the heap); the last one
    # stays alive, so free() alone cannot shrink the heap below it.
    blocks = [b"x" * 100_000 for _ in range(2000)]
    pinned = blocks[-1]
    del blocks
    before = resident_mb()
    assert release_free_memory() is True
    assert before - resident_mb() > 150
    assert len(pinned) == 100_000


@glibc
def test_the_server_hands_free_memory_back_on_its_inference_thread(
    trained_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="service.allocator"):
        with serve(trained_bundle, malloc_trim_interval_s=0.05) as server, server.client() as c:
            assert c.post("/predict", json={"inputs": "a fine film"}).status_code == 200
            time.sleep(0.5)
        during = len(caplog.records)
        time.sleep(0.2)
    trims = [r for r in caplog.records if r.getMessage().startswith("malloc_trim")]
    assert len(trims) >= 3
    assert {r.threadName.split("_")[0] for r in trims} == {"inference"}
    assert len(caplog.records) == during  # stopped with the server


@pytest.mark.skipif(JEMALLOC is None, reason="jemalloc is not installed (Debian: libjemalloc2)")
def test_the_service_on_jemalloc_with_the_containers_settings_answers_as_on_glibc(
    trained_bundle: Path,
) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"LD_PRELOAD=\S*libjemalloc", dockerfile)
    malloc_conf = "".join(re.findall(r"MALLOC_CONF=(\S+)", dockerfile))  # none: its defaults
    body = {
        "inputs": ["a fine film", "dull and far too long " * 40, "a joy", "not good at all"],
        "truncate": True,
    }

    def scores(url: str) -> list[list[dict[str, object]]]:
        answer = httpx.post(f"{url}/predict", json=body, timeout=30)
        assert answer.status_code == 200, answer.text
        result: list[list[dict[str, object]]] = answer.json()
        return result

    with service_process(trained_bundle, LD_PRELOAD="") as (_, url):
        on_glibc = scores(url)
    with service_process(trained_bundle, LD_PRELOAD=JEMALLOC, MALLOC_CONF=malloc_conf) as (
        process,
        url,
    ):
        assert "libjemalloc" in Path(f"/proc/{process.pid}/maps").read_text()
        on_jemalloc = scores(url)
        process.terminate()
        output, _ = process.communicate(timeout=30)
    assert on_jemalloc == on_glibc
    assert "jemalloc is preloaded" in output
    assert "<jemalloc>" not in output  # jemalloc reports a bad MALLOC_CONF on stderr
