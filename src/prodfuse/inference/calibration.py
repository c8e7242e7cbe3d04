"""Temperature scaling: fit one temperature on validation probabilities, store it with the run, apply it anywhere.

The model's output is a softmax, so its logits are log(p) up to a per-item constant, which softmax ignores:
softmax(log(p) / T) is therefore exactly temperature scaling of the logits. T > 1 softens over-confident models.
"""

from __future__ import annotations

import math

import numpy as np

from prodfuse.modeling.metrics import reliability_bins  # noqa: F401  (re-exported: plots and reports)

# Probabilities are clipped before the log: float32 softmax gives exact zeros for hopeless classes.
_EPS = 1e-12
# Bounds on T for the search: outside them the model is either useless or a one-hot oracle.
T_BOUNDS = (0.2, 10.0)
# Image weights tried by late fusion.
LATE_GRID = np.round(np.linspace(0.0, 1.0, 21), 2)


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(p) / T), computed stably in float64; T = 1 returns the probabilities renormalised."""
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a positive finite number; got {temperature!r}")
    z = np.log(np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1.0)) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def negative_log_likelihood(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Mean -log p(true class)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    if len(y_true) == 0:
        return float("nan")
    p = np.clip(np.asarray(probs, dtype=np.float64)[np.arange(len(y_true)), y_true], _EPS, 1.0)
    return float(-np.mean(np.log(p)))


def fit_temperature(y_true: np.ndarray, probs: np.ndarray, bounds: tuple[float, float] = T_BOUNDS) -> float:
    """The T in `bounds` minimising the NLL of softmax(log(p)/T); searched on log T (the loss is smooth there)."""
    from scipy.optimize import minimize_scalar

    y_true = np.asarray(y_true, dtype=np.int64)
    if len(y_true) == 0:
        raise ValueError("cannot fit a temperature on 0 validation items; the run needs a validation split.")
    logp = np.log(np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1.0))
    rows = np.arange(len(y_true))

    def nll(log_t: float) -> float:
        z = logp / math.exp(log_t)
        z -= z.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[rows, y_true]))

    res = minimize_scalar(
        nll, bounds=(math.log(bounds[0]), math.log(bounds[1])), method="bounded", options={"xatol": 1e-4}
    )
    # The bounded search never evaluates T = 1 exactly; keep it when it is at least as good (flat losses).
    return 1.0 if nll(0.0) <= res.fun else float(math.exp(res.x))


def fit_late_weight(
    y: np.ndarray, p_image: np.ndarray, p_text: np.ndarray, objective: str = "logloss", grid=LATE_GRID
) -> tuple[float, dict]:
    """The image weight w in `grid` that is best on (y, p) by log-loss (lowest) or accuracy (highest; then log-loss).

    Ties go to the weight nearest 0.5, so a flat objective gives an even mix rather than an arbitrary end.
    """
    if objective not in ("logloss", "accuracy"):
        raise ValueError(f"late-fusion objective must be logloss or accuracy; got {objective!r}")
    scores = {}
    for w in grid:
        p = w * p_image + (1 - w) * p_text
        ll = negative_log_likelihood(y, p)
        acc = float(np.mean(p.argmax(axis=1) == y))
        scores[float(w)] = (ll, acc)
    if objective == "logloss":
        key = lambda w: (round(scores[w][0], 9), abs(w - 0.5))  # noqa: E731
    else:
        key = lambda w: (-scores[w][1], round(scores[w][0], 9), abs(w - 0.5))  # noqa: E731
    best = min(scores, key=key)
    return best, {f"{w:.2f}": {"logloss": s[0], "accuracy": s[1]} for w, s in scores.items()}
