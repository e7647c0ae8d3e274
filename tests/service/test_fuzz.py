"""Schemathesis against the served OpenAPI schema: every route, fixed seed, bounded budget.

Its checks include: no 5xx, status codes, content types and bodies as documented, schema-valid
requests accepted, schema-invalid ones refused, 405 (with Allow) for undeclared methods.

The server truncates over-long texts itself (auto_truncate), and admits as many explanations
per request as /predict takes texts: neither a token limit nor a configured bound on a list is
something the JSON schema states, so without them a long schema-valid text or list gets its
documented 413, which the bad-input catalogues in test_app.py and test_explain.py cover.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import serve

SEED = "20261123"


@pytest.mark.slow
def test_fuzzing_finds_nothing(trained_bundle: Path, tmp_path: Path):
    st = shutil.which("st") or str(Path(sys.executable).parent / "st")
    with serve(trained_bundle, auto_truncate=True, explain_max_queue=256) as server:
        schema = httpx.get(f"{server.url}/openapi.json").json()
        operations = sum(len(methods) for methods in schema["paths"].values())
        assert operations >= 13
        result = subprocess.run(
            [
                st,
                "run",
                f"{server.url}/openapi.json",
                "--checks",
                "all",
                "--seed",
                SEED,
                "--max-examples",
                "1000",
                "--generation-database",
                "none",
                "--no-color",
                # A tensor's shape must match its data, which no JSON schema states: the
                # Open Inference Protocol's infer is tested with Triton's clients and its bad
                # inputs in test_oip.py.
                "--exclude-path-regex",
                "/infer$",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
        )
    summary = result.stdout[-3000:]
    assert result.returncode == 0, summary
    counts = re.search(r"(\d+) generated, (\d+) passed", summary)
    assert counts, summary
    assert int(counts[1]) >= 1000, summary
    assert counts[1] == counts[2]
    # Every operation of the schema but infer: the Open Inference Protocol's others and TEI's
    # /tokenize too.
    selected = re.search(r"Selected: (\d+)/(\d+)", result.stdout)
    assert selected, summary
    assert (int(selected[1]), int(selected[2])) == (operations - 1, operations), selected[0]
