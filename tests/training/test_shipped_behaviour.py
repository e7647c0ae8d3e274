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


# int8 quantises activations per batch, with kernels that may round differently on another
# CPU: one case in 100 may turn. float32 must reproduce every figure.
@pytest.mark.parametrize(("dtype", "tolerance"), [("float32", "0"), ("int8", "0.011")])
def test_the_shipped_model_reproduces_its_behaviour_figures(dtype: str, tolerance: str):
    assert (
        main(["behave", str(SHIPPED), "--check", "--dtype", dtype, "--tolerance", tolerance]) == 0
    )
