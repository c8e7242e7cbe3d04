"""A model's probabilities on input arrays: averaged over the photo's stored views, or with one stream blanked."""

from __future__ import annotations

import numpy as np

# Model inputs that make up each stream; zeroing a stream zeroes all of its inputs (text: vector or token ids).
STREAMS = {"image": ("image", "image_views"), "text": ("text", "tokens")}


def zero_stream(arrays: dict[str, np.ndarray], stream: str) -> dict[str, np.ndarray]:
    """A copy of the model inputs with one stream blanked: image -> zero vector, text -> zero vector / all padding."""
    if stream not in STREAMS:
        raise ValueError(f"stream must be one of {list(STREAMS)}; got {stream!r}")
    return {k: (np.zeros_like(v) if k in STREAMS[stream] else v) for k, v in arrays.items()}


def has_stream(arrays: dict, stream: str) -> bool:
    return any(k in arrays for k in STREAMS[stream])


def predict_arrays(model, arrays: dict[str, np.ndarray], batch_size: int = 1024) -> np.ndarray:
    """Softmax probabilities [n, classes] of `model` on the input arrays (one key per model input)."""
    from prodfuse.data.sequence import view_count, with_view

    n = len(next(iter(arrays.values())))
    if n == 0:
        return np.zeros((0, int(model.output_shape[-1])), dtype=np.float32)
    # Test-time augmentation: the mean of the probabilities over every stored view of the photo.
    views = view_count(arrays)
    return np.mean(
        [np.asarray(model.predict(with_view(arrays, v), batch_size=batch_size, verbose=0)) for v in range(views)],
        axis=0,
    )
