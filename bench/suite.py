"""One benchmark sitting: the model's in-process limit and CPU levers, then our server, our
server without batching, LitServe and TorchServe under the same closed-loop sweep of wrk
clients, then the ratio table (``bench.report``). On a GPU (``Options.device``) every server
and the limit run there, and the CPU levers (torch threads, int8) are left out."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from bench import limit, report, servers
from bench.loadgen import LoadResult, run_wrk
from bench.workload import Workload, build
from service.bundle import ONNX_FILE, PrecisionChoice
from service.runtime import ModelRuntime


@dataclass(frozen=True)
class Plan:
    reviews: int  # distinct test reviews the clients send
    seconds: float  # per load point
    warmup_seconds: float  # per server, before its first point
    concurrency: tuple[int, ...]
    limit_batch_sizes: tuple[int, ...]
    limit_seconds: float
    lever_reviews: int  # reviews scored by float32 and int8 for the accuracy change
    batched_clients: int = 8  # 8 x 32 texts in flight, well inside the default queue bound
    texts_per_request: int = 32  # of the batched requests
    cpu_levers: bool = True  # torch threads and int8: levers of a CPU service only
    max_batch_size: int = 64  # ours and the peers alike


QUICK = Plan(512, 4, 2, (1, 4, 16, 64, 256), (1, 16, 64, 128), 2, 1000)
FULL = Plan(2048, 15, 4, (1, 4, 16, 64, 256), (1, 16, 64, 128, 256), 5, 5000)
# A GPU answers thousands of reviews a second: more distinct reviews, more clients, batches of
# up to 512 in the servers and up to 1,024 in-process (issue 17's sitting).
GPU = Plan(
    4096,
    15,
    4,
    (1, 4, 16, 64, 256, 1024),
    (1, 16, 64, 256, 512, 1024),
    3,
    0,
    batched_clients=16,  # 16 x 64 texts: two batches of 512 in flight, inside the queue bound
    texts_per_request=64,
    cpu_levers=False,
    max_batch_size=512,
)


@dataclass
class Options:
    bundle: Path
    data: str
    out: Path
    workdir: Path
    plan: Plan
    cache_dir: Path = Path(".cache")  # where the IMDb data is read and cached
    peers: tuple[str, ...] = ("litserve", "torchserve", "litserve-onnx", "torchserve-onnx")
    torch_pip_args: list[str] = field(default_factory=list)
    peer_pythons: dict[str, Path] = field(default_factory=dict)  # instead of their venvs
    peer_max_wait_ms: float = 2.0  # their batch timeout; ours runs with its own default
    command: str = ""
    device: str = "cpu"  # where every server and the in-process limit run
    dtype: PrecisionChoice = "auto"  # resolved at the start of a sitting

    def ours_env(self) -> dict[str, str]:
        env = {"SENTIMENT_DEVICE": self.device, "SENTIMENT_DTYPE": self.dtype}
        if self.device != "cpu":
            # As deployed on a GPU: batches, queue, tokenising threads and processes.
            env |= servers.gpu_compose_env()
        return env


def _sweep(name: str, server: servers.Server, work: Workload, plan: Plan) -> dict[str, Any]:
    run_wrk(server.url, work.single, 16, plan.warmup_seconds)  # warm caches and allocators
    points = []
    for clients in plan.concurrency:
        result = run_wrk(server.url, work.single, clients, plan.seconds)
        points.append(result.summary())
        _say(name, f"{clients:>3} clients", result)
    return {"single": points}


def _say(name: str, what: str, result: LoadResult) -> None:
    bad = {k: v for k, v in result.statuses.items() if k != "2xx"}
    print(
        f"  {name:<15} {what:<22} {result.texts_per_s:8.1f} texts/s  "
        f"p50 {result.p(50):7.1f} ms  p99 {result.p(99):7.1f} ms"
        + (f"  NOT 200: {bad}" if bad else "")
        + (f"  socket errors: {result.socket_errors}" if result.socket_errors else ""),
        flush=True,
    )


ServerFactory = Callable[[], AbstractContextManager[servers.Server]]


def _ours(options: Options, probe: bytes) -> list[tuple[str, ServerFactory]]:
    wd, bundle, batch = options.workdir, options.bundle, options.plan.max_batch_size
    serve = partial(servers.ours, bundle, extra_env=options.ours_env())
    configs: list[tuple[str, ServerFactory]] = [
        ("ours", partial(serve, wd / "ours", probe, batch)),
        ("ours-unbatched", partial(serve, wd / "unbatched", probe, 1, name="ours-unbatched")),
    ]
    if options.plan.cpu_levers:
        # The threads lever in the server, where HTTP, tokenising and wrk want a core too.
        configs.append(
            ("ours-1thread", partial(serve, wd / "1thread", probe, batch, 1, "ours-1thread"))
        )
    return configs


def _peers(
    options: Options, probe: bytes, threads: int | None, workers: int
) -> tuple[list[tuple[str, ServerFactory]], dict[str, str]]:
    """The peers, with the batching, model workers and torch threads of our best configuration,
    and their package versions."""
    wd, bundle, batch = options.workdir, options.bundle, options.plan.max_batch_size
    on: dict[str, Any] = {"device": options.device, "dtype": options.dtype, "workers": workers}
    configs: list[tuple[str, ServerFactory]] = []
    versions = {}
    for peer in options.peers:
        # "<peer>-onnx": the same server running the bundle's model.onnx in ONNX Runtime.
        server, onnx = peer.removesuffix("-onnx"), peer.endswith("-onnx")
        if onnx and (options.device != "cpu" or not (bundle / ONNX_FILE).is_file()):
            continue
        python = options.peer_pythons.get(server) or servers.peer_python(
            wd / "venvs", server, options.torch_pip_args
        )
        versions[peer] = servers.describe_peer(python, server) + (" on onnxruntime" if onnx else "")
        folder = wd / peer
        runtime = "onnx" if onnx else "torchscript"
        if server == "litserve":
            wait_s = options.peer_max_wait_ms / 1000
            factory = partial(
                servers.litserve,
                python,
                bundle,
                folder,
                probe,
                batch,
                wait_s,
                threads,
                **on,
                runtime=runtime,
            )
        else:
            wait_ms = round(options.peer_max_wait_ms)
            factory = partial(
                servers.torchserve,
                python,
                bundle,
                folder,
                probe,
                batch,
                wait_ms,
                threads,
                **on,
                runtime=runtime,
            )
        configs.append((peer, factory))
    return configs, versions


def _measure(
    configs: list[tuple[str, ServerFactory]], work: Workload, plan: Plan
) -> dict[str, Any]:
    measured_all = {}
    for name, make in configs:
        print(f"server: {name}", flush=True)
        with make() as server:
            measured = _sweep(name, server, work, plan)
            if name == "ours":
                result = run_wrk(server.url, work.short, 1, plan.seconds)
                measured["short_c1"] = result.summary()
                _say(name, "1 client, short review", result)
                n = work.texts_per_request
                result = run_wrk(server.url, work.batched, plan.batched_clients, plan.seconds, n)
                measured["batched"] = result.summary()
                _say(name, f"{plan.batched_clients} clients x {n} texts", result)
            if name.startswith("ours"):
                # Bytes on the GPU after the whole sweep (null on a CPU) and the batches it ran
                # side by side: its /info says.
                info = httpx.get(server.url.removesuffix("/predict") + "/info", timeout=10).json()
                measured["cuda_memory"] = info["cuda_memory"]
                measured["inference_workers"] = info["scheduler"]["inference_workers"]
        measured_all[name] = measured
    return measured_all


def run(options: Options) -> dict[str, Any]:
    plan = options.plan
    started = time.monotonic()
    results: dict[str, Any] = {"machine": limit.machine(), "plan": asdict(plan)}
    results["command"] = options.command
    print(f"machine: {results['machine']}", flush=True)

    work = build(
        options.data,
        options.cache_dir,
        options.workdir / "bodies",
        plan.reviews,
        texts_per_request=plan.texts_per_request,
    )
    runtime = ModelRuntime.load(options.bundle, options.device, options.dtype)
    # Every server is told the precision this resolved to, so all serve the same artefact.
    options = dataclasses.replace(options, dtype=runtime.precision)
    seqs = [e.ids for e in runtime.preprocess(work.reviews)]
    lengths = np.array([len(s) for s in seqs])
    results["workload"] = {
        "reviews": len(seqs),
        "tokens_mean": round(float(lengths.mean()), 1),
        "tokens_p50_p90_max": [int(np.percentile(lengths, p)) for p in (50, 90, 100)],
        "model": runtime.card.name,
        "parameters": runtime.card.parameters,
    }

    results["device"] = {"device": str(runtime.device), "dtype": runtime.precision}
    if runtime.device.type == "cuda":
        results["device"]["gpu"] = torch.cuda.get_device_name(runtime.device)

    print(f"limit: in-process TorchScript on {runtime.device}, no HTTP", flush=True)
    results["limit"] = limit.sweep(runtime, seqs, list(plan.limit_batch_sizes), plan.limit_seconds)
    onnx = limit.onnx_forward(runtime)
    if onnx is not None:
        print("limit: in-process ONNX Runtime (model.onnx), no HTTP", flush=True)
        results["limit_onnx"] = limit.sweep(
            runtime, seqs, list(plan.limit_batch_sizes), plan.limit_seconds, onnx
        )
    results["limit_cuda_memory"] = runtime.cuda_memory()  # peak: the largest batch's footprint
    if plan.cpu_levers:
        print("lever: torch threads", flush=True)
        results["threads"] = limit.thread_lever(runtime, seqs, [1, 64], plan.limit_seconds)
        print("lever: int8 dynamic quantisation", flush=True)
        texts, labels = limit.load_reviews(
            options.data, plan.lever_reviews, seed=1, cache_dir=options.cache_dir
        )
        lever_seqs = [e.ids for e in runtime.preprocess(texts)]
        results["int8"] = limit.int8_lever(runtime, lever_seqs, labels, [1, 64], plan.limit_seconds)

    results["servers"] = _measure(_ours(options, work.probe()), work, plan)
    # Peers run with the model workers and torch threads that served best here: the same
    # setting for everyone (ours on one thread is one worker).
    best = {
        name: max(p["texts_per_s"] for p in results["servers"][name]["single"])
        for name in ("ours", "ours-1thread")
        if name in results["servers"]
    }
    results["peers_like"] = max(best, key=best.__getitem__)
    workers = int(results["servers"]["ours"]["inference_workers"])
    threads: int | None = None  # torch's default
    if results["peers_like"] == "ours-1thread":
        threads, workers = 1, 1
    elif workers > 1:  # each worker its share of the threads, as ours gives them
        threads = max(1, torch.get_num_threads() // workers)
    results["peer_threads"], results["peer_workers"] = threads, workers
    peer_configs, results["peers"] = _peers(options, work.probe(), threads, workers)
    results["servers"].update(_measure(peer_configs, work, plan))

    results["minutes"] = round((time.monotonic() - started) / 60, 1)
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = report.write(results, options.out)
    print()
    print(table)
    print(f"\nwritten to {options.out}/ in {results['minutes']} minutes")
    return results
