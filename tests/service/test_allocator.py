"""The service's malloc: `python -m service` runs itself on jemalloc where it is installed (the
memory promise of docs/reliability.md rests on it), answers exactly as on the C library's
malloc, and leaves the choice to ``SENTIMENT_ALLOCATOR``. Its garbage collector: what a served
process holds for good is frozen out of collections, and still freed when replaced."""

from __future__ import annotations

import gc
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from service import allocator
from tests.service.conftest import RunningServer, service_process

needs_jemalloc = pytest.mark.skipif(
    allocator.jemalloc_library() is None,
    reason="jemalloc is not installed (Debian: libjemalloc2)",
)
# A process that asks for jemalloc and reports what it got.
PROBE = (
    "import os; from service import allocator; allocator.exec_on_jemalloc(); "
    "print(allocator.in_use(), os.environ.get('MALLOC_CONF'))"
)


def _probe(**env: str) -> str:
    unset = ("LD_PRELOAD", "SENTIMENT_ALLOCATOR", "MALLOC_CONF")
    base = {k: v for k, v in os.environ.items() if k not in unset}
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.strip()


@needs_jemalloc
def test_a_process_restarts_itself_on_jemalloc_once_with_the_services_settings():
    assert _probe() == f"jemalloc {allocator.JEMALLOC_CONF}"
    # An operator's own MALLOC_CONF wins.
    assert _probe(MALLOC_CONF="narenas:2") == "jemalloc narenas:2"


def test_the_setting_system_keeps_the_c_librarys_malloc():
    assert _probe(SENTIMENT_ALLOCATOR="system") == "system None"


@needs_jemalloc
def test_the_service_on_jemalloc_answers_as_on_the_c_librarys_malloc(trained_bundle: Path):
    body = {
        "inputs": ["a fine film", "dull and far too long " * 40, "a joy", "not good at all"],
        "truncate": True,
    }

    def scores(url: str) -> object:
        answer = httpx.post(f"{url}/predict", json=body, timeout=30)
        assert answer.status_code == 200, answer.text
        return answer.json()

    with service_process(trained_bundle, SENTIMENT_ALLOCATOR="system") as (process, url):
        assert "libjemalloc" not in Path(f"/proc/{process.pid}/maps").read_text()
        on_system = scores(url)
    with service_process(trained_bundle) as (process, url):
        assert "libjemalloc" in Path(f"/proc/{process.pid}/maps").read_text()
        on_jemalloc = scores(url)
        process.terminate()
        output, _ = process.communicate(timeout=30)
    assert on_jemalloc == on_system
    assert f"malloc: jemalloc (MALLOC_CONF={allocator.JEMALLOC_CONF})" in output
    assert "<jemalloc>" not in output  # jemalloc reports a bad MALLOC_CONF on stderr


def test_a_process_without_jemalloc_says_so_at_start(caplog: pytest.LogCaptureFixture):
    if allocator.in_use() == "jemalloc":
        pytest.skip("this test process itself runs on jemalloc")
    with caplog.at_level("INFO", logger="service.allocator"):
        allocator.report("jemalloc")
        allocator.report("system")
    wanted, chosen = caplog.records
    assert wanted.levelname == "WARNING"
    assert "jemalloc was not found" in wanted.getMessage()
    assert "apt-get install libjemalloc2" in wanted.getMessage()
    assert chosen.levelname == "INFO"
    assert "SENTIMENT_ALLOCATOR=system" in chosen.getMessage()


def test_a_served_process_freezes_its_long_lived_objects_and_a_test_process_does_not(
    trained_bundle: Path, server: RunningServer
):
    """If this fails, every full garbage collection of the serving process walks the model, the
    app and every module (237 ms on the shipped model, the event loop stopped): a thousand
    connections opened at once stalled /health for 220 ms. In a test's own process (the app
    on a thread) the collector is left as it is."""
    assert gc.get_freeze_count() == 0  # ``server`` runs create_app on a thread of this process
    with service_process(trained_bundle) as (process, _):
        os.killpg(process.pid, signal.SIGTERM)
        output = process.communicate(timeout=60)[0]
    frozen = [int(n) for n in re.findall(r"(\d+) long-lived objects left out", output)]
    assert frozen, output
    assert min(frozen) > 10_000  # every serving process: torch, the app, the model


FREED_AFTER_RELOAD = """
import gc, sys, weakref
from pathlib import Path
from service.allocator import freeze_long_lived, refreeze
from service.runtime import ModelRuntime
held = [ModelRuntime.load(Path(sys.argv[1]), "cpu")]
freeze_long_lived()
old = weakref.ref(held[0])
held[0] = ModelRuntime.load(Path(sys.argv[1]), "cpu")  # what a reload does
refreeze()
print(old() is None, gc.get_freeze_count())
"""


def test_a_frozen_model_replaced_by_a_reload_is_freed(trained_bundle: Path):
    """If this fails, each reload of a process that froze its heap keeps the previous model in
    memory for good."""
    result = subprocess.run(
        [sys.executable, "-c", FREED_AFTER_RELOAD, str(trained_bundle)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    freed, frozen = result.stdout.split()
    assert freed == "True"
    assert int(frozen) > 10_000
