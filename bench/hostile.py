"""The hostile clients of issue 32, rerun against ``python -m service`` on the shipped model:
for each attack the statuses it got, the process's resident memory before, at its peak and
after, and the slowest ``/health`` answer while it ran (polled every 50 ms).

    python -m bench.hostile --out docs/reliability/hostile.json

The process starts with an open-file soft limit of 1024, as many container runtimes leave it
(it raises its own to the hard limit). Attack sizes are the issue's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from bench.servers import answers, free_port, rss_mb, wait_until_ready


class Watch:
    """RSS and /health latency, sampled every 50 ms while an attack runs, from a process of its
    own (as a liveness probe is): in a thread of this one it would time this process's own GIL
    too, held by the attack's threads while they encode 2 MB bodies."""

    def __init__(self, pid: int, url: str) -> None:
        context = multiprocessing.get_context("spawn")
        self._peak_mb = context.Value("d", 0.0)
        self._slowest_ms = context.Value("d", 0.0)
        self._failures = context.Value("i", 0)
        self._sampling, self._stop = context.Event(), context.Event()
        shared = (self._peak_mb, self._slowest_ms, self._failures, self._sampling, self._stop)
        self._process = context.Process(target=_watch, args=(pid, url, *shared), daemon=True)

    @property
    def peak_mb(self) -> float:
        return float(self._peak_mb.value)

    @property
    def slowest_ms(self) -> float:
        return float(self._slowest_ms.value)

    @property
    def health_failures(self) -> int:
        return int(self._failures.value)

    @contextlib.contextmanager
    def during(self) -> Iterator[Watch]:
        self._process.start()
        if not self._sampling.wait(timeout=60):
            raise RuntimeError("the /health watcher did not start")
        try:
            yield self
        finally:
            self._stop.set()
            self._process.join()


def _watch(
    pid: int, url: str, peak_mb: Any, slowest_ms: Any, failures: Any, sampling: Any, stop: Any
) -> None:
    with httpx.Client(timeout=5) as client:
        while not stop.is_set():
            peak_mb.value = max(peak_mb.value, rss_mb(pid))
            started = time.perf_counter()
            try:
                ok = client.get(f"{url}/health").status_code == 200
            except httpx.HTTPError:
                ok = False
            slowest_ms.value = max(slowest_ms.value, (time.perf_counter() - started) * 1e3)
            failures.value += not ok
            sampling.set()
            time.sleep(0.05)


def _status(answer: bytes) -> str:
    return answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/1.1 ") else "closed"


def header_bomb(port: int, url: str) -> list[str]:
    """50 connections at once, each sending an unterminated 16 MB header."""

    def one() -> str:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Bomb: ")
            with contextlib.suppress(OSError):
                for _ in range(256):
                    sock.sendall(b"a" * 65536)
            with contextlib.suppress(OSError):
                return _status(sock.recv(100))
        return "closed"

    return _in_threads(one, 50)


def stalled(port: int, url: str) -> list[str]:
    """1,100 connections with no request, half a head or half a body, held past the read
    timeout; what each got."""
    heads = [b"", b"POST /predict HTTP/1.1\r\nHost: x\r\nX-Half: "]
    heads.append(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{")
    sockets = []
    for i in range(1100):
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        except OSError:
            break
        sock.sendall(heads[i % 3])
        sockets.append(sock)
    statuses = []
    for sock in sockets:
        with contextlib.suppress(OSError):
            statuses.append(_status(sock.recv(100)))
        sock.close()
    return statuses


def huge_explanations(port: int, url: str) -> list[str]:
    """Eight /explain at once of a 2 MB text of "a " (990,000 tokens), truncated."""
    text = "a " * 990_000

    def one() -> str:
        answer = httpx.post(f"{url}/explain", json={"inputs": text, "truncate": True}, timeout=120)
        return f"{answer.status_code} ({len(answer.content)} bytes)"

    return _in_threads(one, 8)


def pipelined_then_gone(port: int, url: str) -> list[str]:
    """Five clients that pipeline three requests each and close; the backend failures counted."""
    body = b'{"inputs": "a fine film"}'
    request = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    request += b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(request * 3)
    time.sleep(1)
    text = httpx.get(f"{url}/metrics").text
    backend = [line for line in text.splitlines() if 'reason="backend"' in line]
    return [f"backend failures: {backend or 'none'}"]


def _in_threads(work: Callable[[], str], count: int) -> list[str]:
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(work())) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


ATTACKS = {
    "header bomb: 50 x 16 MB unterminated header": header_bomb,
    "1,100 stalled connections (none, half a head, half a body)": stalled,
    "8 x /explain of a 2 MB text, truncated": huge_explanations,
    "pipelined requests, then the client closes": pipelined_then_gone,
}


def run(bundle: Path, only: str = "") -> list[dict[str, Any]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        "SENTIMENT_MODEL_DIR": str(bundle.parent.resolve()),
        "SENTIMENT_MODEL_NAME": bundle.name,
        "SENTIMENT_PORT": str(port),
        "SENTIMENT_LOG_LEVEL": "warning",
    }

    def low_open_files() -> None:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))

    process = subprocess.Popen(
        [sys.executable, "-m", "service"], env={**os.environ, **env}, preexec_fn=low_open_files
    )
    rows = []
    try:
        wait_until_ready(
            lambda: answers("GET", f"{url}/ready"),
            lambda: process.poll() is None,
            timeout_s=120,
            what="python -m service",
        )
        for name, attack in ATTACKS.items():
            if only not in name:
                continue
            time.sleep(2)
            idle = rss_mb(process.pid)
            with Watch(process.pid, url).during() as watch:
                statuses = attack(port, url)
            time.sleep(12)  # past the read timeout and the allocator's decay
            row = {
                "attack": name,
                "statuses": dict(Counter(statuses)),
                "rss_mb": {"idle": idle, "peak": watch.peak_mb, "after": rss_mb(process.pid)},
                "health_slowest_ms": round(watch.slowest_ms, 1),
                "health_failures": watch.health_failures,
                "alive": process.poll() is None,
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        process.terminate()
        process.wait(timeout=90)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__)
    parser.add_argument("--bundle", type=Path, default=Path("models/imdb-bigru"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--only", default="", help="the attacks whose name holds this text")
    args = parser.parse_args(argv)
    rows = run(args.bundle, args.only)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
