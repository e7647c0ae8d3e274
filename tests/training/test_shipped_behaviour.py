"""The shipped model against its card's behaviour figures (`python -m training behave`).

If this fails, models/imdb-bigru no longer reads the suite's sentences as its card says (the
model, its calibration or the suite changed without the card being re-measured): run
`python -m training behave models/imdb-bigru --write-card` for each precision after checking
why, and update docs/model.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from training.cli import main

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "imdb-bigru"


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_the_shipped_model_reproduces_its_behaviour_figures(dtype: str):
    assert main(["behave", str(SHIPPED), "--check", "--dtype", dtype, "--tolerance", "0"]) == 0
