"""``python -m service.oip.generate``: the gRPC messages and stubs (``predict_v2_pb2*.py``)
from ``predict_v2.proto``, with grpcio-tools (a dev dependency: the serving install imports
the generated files and needs only grpcio and protobuf)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = "service/oip/predict_v2.proto"


def generate(out: Path = ROOT) -> list[Path]:
    """Writes the generated files under ``out`` (as service/oip/...) and returns them."""
    from grpc_tools import protoc

    args = [
        "protoc",
        f"-I{ROOT}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        str(ROOT / PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    stem = out / "service" / "oip" / "predict_v2_pb2"
    return [stem.with_suffix(".py"), stem.with_suffix(".pyi"), Path(f"{stem}_grpc.py")]


if __name__ == "__main__":
    for path in generate():
        print(path.relative_to(ROOT), file=sys.stderr)
