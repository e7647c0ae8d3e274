"""Where the service's time goes under load (issue 21): ``py-spy`` samples ``python -m service``
while ``wrk`` drives it with single-review requests at each client count, and every sampled
stack is put in one stage of the request's path.

    python -m bench.profile --out docs/benchmarks/profile      # 4, 16 and 64 clients

Per load: the load alone (what the sampler costs is then on record), then two recordings:
every running Python thread (where the CPU goes; torch's own OpenMP workers are not Python
threads and are not sampled, so "busy" undercounts the model) and only the thread holding the
GIL (``--gil``: how busy the one interpreter lock is, which caps everything in Python however
many cores there are). Idle threads are not sampled. Needs ``py-spy`` (``pip install py-spy``;
it reads the server's memory, so it runs as the server's user with ptrace allowed) and ``wrk``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from bench import servers
from bench.loadgen import LoadResult, run_wrk
from bench.workload import build
from training.config import default_data_source

# (stage, what marks it in a stack), the first match from the top of this list wins: a stack
# inside the model's call is the model's even though the batcher called it.
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("model (TorchScript forward)", ("runtime.py:infer", "(torch/", "libtorch")),
    ("tokenisation", ("runtime.py:preprocess", "runtime.py:tokenize", "tokenizers")),
    ("batching (queue, futures)", ("batcher.py",)),
    ("validation (pydantic)", ("pydantic",)),
    ("JSON encode/decode", ("json/", "orjson", "jsonable_encoder", "render")),
    ("metrics (prometheus_client)", ("prometheus_client",)),
    (
        "HTTP + routing (uvicorn, starlette, fastapi)",
        ("uvicorn", "h11", "httptools", "starlette", "fastapi"),
    ),
    ("asyncio loop, other", ("",)),
)


def stage_of(stack: str) -> str:
    for stage, marks in STAGES:
        if any(mark in stack for mark in marks):
            return stage
    raise AssertionError("the last stage matches every stack")


def _normalise(stack: str) -> str:
    """py-spy's raw frames read ``function (path/file.py:line)``; match on ``file.py:function``
    too, so marks like ``runtime.py:infer`` need no line numbers."""
    frames = []
    for frame in stack.split(";"):
        name, _, where = frame.partition(" (")
        file = where.split(":")[0].rsplit("/", 1)[-1]
        frames.append(f"{frame} {file}:{name}")
    return ";".join(frames)


def read_raw(path: Path) -> Counter[str]:
    """Samples per stage from py-spy's raw (collapsed-stack) output: ``stack count`` lines."""
    stages: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            stages[stage_of(_normalise(stack))] += int(count)
    return stages


def py_spy() -> str | None:
    """py-spy beside this interpreter (a virtual environment's bin/), else on the PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.is_file() else shutil.which("py-spy")


def record(pid: int, seconds: float, rate: int, gil: bool, native: bool, out: Path) -> None:
    command = [
        py_spy() or "py-spy",
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(round(seconds)),
        "--rate",
        str(rate),
        "--format",
        "raw",
        "--output",
        str(out),
    ]
    command += ["--gil"] if gil else []
    # Native frames need the process paused for each sample (py-spy refuses --nonblocking with
    # them): at 100 samples/s that costs the server a little throughput, reported beside.
    command += ["--native"] if native else ["--nonblocking"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"py-spy failed: {done.stderr.strip() or done.stdout.strip()}")


def _drive(url: str, bodies: Path, clients: int, seconds: float, into: list[LoadResult]) -> None:
    into.append(run_wrk(url, bodies, clients, seconds))


def profile_point(
    server: servers.Server, bodies: Path, clients: int, seconds: float, rate: int, native: bool
) -> dict[str, Any]:
    # The same load unprofiled first: what the sampler costs the server is then on record.
    alone = run_wrk(server.url, bodies, clients, seconds)
    point: dict[str, Any] = {
        "clients": clients,
        "unprofiled": {"requests_per_s": round(alone.ok_per_s, 1), "p50_ms": round(alone.p(50), 1)},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for kind, gil in (("cpu", False), ("gil", True)):
            raw = Path(tmp) / f"{kind}.txt"
            loads: list[LoadResult] = []
            # The load runs a little longer than the recording, so every sample sees full load.
            load = threading.Thread(
                target=_drive, args=(server.url, bodies, clients, seconds + 4, loads)
            )
            load.start()
            threading.Event().wait(2)
            record(server.pid, seconds, rate, gil, native, raw)
            load.join()
            stages = read_raw(raw)
            total = sum(stages.values())
            wall = rate * seconds  # samples one always-busy thread would give
            point[kind] = {
                "requests_per_s": round(loads[0].ok_per_s, 1),
                "p50_ms": round(loads[0].p(50), 1),
                "busy": round(total / wall, 2),  # cpu: cores' worth; gil: share of wall time held
                "stages": {s: round(n / total, 3) for s, n in stages.most_common()},
            }
    return point


def table(points: list[dict[str, Any]]) -> str:
    stages = [s for s, _ in STAGES]
    head = "| stage | " + " | ".join(f"{p['clients']} clients: CPU / GIL" for p in points) + " |"
    lines = [head, "|---|" + "---|" * len(points)]
    for stage in stages:
        shares = [
            (p["cpu"]["stages"].get(stage, 0), p["gil"]["stages"].get(stage, 0)) for p in points
        ]
        cells = [f"{100 * cpu:.0f}% / {100 * gil:.0f}%" for cpu, gil in shares]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines.append(
        "| **busy**: Python threads' CPU in cores (torch's OpenMP workers are not sampled) / "
        "share of time the GIL is held | "
        + " | ".join(f"{p['cpu']['busy']:.2f} / {100 * p['gil']['busy']:.0f}%" for p in points)
        + " |"
    )
    lines.append(
        "| requests/s unprofiled | "
        + " | ".join(f"{p['unprofiled']['requests_per_s']:.0f}" for p in points)
        + " |"
    )
    lines.append(
        "| requests/s during the CPU / GIL recordings | "
        + " | ".join(
            f"{p['cpu']['requests_per_s']:.0f} / {p['gil']['requests_per_s']:.0f}" for p in points
        )
        + " |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--bundle", type=Path, default=Path("models/imdb-bigru"))
    parser.add_argument("--data", default=default_data_source())
    parser.add_argument("--clients", default="4,16,64")
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--rate", type=int, default=50, help="samples per second")
    parser.add_argument(
        "--native",
        action="store_true",
        help="also unwind native frames (torch, tokenizers); py-spy then pauses the server at "
        "every sample, which on 2 cores cut its throughput by half or more (2026-11-24)",
    )
    parser.add_argument("--workdir", type=Path, default=Path(".cache/bench/profile"))
    parser.add_argument("--out", type=Path, default=Path(".cache/bench/profile"))
    args = parser.parse_args(argv)

    if py_spy() is None:
        print("error: py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 2
    work = build(args.data, Path(".cache"), args.workdir / "bodies", 2048)
    points = []
    with servers.ours(args.bundle, args.workdir, work.probe()) as server:
        run_wrk(server.url, work.single, 16, 4)  # warm-up
        for clients in (int(c) for c in args.clients.split(",")):
            point = profile_point(
                server, work.single, clients, args.seconds, args.rate, args.native
            )
            points.append(point)
            print(json.dumps(point), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    command = " ".join(sys.argv[1:] if argv is None else argv)
    report = {"command": f"python -m bench.profile {command}".strip(), "points": points}
    (args.out / "profile.json").write_text(json.dumps(report, indent=2) + "\n")
    print(table(points))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
