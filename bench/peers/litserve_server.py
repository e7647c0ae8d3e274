"""LitServe serving our bundle with its own dynamic batching (run by ``bench.servers``).

BENCH_BUNDLE=models/imdb-bigru python bench/peers/litserve_server.py PORT MAX_BATCH WAIT_S
"""

# No `from __future__ import annotations`: LitServe reads decode_request's annotation at run
# time to build the request body type.
import os
import sys
from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np
import torch

sys.path.insert(0, os.environ["BENCH_REPO_ROOT"])
from service.runtime import ModelRuntime


class SentimentAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        if os.environ.get("BENCH_TORCH_THREADS"):
            torch.set_num_threads(int(os.environ["BENCH_TORCH_THREADS"]))
        self.runtime = ModelRuntime.load(
            Path(os.environ["BENCH_BUNDLE"]),
            os.environ.get("BENCH_DEVICE", "cpu"),
            os.environ.get("BENCH_DTYPE", "float32"),  # type: ignore[arg-type]
        )
        self.runtime.warmup()

    def decode_request(self, request: dict[str, Any]) -> np.ndarray:
        return self.runtime.preprocess([request["inputs"]])[0].ids

    def batch(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return inputs

    def predict(self, seqs: list[np.ndarray]) -> np.ndarray:
        return self.runtime.infer(seqs)

    def unbatch(self, output: np.ndarray) -> list[float]:
        return [float(x) for x in output]

    def encode_response(self, logit: float) -> list[dict[str, Any]]:
        return [{"label": k, "score": v} for k, v in self.runtime.postprocess(logit)]


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
