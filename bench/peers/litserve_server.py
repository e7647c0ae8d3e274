"""LitServe serving our bundle with its own dynamic batching (run by ``bench.servers``).

BENCH_BUNDLE=models/imdb-bigru python bench/peers/litserve_server.py PORT MAX_BATCH WAIT_S

BENCH_RUNTIME=onnx runs every batch on the bundle's model.onnx in ONNX Runtime instead of
TorchScript (``service.runtime``'s ONNX path, on the torch thread count it is given).
"""

# No `from __future__ import annotations`: LitServe reads decode_request's annotation at run
# time to build the request body type.
import os
import sys
from pathlib import Path
from typing import Any

import litserve as ls
import torch

sys.path.insert(0, os.environ["BENCH_REPO_ROOT"])
from service.runtime import Encoded, Execution, ModelRuntime


class SentimentAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        if os.environ.get("BENCH_TORCH_THREADS"):
            torch.set_num_threads(int(os.environ["BENCH_TORCH_THREADS"]))
        runtime = os.environ.get("BENCH_RUNTIME", "torchscript")
        self.runtime = ModelRuntime.load(
            Path(os.environ["BENCH_BUNDLE"]),
            os.environ.get("BENCH_DEVICE", "cpu"),
            os.environ.get("BENCH_DTYPE", "float32"),  # type: ignore[arg-type]
            runtime,  # type: ignore[arg-type]
        )
        self.how = Execution(onnx=runtime == "onnx")
        self.runtime.warmup([(1, self.how), (64, self.how)])

    def decode_request(self, request: dict[str, Any]) -> Encoded:
        return self.runtime.preprocess([request["inputs"]])[0]

    def batch(self, inputs: list[Encoded]) -> list[Encoded]:
        return inputs

    def predict(self, encoded: list[Encoded]) -> list[tuple[float, int]]:
        logits = self.runtime.infer([e.ids for e in encoded], self.how)
        # The token count travels with the logit: calibration has a temperature per length.
        return [(float(z), e.original_tokens) for z, e in zip(logits, encoded, strict=True)]

    def unbatch(self, output: list[tuple[float, int]]) -> list[tuple[float, int]]:
        return output

    def encode_response(self, scored: tuple[float, int]) -> list[dict[str, Any]]:
        return [{"label": k, "score": v} for k, v in self.runtime.postprocess(*scored)]


def main() -> None:
    port, max_batch, wait_s = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    batching = {"max_batch_size": max_batch, "batch_timeout": wait_s}
    try:  # litserve >= 0.2.11 takes batching on the API; older releases on the server
        api, server_kwargs = SentimentAPI(**batching), {}
    except TypeError:
        api, server_kwargs = SentimentAPI(), batching
    accelerator = "cuda" if os.environ.get("BENCH_DEVICE", "cpu").startswith("cuda") else "cpu"
    workers = int(os.environ.get("BENCH_WORKERS", "1"))
    server = ls.LitServer(api, accelerator=accelerator, workers_per_device=workers, **server_kwargs)
    # Access logs off, as in our server's benchmark configuration.
    run_kwargs: dict[str, Any] = {"port": port, "host": "127.0.0.1", "log_level": "warning"}
    try:
        server.run(**run_kwargs, generate_client_file=False)
    except TypeError:
        server.run(**run_kwargs)


if __name__ == "__main__":
    main()
