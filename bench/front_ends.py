"""Several service processes sharing one device: what N front ends sustain together.

    python -m bench.front_ends --device cuda --processes 1,2,4 --clients 64 --texts 1,64

One ``python -m service`` answers a GPU's work from one event loop and one tokenising pool, and
on a GPU those, not the model, set its ceiling (docs/benchmarks.md, "GPU"). This starts N
independent processes on one device, each driven by its own wrk at the same load, and sums what
they answer: the ceiling several front ends (replicas sharing the GPU, or uvicorn workers) would
reach. Requests are real IMDb test reviews, single or ``--texts`` per request.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench import servers
from bench.loadgen import run_wrk
from bench.workload import build
from training.config import default_data_source


def measure(
    bundle: Path,
    device: str,
    processes: int,
    clients: int,
    seconds: float,
    bodies: Path,
    texts_per_request: int,
    workdir: Path,
    probe: bytes,
    env: dict[str, str],
) -> dict[str, Any]:
    """Start ``processes`` servers, load each with ``clients`` connections at once, sum."""
    with ExitStack() as stack:
        running = [
            stack.enter_context(
                servers.ours(
                    bundle,
                    workdir / f"p{n}",
                    probe,
                    max_batch_size=int(env["SENTIMENT_MAX_BATCH_SIZE"]),
                    name=f"ours-{n}",
                    extra_env={"SENTIMENT_DEVICE": device, **env},
                )
            )
            for n in range(processes)
        ]
        with ThreadPoolExecutor(processes) as pool:
            list(pool.map(lambda s: run_wrk(s.url, bodies, 16, 2, texts_per_request), running))
            results = list(
                pool.map(
                    lambda s: run_wrk(s.url, bodies, clients, seconds, texts_per_request), running
                )
            )
    texts = sum(r.texts_per_s for r in results)
    failed = sum(v for r in results for k, v in r.statuses.items() if k != "2xx")
    row = {
        "processes": processes,
        "clients_each": clients,
        "texts_per_request": texts_per_request,
        "texts_per_s": round(texts, 1),
        "requests_per_s": round(sum(r.ok_per_s for r in results), 1),
        "p50_ms_worst": round(max(r.p(50) for r in results), 2),
        "p99_ms_worst": round(max(r.p(99) for r in results), 2),
        "not_200": failed,
    }
    print(
        f"  {processes} process(es) x {clients} clients, {texts_per_request} text(s)/request: "
        f"{row['texts_per_s']:9.1f} texts/s, {row['requests_per_s']:8.1f} requests/s, "
        f"p99 <= {row['p99_ms_worst']} ms, not 200: {failed}",
        flush=True,
    )
    return row


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, default=Path("models/imdb-bigru"))
    parser.add_argument("--data", default=default_data_source())
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--processes", default="1,2,4")
    parser.add_argument(
        "--clients", type=int, default=64, help="connections per process, single texts"
    )
    parser.add_argument(
        "--batched-clients",
        type=int,
        default=16,
        help="connections per process with several texts per request (16 x 64 texts fill "
        "about two batches of 512, inside the queue bound)",
    )
    parser.add_argument("--texts", default="1,64", help="texts per request, each a run")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--reviews", type=int, default=2048)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    # Each process as docker-compose.gpu.yml configures one; the processes here are separate
    # servers, each under its own load, so none runs processes of its own.
    env = servers.gpu_compose_env() | {"SENTIMENT_PROCESSES": "1"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for texts in (int(t) for t in args.texts.split(",")):
            work = build(
                args.data, args.cache_dir, workdir / f"w{texts}", args.reviews, 0, max(texts, 2)
            )
            bodies = work.single if texts == 1 else work.batched
            for processes in (int(p) for p in args.processes.split(",")):
                rows.append(
                    measure(
                        args.bundle,
                        args.device,
                        processes,
                        args.clients if texts == 1 else args.batched_clients,
                        args.seconds,
                        bodies,
                        texts,
                        workdir,
                        work.probe(),
                        env,
                    )
                )
    if args.json:
        result = {"argv": argv, "device": args.device, "rows": rows}
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
