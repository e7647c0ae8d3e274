"""This checkout's server against an earlier commit's, at saturation, in one sitting.

    python -m bench.compare --ref 596acbc --rounds 3 --seconds 30 \\
        --ref-env LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 --json out.json

The earlier commit is checked out as a git worktree under the work folder; each side runs
``python -m service`` from its own tree on its own shipped model (``models/<name>`` of that
tree, so bundle formats never cross), started afresh in every round. Rounds alternate the
order, so a slow spell of the machine hits both sides; the verdict is the ratio of the medians
of requests/s answered 200 under 256 closed-loop wrk clients on real IMDb test reviews.
``--ref-env`` gives the earlier side the environment its users ran it with (e.g. the
``LD_PRELOAD`` that ``make serve`` set before the service chose its malloc itself).

``--ref .`` compares this checkout with itself, the sides differing only by ``--env`` and
``--ref-env`` (settings) or ``--policy`` and ``--ref-policy`` (the scheduler's levers, as
``python -m bench.serve`` takes them): one lever measured alone. ``--clients 4,16,64``
measures each client count in turn on each started server (the verdict is then a ratio per
count):

    python -m bench.compare --ref . --clients 1,4,16 --seconds 15 --ref-policy "--no-fork"
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path
from typing import Any

from bench import servers
from bench.loadgen import run_wrk
from bench.workload import build
from training.config import default_data_source

REPO_ROOT = servers.REPO_ROOT
CLIENTS = "256"  # where our throughput peaks (docs/benchmarks.md)


def worktree(ref: str, workdir: Path) -> Path:
    """A checkout of ``ref`` (created once, reused); ``.`` is this checkout."""
    if ref == ".":
        return REPO_ROOT
    sha = subprocess.run(
        ["git", "rev-parse", "--short", ref], cwd=REPO_ROOT, capture_output=True, text=True
    ).stdout.strip()
    if not sha:
        raise SystemExit(f"unknown git ref {ref!r}")
    tree = (workdir / f"ref-{sha}").resolve()
    if not tree.exists():
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(tree), sha], cwd=REPO_ROOT, check=True
        )
    return tree


def saturation(
    tree: Path,
    model: str,
    env: dict[str, str],
    policy: list[str],
    bodies: Path,
    probe: bytes,
    args: argparse.Namespace,
    label: str,
) -> dict[str, Any]:
    workdir = args.workdir / "compare" / tree.name
    points = {}
    bundle = tree / "models" / model
    with servers.ours(
        bundle, workdir, probe, source=tree, extra_env=env, name=tree.name, policy=policy
    ) as server:
        run_wrk(server.url, bodies, 16, args.warmup)  # warm caches and allocators
        for clients in args.clients:
            result = run_wrk(server.url, bodies, clients, args.seconds)
            points[clients] = {
                "requests_per_s": round(result.ok_per_s, 1),
                "load": result.summary(),
            }
            print(
                f"  {label:<20} {clients:>4} clients {result.ok_per_s:8.1f} requests/s  "
                f"p99 {result.p(99):7.1f} ms",
                flush=True,
            )
        allocator = "jemalloc" if servers.maps_jemalloc(server.pid) else "system"
    return {"allocator": allocator, "points": points}


def compare(args: argparse.Namespace) -> dict[str, Any]:
    work = build(args.data, Path(".cache"), args.workdir / "bodies", args.reviews)
    sides = {
        "this checkout": (REPO_ROOT, dict(args.env), args.policy.split()),
        f"ref {args.ref}": (
            worktree(args.ref, args.workdir),
            dict(args.ref_env),
            args.ref_policy.split(),
        ),
    }
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    for i in range(args.rounds):
        order = list(sides) if i % 2 == 0 else list(reversed(sides))
        print(f"round {i + 1}: {' then '.join(order)}", flush=True)
        for name in order:
            tree, env, policy = sides[name]
            rounds[name].append(
                saturation(tree, args.model, env, policy, work.single, work.probe(), args, name)
            )
    medians = {
        name: {
            clients: statistics.median(r["points"][clients]["requests_per_s"] for r in results)
            for clients in args.clients
        }
        for name, results in rounds.items()
    }
    mine, theirs = medians["this checkout"], medians[f"ref {args.ref}"]
    ratios = {c: round(mine[c] / max(theirs[c], 1e-9), 3) for c in args.clients}
    return {
        "ref": args.ref,
        "env": dict(args.env),
        "ref_env": dict(args.ref_env),
        "policy": args.policy,
        "ref_policy": args.ref_policy,
        "clients": args.clients,
        "seconds": args.seconds,
        "rounds": rounds,
        "medians_per_s": medians,
        "ratios": ratios,
        "ratio": ratios[args.clients[-1]],  # at the highest count
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ref", required=True, help="git commit or tag to compare with")
    parser.add_argument("--model", default="imdb-bigru", help="bundle name in each tree")
    for flag, whose in (("--env", "this checkout's"), ("--ref-env", "the earlier commit's")):
        parser.add_argument(
            flag,
            action="append",
            default=[],
            type=lambda kv: tuple(kv.split("=", 1)),
            help=f"KEY=VALUE for {whose} server (repeatable)",
        )
    for flag, whose in (("--policy", "this checkout's"), ("--ref-policy", "the earlier commit's")):
        parser.add_argument(
            flag, default="", help=f"python -m bench.serve's flags for {whose} server, quoted"
        )
    parser.add_argument("--data", default=default_data_source())
    parser.add_argument("--reviews", type=int, default=2000)
    parser.add_argument(
        "--clients",
        default=CLIENTS,
        type=lambda text: [int(c) for c in text.split(",")],
        help="closed-loop wrk clients, comma-separated; each measured in turn",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--workdir", type=Path, default=Path(".cache/bench"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    result = compare(args)
    print(json.dumps({k: result[k] for k in ("medians_per_s", "ratios")}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
