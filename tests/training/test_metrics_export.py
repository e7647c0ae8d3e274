from __future__ import annotations

import numpy as np
import pytest
import torch

from service.bundle import Truncation, round_trip
from training.config import ModelConfig
from training.errors import ExportError
from training.export import verify_entry_points
from training.metrics import classification_metrics, expected_calibration_error, fit_temperature
from training.model import SentimentRNN


def test_metrics_on_a_hand_checked_example():
    labels = np.array([1, 1, 1, 0, 0, 0])
    logits = np.array([3.0, 1.0, -1.0, -2.0, -0.5, 2.0])  # 2 TP, 1 FN, 2 TN, 1 FP
    m = classification_metrics(labels, logits)
    assert m["confusion_matrix"] == {"tn": 2, "fp": 1, "fn": 1, "tp": 2}
    assert m["accuracy"] == pytest.approx(4 / 6, abs=1e-5)
    assert m["precision"] == pytest.approx(2 / 3, abs=1e-5)
    assert m["recall"] == pytest.approx(2 / 3, abs=1e-5)
    assert m["roc_auc"] == pytest.approx(6 / 9, abs=1e-5)  # 6 of 9 pos/neg pairs ranked right
    assert m["n"] == 6


def test_temperature_recovers_the_scale_of_overconfident_logits():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, 20_000)
    labels = (rng.random(20_000) < 1 / (1 + np.exp(-true_logits))).astype(np.int64)
    overconfident = 3.0 * true_logits
    assert fit_temperature(labels, overconfident) == pytest.approx(3.0, rel=0.05)
    before = classification_metrics(labels, overconfident)["ece"]
    after = classification_metrics(labels, overconfident, temperature=3.0)["ece"]
    assert after < 0.02 < before


def test_ece_is_zero_for_perfect_confidence_and_large_for_wrong_confidence():
    labels = np.array([1, 0, 1, 0])
    assert expected_calibration_error(labels, np.array([1.0, 0.0, 1.0, 0.0])) == 0.0
    assert expected_calibration_error(labels, np.array([0.0, 1.0, 0.0, 1.0])) == 1.0


def test_export_check_compares_every_entry_point_and_fails_loudly():
    model = SentimentRNN(ModelConfig(hidden=4, dropout=0.5), np.ones((20, 3), np.float32))
    reviews = [np.arange(2, 12, dtype=np.int32), np.arange(3, 8, dtype=np.int32)]
    exported = round_trip(torch.jit.script(model.eval()))
    diffs = verify_entry_points(model, exported, reviews, Truncation.keep(16, 8))
    assert diffs == {"forward": 0.0, "embed": 0.0, "forward_embedded": 0.0, "forward_forked": 0.0}
    # A model left in training mode (dropout on) no longer matches what was saved.
    with pytest.raises(ExportError, match="not a faithful copy"):
        verify_entry_points(model.train(), exported, reviews, Truncation.keep(16, 8))
