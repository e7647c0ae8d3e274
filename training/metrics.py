"""Classification metrics, calibration error and temperature scaling for one-logit models."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn import metrics as skm


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """ECE over the confidence of the predicted class, in equal-width bins (Guo et al., 2017)."""
    predicted = probs >= 0.5
    confidence = np.where(predicted, probs, 1.0 - probs)
    correct = predicted == labels.astype(bool)
    edges = np.linspace(0.5, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def classification_metrics(
    labels: np.ndarray, logits: np.ndarray, temperature: float | np.ndarray = 1.0
) -> dict[str, Any]:
    """Accuracy, precision, recall, F1, ROC-AUC, log-loss, ECE and the confusion matrix;
    ``temperature`` is one for all, or one per logit (length bands)."""
    probs = sigmoid(logits / temperature)
    predicted = (probs >= 0.5).astype(np.int64)
    tn, fp, fn, tp = skm.confusion_matrix(labels, predicted, labels=[0, 1]).ravel()
    precision, recall, f1, _ = skm.precision_recall_fscore_support(
        labels, predicted, average="binary", zero_division=0
    )
    both_classes = len(np.unique(labels)) == 2
    return {
        "n": len(labels),
        "accuracy": round(float(skm.accuracy_score(labels, predicted)), 5),
        "precision": round(float(precision), 5),
        "recall": round(float(recall), 5),
        "f1": round(float(f1), 5),
        "roc_auc": round(float(skm.roc_auc_score(labels, probs)), 5) if both_classes else None,
        "log_loss": round(float(skm.log_loss(labels, probs, labels=[0, 1])), 5),
        "ece": round(expected_calibration_error(labels, probs), 5),
        "confusion_matrix": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
    }


def fit_temperature(labels: np.ndarray, logits: np.ndarray) -> float:
    """The temperature T minimising validation log-loss of sigmoid(logit / T)."""
    y = labels.astype(np.float64)
    z = logits.astype(np.float64)

    def nll(log_t: float) -> float:
        scaled = z / np.exp(log_t)
        # log(1 + e^x) - y x, computed stably
        return float(np.mean(np.logaddexp(0.0, scaled) - y * scaled))

    result = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return round(float(np.exp(result.x)), 4)


def format_metrics(name: str, m: dict[str, Any]) -> str:
    cm = m["confusion_matrix"]
    auc = f"{m['roc_auc']:.4f}" if m["roc_auc"] is not None else "n/a"
    return (
        f"{name:<10} n={m['n']:<6} acc {m['accuracy']:.4f}  P {m['precision']:.4f}  "
        f"R {m['recall']:.4f}  F1 {m['f1']:.4f}  AUC {auc}  logloss {m['log_loss']:.4f}  "
        f"ECE {m['ece']:.4f}  [tn {cm['tn']} fp {cm['fp']} fn {cm['fn']} tp {cm['tp']}]"
    )
