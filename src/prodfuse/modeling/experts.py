"""Product fusion: two single-stream models, their weights fitted on validation, assembled into one model.

Each stream is trained alone, so neither learns less because the other already explains the training rows (on
grocery the OCR text names a training photo's shelf sequence, which a jointly trained model leans on and new
photos do not share). The weights of ``softmax(a log p_image + b log p_text)`` are then fitted on validation by
log-loss: they calibrate the two streams and set how much each counts, down to 0 for a stream that adds nothing.
"""

from __future__ import annotations

import math

import keras
import numpy as np

from prodfuse.modeling.fusion import ProductFusion

# Upper bound of either weight: a weight is 1/T of temperature scaling, and T below 0.2 is a one-hot oracle.
MAX_WEIGHT = 5.0
_EPS = 1e-12


def present(x: np.ndarray) -> np.ndarray:
    """[n] 1.0 where an item's input has any nonzero value (the stream is there), else 0.0."""
    x = np.asarray(x)
    return np.any(x.reshape(len(x), -1) != 0, axis=1).astype(np.float64)


def product_probs(
    log_image: np.ndarray, log_text: np.ndarray, a: float, b: float, image_present: np.ndarray, text_present: np.ndarray
) -> np.ndarray:
    """Mean over the image views of softmax(a log p_image + b log p_text), as the assembled model predicts.

    ``log_image`` is [views, n, classes] (one view: [1, n, classes]), ``log_text`` [n, classes]."""
    z = (a * image_present[None, :, None]) * log_image + (b * text_present[:, None] * log_text)[None]
    z = z - z.max(axis=2, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=2, keepdims=True)).mean(axis=0)


def fit_product_weights(
    y: np.ndarray,
    p_image: np.ndarray,
    p_text: np.ndarray,
    image_present: np.ndarray | None = None,
    text_present: np.ndarray | None = None,
) -> tuple[float, float, dict]:
    """The weights (a, b) in [0, MAX_WEIGHT]² with the lowest validation log-loss, and what each choice scored.

    ``p_image``: [n, classes] or [views, n, classes] validation probabilities of the image-only model (one slice per
    stored view); ``p_text``: [n, classes] of the text-only model. Returns ``(a, b, info)``; ``info`` holds the
    log-loss and accuracy of the fit and of each stream alone (calibrated), so a run says what fusion added.
    """
    from scipy.optimize import minimize

    y = np.asarray(y, dtype=np.int64)
    if len(y) == 0:
        raise ValueError("cannot fit the product fusion's weights on 0 validation items; the run needs a val split.")
    p_image = np.asarray(p_image, dtype=np.float64)
    log_image = np.log(np.clip(p_image if p_image.ndim == 3 else p_image[None], _EPS, 1.0))
    log_text = np.log(np.clip(np.asarray(p_text, dtype=np.float64), _EPS, 1.0))
    n = len(y)
    ip = np.ones(n) if image_present is None else np.asarray(image_present, dtype=np.float64)
    tp = np.ones(n) if text_present is None else np.asarray(text_present, dtype=np.float64)
    rows = np.arange(n)

    def score(ab) -> tuple[float, float]:
        p = product_probs(log_image, log_text, ab[0], ab[1], ip, tp)
        return float(-np.mean(np.log(np.clip(p[rows, y], _EPS, 1.0)))), float(np.mean(p.argmax(axis=1) == y))

    bounds = [(0.0, MAX_WEIGHT)] * 2
    starts = [(1.0, 1.0), (1.0, 0.0), (0.0, 1.0)]
    fits = [minimize(lambda ab: score(ab)[0], s, method="L-BFGS-B", bounds=bounds) for s in starts]
    best = min(fits, key=lambda f: f.fun)
    a, b = (round(float(v), 4) for v in best.x)
    # One stream alone, calibrated (its best weight with the other at 0): what the fit is measured against.
    alone = {
        name: minimize(
            lambda w, i=i: score((w[0], 0.0) if i == 0 else (0.0, w[0]))[0],
            [1.0],
            method="L-BFGS-B",
            bounds=[bounds[0]],
        ).x[0]
        for i, name in enumerate(("image", "text"))
    }
    info = {"fitted_on": "val", "n": n}
    for name, ab in (("product", (a, b)), ("image", (alone["image"], 0.0)), ("text", (0.0, alone["text"]))):
        ll, acc = score(ab)
        info[name] = {"weights": [round(float(v), 4) for v in ab], "logloss": ll, "accuracy": acc}
    if not all(math.isfinite(v) for v in (a, b)):
        raise ValueError(f"the product fusion's weight fit did not converge (got {a!r}, {b!r})")
    return a, b, info


def product_model(
    image_model: keras.Model, text_model: keras.Model, image_weight: float, text_weight: float, name=None
):
    """One Functional model: both single-stream models side by side, their probabilities fused by ProductFusion.

    Its output layer is ``"probs"`` and its inputs are the union of the two models' (image; text or tokens), so it
    is used, saved and loaded like any other prodfuse model."""
    from prodfuse.modeling.model import model_inputs

    image_names, text_names = model_inputs(image_model), model_inputs(text_model)
    specs = {t.name: t for m in (image_model, text_model) for t in m.inputs}
    inputs = {k: keras.Input(specs[k].shape[1:], dtype=specs[k].dtype, name=k) for k in image_names + text_names}
    p_image = image_model({k: inputs[k] for k in image_names})
    p_text = text_model({k: inputs[k] for k in text_names})
    probs = ProductFusion(image_weight, text_weight, name="probs")(
        [p_image, p_text, inputs[image_names[0]], inputs[text_names[0]]]
    )
    return keras.Model(inputs, probs, name=name or "prodfuse_product")
