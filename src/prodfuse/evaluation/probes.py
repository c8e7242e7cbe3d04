"""Linear probes: the baselines a reviewer tries first, on exactly the features and splits the models get.

scikit-learn's LogisticRegression(C=10) on the L2-normalised image embedding, on the text embedding (already
L2-normalised, zero for items without text), on both concatenated, and the calibrated late fusion of the image
and text probes (temperature per probe and the image weight fitted on validation). Where the shards hold augmented
image views (extraction's --views), the probes get them as the models do: fitted on every view of each training
photo, their probabilities averaged over the views at prediction.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from prodfuse.evaluation.config import PROBES  # noqa: E402,F401  (the names, defined with the configs)
from prodfuse.inference.calibration import apply_temperature, fit_late_weight, fit_temperature
from prodfuse.modeling.linear import PROBE_C, l2_rows  # one probe for compare and the probe expert
from prodfuse.modeling.metrics import classification_metrics


def probe_features(arrays: dict[str, np.ndarray], streams: tuple[str, ...], rows: np.ndarray) -> list[np.ndarray]:
    """The probe's features of `rows`, one array per image view (one in all without views or image stream)."""
    from prodfuse.data.sequence import view_count, with_view

    views = view_count(arrays) if "image" in streams else 1
    sub = {k: v[rows] for k, v in arrays.items()}
    return [np.concatenate([l2_rows(with_view(sub, v)[s]) for s in streams], axis=1) for v in range(views)]


def fit_probe(x_train: np.ndarray, y_train: np.ndarray, num_classes: int, c: float = PROBE_C, seed: int = 0):
    """A multinomial logistic regression; returns a function rows -> probabilities over all `num_classes`."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c, max_iter=1000, random_state=seed)
    clf.fit(x_train, y_train)

    def predict(x: np.ndarray) -> np.ndarray:
        p = np.zeros((len(x), num_classes))
        p[:, clf.classes_] = clf.predict_proba(x)  # classes absent from training keep probability 0
        return p

    return predict


def run_probes(
    arrays: dict[str, np.ndarray],
    y: np.ndarray,
    splits: dict[str, np.ndarray],
    num_classes: int,
    eval_split: str,
    probes=PROBES,
    seed: int = 0,
    cache_dir: str | None = None,
) -> dict[str, dict]:
    """{probe: {"metrics": ..., "seconds": ...}} scored on `eval_split`; `y` holds class ids of every row.

    With `cache_dir`, each probe's probabilities are kept there under a hash of everything the fit sees (features,
    labels, C, seed, scikit-learn's version): the fits are deterministic, so a repeated comparison on the same
    shards reads them back instead of fitting again ("seconds" is then the original fit's)."""
    import time

    tr, va, ev = splits["train"], splits["val"], splits[eval_split]
    want = set(probes) | ({"lr_image", "lr_text"} if "lr_late" in probes else set())
    streams = {"lr_image": ("image",), "lr_text": ("text",), "lr_concat": ("image", "text")}
    out, probs, seconds = {}, {}, {}
    for name in ("lr_image", "lr_text", "lr_concat"):
        if name not in want:
            continue
        t0 = time.perf_counter()
        fit_views = probe_features(arrays, streams[name], tr)
        x_fit, y_fit = np.concatenate(fit_views), np.tile(y[tr], len(fit_views))
        scored = {k: probe_features(arrays, streams[name], rows) for k, rows in (("val", va), ("eval", ev))}
        cached = _cache_file(cache_dir, name, x_fit, y_fit, scored, num_classes, seed)
        if cached is not None and cached.is_file():
            with np.load(cached) as f:
                probs[name] = {"val": f["val"], "eval": f["eval"]}
                seconds[name] = float(f["seconds"])
            continue
        predict = fit_probe(x_fit, y_fit, num_classes, seed=seed)
        probs[name] = {k: np.mean([predict(x) for x in views], axis=0) for k, views in scored.items()}
        seconds[name] = time.perf_counter() - t0
        if cached is not None:
            _save(cached, seconds=seconds[name], **probs[name])
    if "lr_late" in want:
        t = {s: fit_temperature(y[va], probs[s]["val"]) for s in ("lr_image", "lr_text")}
        cal = {s: {k: apply_temperature(p, t[s]) for k, p in probs[s].items()} for s in t}
        w, _ = fit_late_weight(y[va], cal["lr_image"]["val"], cal["lr_text"]["val"])
        probs["lr_late"] = {"eval": w * cal["lr_image"]["eval"] + (1 - w) * cal["lr_text"]["eval"]}
        seconds["lr_late"] = seconds["lr_image"] + seconds["lr_text"]
        out_late = {"weight": w, "temperatures": t}
    for name in probes:
        out[name] = {"metrics": classification_metrics(y[ev], probs[name]["eval"]), "seconds": seconds[name]}
        if name == "lr_late":
            out[name]["late_fusion"] = out_late
    return out


def _cache_file(cache_dir, name, x_fit, y_fit, scored, num_classes, seed):
    if cache_dir is None:
        return None
    import hashlib

    import sklearn

    h = hashlib.sha256(f"{name} C={PROBE_C} seed={seed} k={num_classes} sklearn={sklearn.__version__}".encode())
    for a in (x_fit, y_fit, *scored["val"], *scored["eval"]):
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.data)
    return Path(cache_dir) / f"{name}-{h.hexdigest()[:32]}.npz"


def _save(path: Path, **arrays) -> None:
    """Written to a temporary name and renamed: a reader sees the whole file or none."""
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
