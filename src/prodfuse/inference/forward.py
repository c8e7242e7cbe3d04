"""One pass of a run's model over input arrays: calibrated probabilities, modality ablation, gate, contributions."""

from __future__ import annotations

import weakref

import numpy as np

from prodfuse.inference.calibration import apply_temperature
from prodfuse.modeling.probabilities import STREAMS, has_stream, predict_arrays, zero_stream

_GATE_MODELS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def gate_values(model, arrays: dict[str, np.ndarray], batch_size: int = 1024) -> np.ndarray | None:
    """Per-item mean of the gated fusion's gate (image share, in [0, 1]); None for models without a gate."""
    from prodfuse.modeling.model import gate_model

    if not hasattr(model, "get_layer"):
        return None
    if model not in _GATE_MODELS:  # built once per model: a new sub-model per call would be traced each time
        _GATE_MODELS[model] = gate_model(model)
    gm = _GATE_MODELS[model]
    if gm is None:
        return None
    n = len(next(iter(arrays.values())))
    if n == 0:
        return np.zeros(0)
    from prodfuse.data.sequence import with_view
    from prodfuse.modeling.probabilities import model_outputs

    g = model_outputs(gm, with_view(arrays, 0), batch_size)  # the whole photo's gate
    return g.reshape(n, -1).mean(axis=1)


def forward(
    model, arrays: dict[str, np.ndarray], temperature: float = 1.0, batch_size: int = 1024, ablate: bool = True
) -> dict:
    """Everything both `evaluate` and `predict` need from the model, computed once.

    Returns raw (softmax) and calibrated probabilities, the calibrated probabilities with the image stream zeroed
    (`no_image`) and with the text stream zeroed (`no_text`), None for a stream the model does not take, and the
    per-item gate (None unless gated fusion).
    """
    raw = predict_arrays(model, arrays, batch_size)
    out = {
        "raw": raw,
        "probs": apply_temperature(raw, temperature) if len(raw) else raw.astype(np.float64),
        "temperature": float(temperature),
    }
    for stream in STREAMS:
        p = None
        if ablate and has_stream(arrays, stream):
            p = predict_arrays(model, zero_stream(arrays, stream), batch_size)
            p = apply_temperature(p, temperature) if len(p) else p.astype(np.float64)
        out[f"no_{stream}"] = p
    out["gate"] = gate_values(model, arrays, batch_size)
    out["wide"] = any(layer.name == "wide_logits" for layer in getattr(model, "layers", []))
    return out


def contributions(out: dict) -> tuple[np.ndarray, np.ndarray]:
    """(image, text) contribution per item; NaN for a stream the model does not take.

    Gated fusion without the wide path: the mean gate and 1 - gate (each stream's share of the fused vector).
    Otherwise (the gate then decides only the MLP's part): how much the top class's probability drops when that
    stream is zeroed (can be negative when the stream argued against it).
    """
    probs = out["probs"]
    n = len(probs)
    if out.get("gate") is not None and not out.get("wide"):
        return out["gate"].astype(np.float64), 1.0 - out["gate"].astype(np.float64)
    top = probs.argmax(axis=1) if n else np.zeros(0, np.int64)
    res = []
    for stream in STREAMS:
        zeroed = out.get(f"no_{stream}")
        if zeroed is None:
            res.append(np.full(n, np.nan))
        else:
            res.append(probs[np.arange(n), top] - zeroed[np.arange(n), top])
    return res[0], res[1]
