"""Stacking and a joint head: two more ways, beside the product (``experts``), to fuse two stream models trained alone.

- ``stack``: each stream model's out-of-fold probabilities on the training rows (K folds: every row scored by a
  model that never trained on it) feed a multinomial logistic regression on both streams' log-probabilities, the
  meta-classifier of the published multimodal product classifiers. It is fitted on the training rows, not on the
  small validation split, so it can afford a weight per class and stream.
- ``joint``: both stream models frozen, and a small head trained on their penultimate vectors and logits side by
  side, with early stopping on validation: it can use what the two streams know together, which a product or a
  stack of their finished probabilities cannot.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np

from prodfuse.modeling.experts import stream_inputs
from prodfuse.modeling.fusion import BN_MOMENTUM, StackFusion
from prodfuse.modeling.linear import dense_weights

META_C = 0.1  # the meta-classifier's inverse L2 strength: 2 x classes features on a few thousand rows overfit at C=1
JOINT_UNITS = 256
JOINT_DROPOUT = 0.3
_EPS = 1e-12


def oof_folds(y: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """Positions 0..len(y)-1 dealt into `folds` stratified folds (scikit-learn's StratifiedKFold, shuffled by
    `seed`); a class with fewer items than folds is spread over as many folds as it has items."""
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(y)
    if len(y) < folds:
        raise ValueError(f"stacking needs at least {folds} training rows for {folds} folds; got {len(y)}")
    with warnings.catch_warnings():  # "the least populated class has only n members": handled as documented
        warnings.simplefilter("ignore", UserWarning)
        splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
        return [held for _, held in splitter.split(np.zeros(len(y)), y)]


def stack_features(p_image, p_text, image_present, text_present) -> np.ndarray:
    """[n, 2 * classes]: each stream's log-probabilities, zeros where an item lacks the stream (as StackFusion)."""
    log = lambda p: np.log(np.clip(np.asarray(p, dtype=np.float64), _EPS, 1.0))  # noqa: E731
    return np.concatenate(
        [log(p_image) * np.asarray(image_present)[:, None], log(p_text) * np.asarray(text_present)[:, None]], axis=1
    )


def fit_meta(features: np.ndarray, y: np.ndarray, num_classes: int, seed: int = 0, c: float = META_C):
    """The meta-classifier's (kernel [2k, k], bias [k]) from out-of-fold features: scikit-learn's multinomial
    LogisticRegression, as a Dense layer's weights (linear.dense_weights)."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(features, y)
    return dense_weights(clf, num_classes, features.shape[1])


def stack_model(image_model: keras.Model, text_model: keras.Model, kernel, bias, name=None) -> keras.Model:
    """One Functional model: both stream models side by side, their probabilities fused by StackFusion ("probs")."""
    inputs, image_names, text_names = stream_inputs(image_model, text_model)
    p_image = image_model({k: inputs[k] for k in image_names})
    p_text = text_model({k: inputs[k] for k in text_names})
    probs = StackFusion(int(p_image.shape[-1]), kernel, bias, name="probs")(
        [p_image, p_text, inputs[image_names[0]], inputs[text_names[0]]]
    )
    return keras.Model(inputs, probs, name=name or "prodfuse_stack")


def joint_model(image_model: keras.Model, text_model: keras.Model, seed=None, name=None) -> keras.Model:
    """Both stream models frozen, a head on their branch vectors and logits side by side: Dropout -> Dense -> BN ->
    ReLU -> Dropout -> "deep_logits" -> "probs". Only the head trains; the streams stay as they were trained alone.

    The branch vectors are the ``*_branch_out`` layers of build_model's single-stream models; the logits are their
    ``logits`` (wide and deep) or the input of "probs" (without the wide path: the vector again). ``seed`` calls
    ``keras.utils.set_random_seed`` (global), as build_model does, so the head's weights are reproducible."""
    inputs, image_names, text_names = stream_inputs(image_model, text_model)
    parts = []
    for stream, sub, names in (("image", image_model, image_names), ("text", text_model, text_names)):
        sub.trainable = False
        layers = [layer.name for layer in sub.layers]
        logits = sub.get_layer("logits").output if "logits" in layers else sub.get_layer("probs").input
        # the stream's probabilities ride along as a third output, so the stream alone can still be scored from the
        # saved model (prodfuse.modeling.probabilities.stream_models)
        features = keras.Model(
            sub.input, [sub.get_layer(f"{stream}_branch_out").output, logits, sub.output], name=f"{stream}_features"
        )
        vector, logit, _ = features({k: inputs[k] for k in names}, training=False)
        parts += [vector, logit]
    num_classes = int(image_model.output_shape[-1])
    if seed is not None:
        keras.utils.set_random_seed(seed)
    x = keras.layers.Concatenate(name="joint_in")(parts)
    x = keras.layers.Dropout(JOINT_DROPOUT, name="joint_dropout_in")(x)
    x = keras.layers.Dense(JOINT_UNITS, name="joint_dense")(x)
    x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name="joint_bn")(x)
    x = keras.layers.Activation("relu", name="joint_relu")(x)
    x = keras.layers.Dropout(JOINT_DROPOUT, name="joint_out")(x)
    logits = keras.layers.Dense(num_classes, dtype="float32", name="deep_logits")(x)
    probs = keras.layers.Activation("softmax", dtype="float32", name="probs")(logits)
    return keras.Model(inputs, probs, name=name or "prodfuse_joint")
