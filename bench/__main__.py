"""``python -m bench``: the whole benchmark in one sitting (see ``bench.suite``).

    python -m bench --quick                 # < 10 minutes; writes .cache/bench/quick/
    python -m bench --out docs/benchmarks   # one full sitting
    python -m bench --sittings 3 --out DIR  # three in a row; DIR/verdicts.md judges issue 21's
                                            # targets on their medians
    python -m bench --device cuda --out DIR # a GPU sitting: more clients, batches of 512

Needs ``wrk`` (apt-get install wrk) and, for TorchServe, Java 17. The peers' virtual
environments are created on first use under the work folder; pip must find a CPU build of
torch (here PIP_FIND_LINKS does; elsewhere pass
--torch-pip-args="--index-url https://download.pytorch.org/whl/cpu").
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

from bench.limit import add_dtype_option
from bench.loadgen import wrk_available
from bench.report import write_verdicts
from bench.suite import FULL, GPU, QUICK, Options, run
from training.config import default_data_source


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short points, fewer reviews")
    parser.add_argument("--bundle", type=Path, default=Path("models/imdb-bigru"))
    parser.add_argument("--data", default=default_data_source())
    parser.add_argument("--out", type=Path, default=None, help="where results and plots go")
    parser.add_argument("--workdir", type=Path, default=Path(".cache/bench"))
    parser.add_argument(
        "--peers",
        default="litserve,torchserve,litserve-onnx,torchserve-onnx",
        help="comma-separated; empty for none. A '-onnx' peer runs the bundle's model.onnx in "
        "ONNX Runtime (skipped where the bundle has none or on CUDA), the others TorchScript",
    )
    parser.add_argument("--torch-pip-args", default="", help="extra pip arguments for torch")
    parser.add_argument(
        "--peer-python",
        action="append",
        default=[],
        metavar="PEER=PYTHON",
        help="a Python that already has PEER installed, used instead of creating its virtual "
        "environment (a machine with no package index); repeatable",
    )
    parser.add_argument(
        "--device", default="cpu", help="cpu, cuda or cuda:N: where every server and the limit run"
    )
    add_dtype_option(parser, "auto", "as SENTIMENT_DTYPE; every server serves what it resolves to")
    parser.add_argument(
        "--sittings",
        type=int,
        default=1,
        help="sittings in a row (each in OUT/sitting-N/); with more than one, OUT/verdicts.md "
        "judges the targets on their medians",
    )
    args = parser.parse_args(argv)
    peer_pythons = dict(choice.partition("=")[::2] for choice in args.peer_python)
    if not all(peer_pythons.values()):
        parser.error("--peer-python takes PEER=PYTHON")
    if not wrk_available():
        print("error: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    on_gpu = args.device != "cpu"
    plan = GPU if on_gpu else QUICK if args.quick else FULL
    if on_gpu and args.quick:
        plan = dataclasses.replace(GPU, reviews=1024, seconds=4, limit_seconds=1)
    kind = ("gpu-" if on_gpu else "") + ("quick" if args.quick else "full")
    out = args.out or args.workdir / kind
    command = "python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:])
    options = Options(
        bundle=args.bundle,
        data=args.data,
        out=out,
        workdir=args.workdir,
        plan=plan,
        peers=tuple(p for p in args.peers.split(",") if p),
        torch_pip_args=shlex.split(args.torch_pip_args),
        peer_pythons={peer: Path(python) for peer, python in peer_pythons.items()},
        command=command,
        device=args.device,
        dtype=args.dtype,
    )
    if args.sittings == 1:
        run(options)
        return 0
    sittings = [
        run(dataclasses.replace(options, out=out / f"sitting-{n}"))
        for n in range(1, args.sittings + 1)
    ]
    print(f"\ntargets over {args.sittings} sittings (medians):")
    print(write_verdicts(sittings, out, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
