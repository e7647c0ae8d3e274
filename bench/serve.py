"""``python -m service`` with the scheduler's levers set otherwise: how the benchmarks measure a
lever against the service's choice. Settings come from the environment as for the service;
the levers are not settings (an operator has no reason to move them), so they are flags here,
passed in-process as a ``service.scheduler.Policy``:

    python -m bench.serve --workers 1 --no-fork
    python -m bench.compare --ref . --clients 1,4,16 --policy "--no-fork"
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from service.scheduler import Policy


def policy_from(argv: Sequence[str] | None = None) -> Policy:
    """The policy the flags describe; a lever not given keeps the service's value."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workers", type=int, help="batches side by side (Policy.workers)")
    parser.add_argument(
        "--step-texts", type=float, help="the cost model's step cost in texts; 0: no cost model"
    )
    parser.add_argument("--no-fork", action="store_true", help="never fork a lone batch")
    parser.add_argument("--explain-share", type=float, help="explanations' most share")
    args = parser.parse_args(argv)
    levers = {
        "workers": args.workers,
        "step_texts": args.step_texts,
        "explain_share": args.explain_share,
    }
    return Policy(fork=not args.no_fork, **{k: v for k, v in levers.items() if v is not None})


def main(argv: Sequence[str] | None = None) -> int:
    from service.__main__ import main as serve

    return serve([], policy_from(argv))


if __name__ == "__main__":
    raise SystemExit(main())
