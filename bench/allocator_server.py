"""Malloc settings compared at the server: saturation of ``python -m service`` under each.

    python -m bench.allocator_server --rounds 3 --seconds 30 \
        --json docs/reliability/allocator-server.json

``bench.allocator`` times the model in-process on batches of 1 to 64 texts; at saturation the
server runs mostly full batches, and request handling shares the allocator, so the cost of a
setting there can differ. Each round starts the server once per setting (interleaved, so a slow
spell of the machine hits them all alike) and drives it with 256 closed-loop wrk clients on
real IMDb test reviews, as the soak's calibration does. Settings: glibc as the service tunes it
(two arenas, ``malloc_trim`` every 5 s), jemalloc at its defaults, and jemalloc with
``oversize_threshold:0``; the jemalloc ones are skipped where it is not
installed (Debian: libjemalloc2).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from bench import servers
from bench.allocator import JEMALLOC
from bench.loadgen import run_wrk
from bench.workload import build
from training.config import default_data_source

SETTINGS: dict[str, dict[str, str]] = {"glibc, as the service tunes it": {"LD_PRELOAD": ""}}
if JEMALLOC:
    SETTINGS["jemalloc (its defaults)"] = {"LD_PRELOAD": JEMALLOC, "MALLOC_CONF": ""}
    SETTINGS["jemalloc, oversize_threshold:0"] = {
        "LD_PRELOAD": JEMALLOC,
        "MALLOC_CONF": "oversize_threshold:0",
    }
CLIENTS = 256  # where our throughput peaks (docs/benchmarks.md)


def compare(args: argparse.Namespace) -> dict[str, Any]:
    workdir = args.cache_dir / "bench" / "allocator_server"
    work = build(args.data, args.cache_dir, workdir / "bodies", args.reviews)
    probe = b'{"inputs": "A wonderful, moving film."}'
    rates: dict[str, list[float]] = {name: [] for name in SETTINGS}
    mapped: dict[str, set[str]] = {name: set() for name in SETTINGS}
    for round_ in range(1, args.rounds + 1):
        for name, env in SETTINGS.items():
            with servers.ours(args.bundle, workdir, probe, extra_env=env) as server:
                maps = Path(f"/proc/{server.pid}/maps").read_text()
                mapped[name].add("jemalloc" if "libjemalloc" in maps else "glibc")
                load = run_wrk(server.url, work.single, CLIENTS, args.seconds)
            rates[name].append(round(load.ok_per_s, 1))
            print(f"round {round_}: {name}: {load.ok_per_s:.1f} requests/s", flush=True)
    baseline = statistics.median(rates[next(iter(SETTINGS))])
    return {
        "clients": CLIENTS,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "settings": {
            name: {
                "requests_per_s": done,
                "median_per_s": statistics.median(done),
                "vs_glibc": round(statistics.median(done) / baseline, 2),
                "allocator_mapped": sorted(mapped[name]),  # what the server process loaded
            }
            for name, done in rates.items()
        },
    }


def table(report: dict[str, Any]) -> str:
    lines = [
        f"| setting | requests/s at {report['clients']} clients, each round | median | vs glibc |",
        "|---|---|---|---|",
    ]
    for name, run in report["settings"].items():
        rounds = ", ".join(f"{r:.1f}" for r in run["requests_per_s"])
        lines.append(f"| {name} | {rounds} | {run['median_per_s']:.1f} | {run['vs_glibc']:.2f}x |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, default=Path("models/imdb-bigru"))
    parser.add_argument("--data", default=default_data_source())
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=30.0, help="wrk run per server")
    parser.add_argument("--reviews", type=int, default=2000, help="test reviews sent")
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    report = compare(args)
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
