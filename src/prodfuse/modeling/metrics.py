"""Classification metrics shared by training, evaluation and comparison."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score


def top_k_accuracy(y_true: np.ndarray, probs: np.ndarray, k: int) -> float:
    """Fraction of items whose true class is among the k most probable (ties broken by index)."""
    if len(y_true) == 0:
        return float("nan")
    k = min(k, probs.shape[1])
    top = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    return float(np.mean(np.any(top == np.asarray(y_true)[:, None], axis=1)))


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, top_k: tuple[int, ...] = (3, 5)) -> dict:
    """accuracy, top-k accuracies, weighted and macro F1 (macro over the classes present in y_true or predicted)."""
    y_true = np.asarray(y_true)
    if len(y_true) == 0:
        return {"accuracy": float("nan"), "weighted_f1": float("nan"), "macro_f1": float("nan"), "n": 0}
    pred = probs.argmax(axis=1)
    out = {"accuracy": float(np.mean(pred == y_true))}
    for k in top_k:
        out[f"top{k}_accuracy"] = top_k_accuracy(y_true, probs, k)
    out["weighted_f1"] = float(f1_score(y_true, pred, average="weighted", zero_division=0))
    out["macro_f1"] = float(f1_score(y_true, pred, average="macro", zero_division=0))
    out["n"] = int(len(y_true))
    return out


def reliability_bins(y_true: np.ndarray, probs: np.ndarray, bins: int = 15) -> dict[str, np.ndarray]:
    """Per equal-width confidence bin: mean confidence, accuracy and item count (the bins of the ECE)."""
    conf = np.asarray(probs).max(axis=1)
    correct = np.asarray(probs).argmax(axis=1) == np.asarray(y_true)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(which, weights=conf, minlength=bins) / count
        accuracy = np.bincount(which, weights=correct.astype(float), minlength=bins) / count
    return {"edges": edges, "confidence": confidence, "accuracy": accuracy, "count": count}


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """ECE with equal-width confidence bins: sum over bins of |accuracy - confidence| weighted by bin size."""
    b = reliability_bins(y_true, probs, bins)
    ok = b["count"] > 0
    n = max(int(b["count"].sum()), 1)
    return float(np.sum(b["count"][ok] / n * np.abs(b["accuracy"][ok] - b["confidence"][ok])))
