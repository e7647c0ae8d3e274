import ctypes.util
import logging

import pytest

from service.allocator import limit_arenas

glibc = pytest.mark.skipif(
    ctypes.util.find_library("c") is None or "libc.so.6" not in ctypes.util.find_library("c"),
    reason="glibc only",
)


@glibc
def test_the_arena_cap_is_applied_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert limit_arenas(2) is True


def test_malloc_arena_max_from_the_environment_wins(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    with caplog.at_level(logging.INFO, logger="service.allocator"):
        assert limit_arenas(2) is False
    assert "MALLOC_ARENA_MAX=4 from the environment" in caplog.text
