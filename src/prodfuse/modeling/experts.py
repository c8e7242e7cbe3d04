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
from prodfuse.modeling.linear import PROBE_C, dense_weights, l2_rows

# Upper bound of either weight: a weight is 1/T of temperature scaling, and T below 0.2 is a one-hot oracle.
MAX_WEIGHT = 5.0
_EPS = 1e-12


def stream_inputs(image_model: keras.Model, text_model: keras.Model):
    """(inputs, image input names, text input names): one Keras Input per input of the two stream models, for a
    model that joins them."""
    from prodfuse.modeling.model import model_inputs

    image_names, text_names = model_inputs(image_model), model_inputs(text_model)
    specs = {t.name: t for m in (image_model, text_model) for t in m.inputs}
    inputs = {k: keras.Input(specs[k].shape[1:], dtype=specs[k].dtype, name=k) for k in image_names + text_names}
    return inputs, image_names, text_names


def present(x: np.ndarray) -> np.ndarray:
    """[n] 1.0 where an item's input has any nonzero value (the stream is there), else 0.0."""
    x = np.asarray(x)
    return np.any(x.reshape(len(x), -1) != 0, axis=1).astype(np.float64)


def product_probs(
    log_image: np.ndarray,
    log_text: np.ndarray,
    a: float,
    b: float,
    image_present: np.ndarray,
    text_present: np.ndarray,
    log_probe: np.ndarray | None = None,
    c: float = 0.0,
) -> np.ndarray:
    """Mean over the image views of softmax(a log p_image + b log p_text [+ c log p_probe]), as the assembled model
    predicts.

    ``log_image`` is [views, n, classes] (one view: [1, n, classes]), ``log_text`` and ``log_probe`` [n, classes]."""
    z = (a * image_present[None, :, None]) * log_image + (b * text_present[:, None] * log_text)[None]
    if log_probe is not None:
        z = z + (c * log_probe)[None]
    z = z - z.max(axis=2, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=2, keepdims=True)).mean(axis=0)


def fit_product_weights(
    y: np.ndarray,
    p_image: np.ndarray,
    p_text: np.ndarray,
    image_present: np.ndarray | None = None,
    text_present: np.ndarray | None = None,
    p_probe: np.ndarray | None = None,
) -> tuple[float, float, dict]:
    """The weights (a, b) in [0, MAX_WEIGHT]² with the lowest validation log-loss, and what each choice scored.

    ``p_image``: [n, classes] or [views, n, classes] validation probabilities of the image-only model (one slice per
    stored view); ``p_text``: [n, classes] of the text-only model. Returns ``(a, b, info)``; ``info`` holds the
    log-loss and accuracy of the fit and of each stream alone (calibrated), so a run says what fusion added. With
    ``p_probe`` ([n, classes], the linear probe's) a third weight c is fitted too: ``info["product"]["weights"]``
    then holds (a, b, c) and ``info["probe"]`` the probe alone.
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
    log_probe = None if p_probe is None else np.log(np.clip(np.asarray(p_probe, dtype=np.float64), _EPS, 1.0))
    k = 2 if log_probe is None else 3

    def score(w) -> tuple[float, float]:
        p = product_probs(log_image, log_text, w[0], w[1], ip, tp, log_probe, w[2] if k == 3 else 0.0)
        return float(-np.mean(np.log(np.clip(p[rows, y], _EPS, 1.0)))), float(np.mean(p.argmax(axis=1) == y))

    bounds = [(0.0, MAX_WEIGHT)] * k
    starts = [tuple(1.0 for _ in range(k))] + [tuple(float(i == j) for j in range(k)) for i in range(k)]
    fits = [minimize(lambda w: score(w)[0], s, method="L-BFGS-B", bounds=bounds) for s in starts]
    best = min(fits, key=lambda f: f.fun)
    weights = tuple(round(float(v), 4) for v in best.x)
    # One expert alone, calibrated (its best weight with the others at 0): what the fit is measured against.
    names = ("image", "text", "probe")[:k]

    def only(i, w):
        return tuple(w if j == i else 0.0 for j in range(k))

    alone = {
        name: minimize(lambda w, i=i: score(only(i, w[0]))[0], [1.0], method="L-BFGS-B", bounds=[bounds[0]]).x[0]
        for i, name in enumerate(names)
    }
    info = {"fitted_on": "val", "n": n}
    for name, w in (("product", weights), *((name, only(i, alone[name])) for i, name in enumerate(names))):
        ll, acc = score(w)
        info[name] = {"weights": [round(float(v), 4) for v in w], "logloss": ll, "accuracy": acc}
    if not all(math.isfinite(v) for v in weights):
        raise ValueError(f"the product fusion's weight fit did not converge (got {weights!r})")
    return (*weights, info) if k == 3 else (weights[0], weights[1], info)


def product_model(
    image_model: keras.Model,
    text_model: keras.Model,
    image_weight: float,
    text_weight: float,
    name=None,
    probe_model: keras.Model | None = None,
    probe_weight: float | None = None,
):
    """One Functional model: both single-stream models side by side (and the linear probe, when given), their
    probabilities fused by ProductFusion.

    Its output layer is ``"probs"`` and its inputs are the union of the two models' (image; text or tokens), so it
    is used, saved and loaded like any other prodfuse model."""
    from prodfuse.modeling.model import model_inputs

    inputs, image_names, text_names = stream_inputs(image_model, text_model)
    p_image = image_model({k: inputs[k] for k in image_names})
    p_text = text_model({k: inputs[k] for k in text_names})
    parts = [p_image, p_text, inputs[image_names[0]], inputs[text_names[0]]]
    if probe_model is not None:
        parts.append(probe_model({k: inputs[k] for k in model_inputs(probe_model)}))
    probs = ProductFusion(image_weight, text_weight, probe_weight if probe_model is not None else None, name="probs")(
        parts
    )
    return keras.Model(inputs, probs, name=name or "prodfuse_product")


def probe_model(
    image_views: list[np.ndarray], text: np.ndarray, y: np.ndarray, num_classes: int, c: float = PROBE_C, seed: int = 0
) -> keras.Model:
    """The linear probe as an expert: scikit-learn's multinomial LogisticRegression(C) on [L2(image); L2(text)] of
    the training rows (every stored view of each photo, as the image model sees them), its coefficients copied into
    a Keras model (UnitNormalization of each stream, Concatenate, one softmax Dense), so the fused model still loads
    with registered layers only. ``image_views``: one [n, image_dim] array per view."""
    from sklearn.linear_model import LogisticRegression

    x = np.concatenate([np.concatenate([l2_rows(v), l2_rows(text)], axis=1) for v in image_views])
    clf = LogisticRegression(C=c, max_iter=1000, random_state=seed).fit(x, np.tile(y, len(image_views)))
    kernel, bias = dense_weights(clf, num_classes, x.shape[1])
    image = keras.Input((image_views[0].shape[1],), dtype="float32", name="image")
    text_in = keras.Input((text.shape[1],), dtype="float32", name="text")
    both = keras.layers.Concatenate(name="probe_in")(
        [
            keras.layers.UnitNormalization(name="probe_image_l2")(image),
            keras.layers.UnitNormalization(name="probe_text_l2")(text_in),
        ]
    )
    dense = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="probe_probs")
    model = keras.Model({"image": image, "text": text_in}, dense(both), name="prodfuse_probe")
    dense.set_weights([kernel, bias])
    return model
