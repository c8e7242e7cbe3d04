"""A model's probabilities on input arrays: averaged over the photo's stored views, or with one stream blanked."""

from __future__ import annotations

import weakref

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


# Up to this many rows (items x views) go through the model in one direct call: `model.predict` costs tens of
# milliseconds of set-up per call, which is most of the latency of predicting one product.
DIRECT_CALL_ROWS = 4096


_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _compiled_call(model, x: dict[str, np.ndarray]):
    """`model(x, training=False)` as one traced TensorFlow graph per model and set of input names (any number of
    rows): an eager call of a fusion model runs its ops one by one, ~25 ms for a handful of rows on a CPU."""
    import keras

    if keras.backend.backend() != "tensorflow" or not isinstance(model, keras.Model):
        return lambda inputs: model(inputs, training=False)
    import tensorflow as tf

    key = tuple(sorted((k, v.dtype.str, v.shape[1:]) for k, v in x.items()))
    fns = _COMPILED.setdefault(model, {})
    if key not in fns:
        model_ref = weakref.ref(model)  # a strong reference would keep the cache key alive forever
        signature = [{k: tf.TensorSpec((None, *v.shape[1:]), tf.as_dtype(v.dtype)) for k, v in x.items()}]

        @tf.function(input_signature=signature)
        def call(inputs):
            return model_ref()(inputs, training=False)

        fns[key] = call
    return fns[key]


def model_outputs(model, x: dict[str, np.ndarray], batch_size: int) -> np.ndarray:
    """`model`'s output on `x`: one compiled direct call for few rows, `model.predict` in batches otherwise."""
    rows = len(next(iter(x.values())))
    if rows <= min(batch_size, DIRECT_CALL_ROWS):
        import keras

        out = _compiled_call(model, x)(x)
        return np.asarray(keras.ops.convert_to_numpy(out), dtype=np.float32)
    return np.asarray(model.predict(x, batch_size=batch_size, verbose=0), dtype=np.float32)


def stream_models(model):
    """(image model, text model) inside a model made of two stream models trained alone (fusion product, stack or
    joint), else None."""
    import keras

    from prodfuse.modeling.model import model_inputs

    subs = [layer for layer in getattr(model, "layers", []) if isinstance(layer, keras.Model)]
    image = [m for m in subs if model_inputs(m) == ["image"]]
    text = [m for m in subs if model_inputs(m) and "image" not in model_inputs(m)]
    if len(image) != 1 or len(text) != 1:
        return None
    # a joint head's streams are wrapped to give their vectors and logits too: their probabilities are the last
    return tuple(
        m if len(m.outputs) == 1 else keras.Model(m.inputs, m.outputs[-1], name=m.name) for m in (*image, *text)
    )


def probe_expert(model):
    """The linear probe inside a product fusion (the sub-model that reads both streams), else None."""
    import keras

    from prodfuse.modeling.model import model_inputs

    subs = [layer for layer in getattr(model, "layers", []) if isinstance(layer, keras.Model)]
    return next((m for m in subs if len(model_inputs(m)) > 1), None)


def product_parts(model):
    """(image model, text model, fusion layer) of a model whose "probs" fuses two stream models' probabilities (a
    ProductFusion or a StackFusion); None for any other model (a joint head reads their vectors, not their
    probabilities)."""
    from prodfuse.modeling.fusion import ProductFusion, StackFusion

    names = [layer.name for layer in getattr(model, "layers", [])]
    fusion = model.get_layer("probs") if "probs" in names else None
    streams = stream_models(model) if isinstance(fusion, (ProductFusion, StackFusion)) else None
    return (*streams, fusion) if streams else None


def _product_over_views(model, parts, arrays: dict[str, np.ndarray], batch_size: int) -> np.ndarray:
    """A late fusion under test-time augmentation: the image model's probabilities averaged over the views
    first, then fused with the text's, as the fusion was fitted (a product per view, then averaged, sharpens each
    view's guess and read 1-2 points lower on grocery)."""
    from prodfuse.modeling.experts import present, product_probs
    from prodfuse.modeling.fusion import StackFusion
    from prodfuse.modeling.model import model_inputs

    image, text, fusion = parts
    # the image model alone is no product model: predict_arrays averages it over the views
    p_image = predict_arrays(image, {k: v for k, v in arrays.items() if k in STREAMS["image"]}, batch_size)
    text_in = {k: arrays[k] for k in model_inputs(text)}
    p_text = model_outputs(text, text_in, batch_size)
    if isinstance(fusion, StackFusion):
        import keras

        out = fusion([p_image, p_text, arrays["image"], next(iter(text_in.values()))])
        return np.asarray(keras.ops.convert_to_numpy(out), dtype=np.float32)
    log = lambda p: np.log(np.clip(p.astype(np.float64), 1e-12, 1.0))  # noqa: E731
    probe = probe_expert(model)
    probe_in = [k for k in ("image", "image_views", "text") if k in arrays]
    probs = product_probs(
        log(p_image)[None],
        log(p_text),
        fusion.image_weight,
        fusion.text_weight,
        present(arrays["image"]),
        present(next(iter(text_in.values()))),
        None if probe is None else log(predict_arrays(probe, {k: arrays[k] for k in probe_in}, batch_size)),
        fusion.probe_weight or 0.0,
    )
    return probs.astype(np.float32)


def predict_arrays(model, arrays: dict[str, np.ndarray], batch_size: int = 1024) -> np.ndarray:
    """Softmax probabilities [n, classes] of `model` on the input arrays (one key per model input)."""
    from prodfuse.data.sequence import view_count, with_view

    n = len(next(iter(arrays.values())))
    if n == 0:
        return np.zeros((0, int(model.output_shape[-1])), dtype=np.float32)
    # Test-time augmentation: the mean of the probabilities over every stored view of the photo. Few rows: all
    # views in one call (same numbers, one model call instead of one per view).
    views = view_count(arrays)
    parts = product_parts(model) if views > 1 else None
    if parts:
        return _product_over_views(model, parts, arrays, batch_size)
    per_view = [with_view(arrays, v) for v in range(views)]
    if views > 1 and n * views <= min(batch_size, DIRECT_CALL_ROWS):
        stacked = {k: np.concatenate([x[k] for x in per_view]) for k in per_view[0]}
        return model_outputs(model, stacked, batch_size).reshape(views, n, -1).mean(axis=0)
    return np.mean([model_outputs(model, x, batch_size) for x in per_view], axis=0)
