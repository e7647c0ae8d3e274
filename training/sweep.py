"""Train several recipes side by side from one prepared folder and pick one on validation.

    python -m training.sweep --prepared DIR --out DIR [--parallel 8] [--deadline-s 500] \\
        [--sentences FILE] NAME="--train options" ...

Each run is ``python -m training train --prepared DIR --models-dir OUT/runs --name NAME`` plus
its options, its log in ``OUT/NAME.log``. Built for a lent GPU, where several small RNNs share
the device far better than one does alone; on a CPU, use ``--parallel 1``.

The pick is made on validation only, by the rule of issue 20: the highest accuracy on the
short-text validation split among the runs within ``--review-slack`` (0.3 points) of the best
accuracy on validation reviews. The test and sentence-file figures are printed beside it and
play no part in the pick.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--deadline-s", type=float, default=None, help="stop unfinished runs")
    parser.add_argument("--sentences", type=Path, default=None)
    parser.add_argument("--review-slack", type=float, default=0.003)
    parser.add_argument("runs", nargs="+", metavar='NAME="OPTIONS"')
    args = parser.parse_args(argv)

    runs = dict(run.split("=", 1) for run in args.runs)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    pending = list(runs)
    active: dict[str, subprocess.Popen[bytes]] = {}
    while pending or active:
        while pending and len(active) < args.parallel:
            name = pending.pop(0)
            active[name] = _start(name, runs[name], args)
        for name, process in list(active.items()):
            if process.poll() is not None:
                print(f"{name}: exit {process.returncode}", flush=True)
                del active[name]
        if args.deadline_s and time.monotonic() - started > args.deadline_s:
            for name, process in active.items():
                process.kill()
                print(f"{name}: stopped at the deadline", flush=True)
            break
        time.sleep(1)

    rows = [_row(name, runs[name], args.out) for name in runs]
    chosen = pick(rows, args.review_slack)
    summary = {"rule": __doc__.split("The pick")[1].strip(), "chosen": chosen, "runs": rows}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table(rows, chosen))
    return 0 if chosen else 1


def _start(name: str, options: str, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-m",
        "training",
        "train",
        "--prepared",
        str(args.prepared),
        "--models-dir",
        str(args.out / "runs"),
        "--name",
        name,
        *(["--sentences", str(args.sentences)] if args.sentences else []),
        *shlex.split(options),
    ]
    log = (args.out / f"{name}.log").open("wb")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def _row(name: str, options: str, out: Path) -> dict[str, Any]:
    card_path = out / "runs" / name / "card.json"
    if not card_path.is_file():
        return {"name": name, "options": options, "finished": False}
    card = json.loads(card_path.read_text())
    metrics = card["metrics"]
    return {
        "name": name,
        "options": options,
        "finished": True,
        "chosen_weights": card["training"]["best_epoch"],
        "minutes": round(card["training"]["seconds"] / 60, 1),
        **{f"{split}_accuracy": figures["accuracy"] for split, figures in metrics.items()},
        "test_ece": metrics["test"]["ece"],
        "history": card["training"]["history"],
    }


def pick(rows: list[dict[str, Any]], slack: float) -> str | None:
    done = [r for r in rows if r["finished"]]
    if not done:
        return None
    best_reviews = max(r["validation_accuracy"] for r in done)
    eligible = [r for r in done if r["validation_accuracy"] >= best_reviews - slack]
    return str(max(eligible, key=lambda r: r.get("validation_short_accuracy", 0.0))["name"])


def table(rows: list[dict[str, Any]], chosen: str | None) -> str:
    columns = ("validation", "validation_short", "test", "sentences")
    lines = ["| run | options | " + " | ".join(columns) + " | test ECE | minutes |"]
    lines.append("|" + "---|" * (len(columns) + 4))
    for r in rows:
        mark = " (chosen)" if r["name"] == chosen else ""
        if not r["finished"]:
            lines.append(f"| {r['name']} | `{r['options']}` | not finished |")
            continue
        figures = " | ".join(f"{100 * r.get(c + '_accuracy', float('nan')):.2f}" for c in columns)
        lines.append(
            f"| {r['name']}{mark} | `{r['options']}` | {figures} | {r['test_ece']:.4f} | "
            f"{r['minutes']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
