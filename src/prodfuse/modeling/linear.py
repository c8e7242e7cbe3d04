"""The linear probe's pieces, numpy only (no TensorFlow at import): its features and a fitted logistic regression as
the weights of a softmax Dense. compare's probes (prodfuse.evaluation.probes), the product fusion's probe expert and
the stack's meta-classifier share them."""

from __future__ import annotations

import numpy as np

PROBE_C = 10.0  # the linear probe's inverse L2 strength: compare's probes and the product's probe expert


def l2_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; all-zero rows (no text) stay zero."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def dense_weights(clf, num_classes: int, features: int) -> tuple[np.ndarray, np.ndarray]:
    """A fitted scikit-learn LogisticRegression as the (kernel [features, num_classes], bias) of a softmax Dense over
    all `num_classes`. A class absent from its training rows gets a bias of -30, so it is never predicted (as in
    training); a binary fit (one row of log-odds for its second class) keeps the first class at 0."""
    kernel = np.zeros((features, num_classes), dtype=np.float32)
    bias = np.full(num_classes, -30.0, dtype=np.float32)
    if len(clf.classes_) == 2:
        kernel[:, clf.classes_[1]], bias[clf.classes_[1]], bias[clf.classes_[0]] = clf.coef_[0], clf.intercept_[0], 0
    else:
        kernel[:, clf.classes_], bias[clf.classes_] = clf.coef_.T, clf.intercept_
    return kernel, bias
