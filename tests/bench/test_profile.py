"""bench.profile's stage attribution on hand-written py-spy raw output (the format `py-spy
record --format raw` writes: one collapsed stack and its sample count a line). If this fails,
docs/benchmarks.md's profile table puts time in the wrong stage."""

from __future__ import annotations

from pathlib import Path

from bench.profile import read_raw

LOOP = "run (asyncio/runners.py:118)"
THREAD = "_bootstrap (threading.py:1032)"
STACKS = [
    (
        [
            THREAD,
            "_run (service/batcher.py:311)",
            "infer (service/runtime.py:181)",
            "forward (<torch>:12)",
        ],
        50,
    ),
    ([THREAD, "_run (service/batcher.py:311)", "_next_batch (service/batcher.py:250)"], 5),
    (["worker (concurrent/futures/thread.py:89)", "preprocess (service/runtime.py:157)"], 20),
    ([LOOP, "handle (uvicorn/http/httptools_impl.py:400)", "validate (pydantic/main.py:1)"], 10),
    ([LOOP, "render (starlette/responses.py:180)", "dumps (json/__init__.py:231)"], 8),
    ([LOOP, "data_received (uvicorn/protocols/http/httptools_impl.py:177)"], 6),
    ([LOOP, "_run_once (asyncio/base_events.py:1922)"], 1),
]
RAW = "".join(f"{';'.join(frames)} {count}\n" for frames, count in STACKS)


def test_each_stack_lands_in_the_most_specific_stage(tmp_path: Path):
    raw = tmp_path / "raw.txt"
    raw.write_text(RAW)
    stages = read_raw(raw)
    assert stages == {
        "model (TorchScript forward)": 50,  # the batcher called it, but the time is the model's
        "batching (queue, futures)": 5,
        "tokenisation": 20,
        "validation (pydantic)": 10,
        "JSON encode/decode": 8,
        "HTTP + routing (uvicorn, starlette, fastapi)": 6,
        "asyncio loop, other": 1,
    }
