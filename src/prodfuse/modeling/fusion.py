"""Fusion layers that combine the image-branch and text-branch vectors.

Each layer takes a list ``[image_vec, text_vec]`` of rank-2 tensors (the two
branch outputs, widths may differ) and is registered with Keras so a saved
``.keras`` model loads with plain ``keras.models.load_model`` once this module
has been imported.
"""

import keras
from keras import ops

from prodfuse.modeling.config import FUSIONS  # noqa: E402,F401  (one definition, with the configs)

# Keras' default 0.99 leaves BatchNorm's moving statistics far from the data after the few hundred steps a
# small catalog trains for (the demo: 12 steps an epoch), so validation swings wildly while training looks fine.
BN_MOMENTUM = 0.9


def _check_pair(input_shape, layer_name):
    # Fusion always sees exactly two rank-2 streams; anything else is a wiring bug.
    is_pair = isinstance(input_shape, (list, tuple)) and len(input_shape) == 2
    if not is_pair or not all(isinstance(s, (list, tuple)) for s in input_shape):
        raise ValueError(
            f"{layer_name} expects a list of two tensors [image, text], got input shape "
            f"{input_shape!r}; call it as layer([image_vec, text_vec])."
        )
    for shape in input_shape:
        if len(shape) != 2 or shape[-1] is None:
            raise ValueError(
                f"{layer_name} expects rank-2 inputs with a known last dimension, got "
                f"{input_shape!r}; feed the branch output vectors, not sequences."
            )
    return tuple(input_shape[0]), tuple(input_shape[1])


def _as_tuple(value, name, kind):
    try:
        return tuple(kind(v) for v in value)
    except TypeError:
        return (kind(value),)
    except ValueError as err:
        raise ValueError(f"{name} must be a {kind.__name__} or a sequence of them, got {value!r}.") from err


@keras.saving.register_keras_serializable(package="prodfuse")
class ConcatFusion(keras.layers.Layer):
    """Late fusion by concatenation followed by Dense -> BN -> ReLU -> Dropout blocks.

    Args:
        units: width of each Dense block, in order.
        dropout: dropout rate after each block; one float applies to all blocks.
    """

    def __init__(self, units=(256, 128), dropout=(0.4, 0.3), **kwargs):
        super().__init__(**kwargs)
        self.units = _as_tuple(units, "units", int)
        rates = _as_tuple(dropout, "dropout", float)
        if len(rates) == 1:
            rates = rates * len(self.units)
        if len(rates) != len(self.units) or not self.units:
            raise ValueError(
                f"ConcatFusion needs one dropout rate per Dense block, got units={units!r} and "
                f"dropout={dropout!r}; pass equally long sequences (or one dropout float)."
            )
        self.dropout = rates
        self.denses = [
            keras.layers.Dense(u, dtype=self.dtype_policy, name=f"dense_{i}") for i, u in enumerate(self.units)
        ]
        self.norms = [
            keras.layers.BatchNormalization(momentum=BN_MOMENTUM, dtype=self.dtype_policy, name=f"bn_{i}")
            for i in range(len(self.units))
        ]
        self.drops = [
            keras.layers.Dropout(r, dtype=self.dtype_policy, name=f"dropout_{i}") for i, r in enumerate(self.dropout)
        ]

    def build(self, input_shape):
        img_shape, txt_shape = _check_pair(input_shape, type(self).__name__)
        shape = (img_shape[0], img_shape[-1] + txt_shape[-1])
        for dense, norm in zip(self.denses, self.norms):
            dense.build(shape)
            shape = (shape[0], dense.units)
            norm.build(shape)
        self.built = True

    def call(self, inputs, training=None):
        x = ops.concatenate(list(inputs), axis=-1)
        for dense, norm, drop in zip(self.denses, self.norms, self.drops):
            x = drop(ops.relu(norm(dense(x), training=training)), training=training)
        return x

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], self.units[-1])

    def get_config(self):
        config = super().get_config()
        config.update({"units": list(self.units), "dropout": list(self.dropout)})
        return config


@keras.saving.register_keras_serializable(package="prodfuse")
class GatedFusion(keras.layers.Layer):
    """Gated Multimodal Unit (Arevalo et al., 2017).

    ``h_i = act(W_i img)``, ``h_t = act(W_t txt)``, ``g = sigmoid(W_g [img; txt])``,
    ``out = g * h_i + (1 - g) * h_t``. The gate sees both raw streams, so it can learn
    to down-weight text for items whose text vector is all zeros (missing text).
    g near 1 means the image dominates.

    Returns ``[fused, gate]``: fused is ``[B, units]``, gate is ``[B, gate_units]``.

    Args:
        units: width both streams are projected to.
        gate_units: 1 (one scalar gate per item) or ``units`` (one gate per feature).
        dropout: dropout rate on the fused vector.
        activation: activation of the two projections (tanh as in the GMU paper).
    """

    def __init__(self, units=256, gate_units=1, dropout=0.3, activation="tanh", **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)
        self.gate_units = int(gate_units)
        if self.gate_units not in (1, self.units):
            raise ValueError(
                f"GatedFusion gate_units must be 1 or units ({self.units}) so the gate broadcasts, "
                f"got gate_units={gate_units!r}."
            )
        self.dropout = float(dropout)
        self.activation = activation
        self.image_proj = keras.layers.Dense(
            self.units, activation=activation, dtype=self.dtype_policy, name="image_proj"
        )
        self.text_proj = keras.layers.Dense(
            self.units, activation=activation, dtype=self.dtype_policy, name="text_proj"
        )
        self.gate = keras.layers.Dense(self.gate_units, activation="sigmoid", dtype=self.dtype_policy, name="gate")
        self.drop = keras.layers.Dropout(self.dropout, dtype=self.dtype_policy, name="dropout")

    def build(self, input_shape):
        img_shape, txt_shape = _check_pair(input_shape, type(self).__name__)
        self.image_proj.build(img_shape)
        self.text_proj.build(txt_shape)
        self.gate.build((img_shape[0], img_shape[-1] + txt_shape[-1]))
        self.built = True

    def call(self, inputs, training=None):
        image, text = inputs
        g = self.gate(ops.concatenate([image, text], axis=-1))
        fused = g * self.image_proj(image) + (1.0 - g) * self.text_proj(text)
        return [self.drop(fused, training=training), g]

    def compute_output_shape(self, input_shape):
        batch = input_shape[0][0]
        return [(batch, self.units), (batch, self.gate_units)]

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "units": self.units,
                "gate_units": self.gate_units,
                "dropout": self.dropout,
                "activation": self.activation,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="prodfuse")
class CrossAttentionFusion(keras.layers.Layer):
    """Bidirectional cross-attention between the two streams.

    The branch outputs are single vectors, so each is projected to ``num_tokens``
    tokens of width ``num_heads * key_dim`` (each token slot has its own weights,
    so no positional embedding is needed). Image tokens attend to text tokens and
    text tokens to image tokens (MultiHeadAttention + residual + LayerNorm); each
    token set is mean-pooled, the two are concatenated and projected to ``units``.

    Args:
        num_tokens: tokens per stream.
        key_dim: per-head width of attention queries/keys.
        num_heads: attention heads.
        dropout: dropout inside attention and on the output.
        units: width of the fused output (Dense + ReLU).
    """

    def __init__(self, num_tokens=4, key_dim=64, num_heads=4, dropout=0.1, units=256, **kwargs):
        super().__init__(**kwargs)
        self.num_tokens = int(num_tokens)
        self.key_dim = int(key_dim)
        self.num_heads = int(num_heads)
        self.dropout = float(dropout)
        self.units = int(units)
        for name in ("num_tokens", "key_dim", "num_heads", "units"):
            if getattr(self, name) < 1:
                raise ValueError(f"CrossAttentionFusion {name} must be >= 1, got {getattr(self, name)!r}.")
        self.token_dim = self.num_heads * self.key_dim
        policy = self.dtype_policy
        self.image_tokens = keras.layers.Dense(self.num_tokens * self.token_dim, dtype=policy, name="image_tokens")
        self.text_tokens = keras.layers.Dense(self.num_tokens * self.token_dim, dtype=policy, name="text_tokens")
        self.image_attn = keras.layers.MultiHeadAttention(
            self.num_heads, self.key_dim, dropout=self.dropout, dtype=policy, name="image_to_text_attn"
        )
        self.text_attn = keras.layers.MultiHeadAttention(
            self.num_heads, self.key_dim, dropout=self.dropout, dtype=policy, name="text_to_image_attn"
        )
        self.image_norm = keras.layers.LayerNormalization(dtype=policy, name="image_norm")
        self.text_norm = keras.layers.LayerNormalization(dtype=policy, name="text_norm")
        self.out_dense = keras.layers.Dense(self.units, activation="relu", dtype=policy, name="out_dense")
        self.drop = keras.layers.Dropout(self.dropout, dtype=policy, name="dropout")

    def build(self, input_shape):
        img_shape, txt_shape = _check_pair(input_shape, type(self).__name__)
        batch = img_shape[0]
        tokens_shape = (batch, self.num_tokens, self.token_dim)
        self.image_tokens.build(img_shape)
        self.text_tokens.build(txt_shape)
        self.image_attn.build(tokens_shape, tokens_shape)
        self.text_attn.build(tokens_shape, tokens_shape)
        self.image_norm.build(tokens_shape)
        self.text_norm.build(tokens_shape)
        self.out_dense.build((batch, 2 * self.token_dim))
        self.built = True

    def _tokens(self, dense, x):
        return ops.reshape(dense(x), (-1, self.num_tokens, self.token_dim))

    def call(self, inputs, training=None):
        image, text = inputs
        img_tok = self._tokens(self.image_tokens, image)
        txt_tok = self._tokens(self.text_tokens, text)
        # Both directions read the un-updated tokens of the other stream (symmetric).
        img_att = self.image_attn(img_tok, txt_tok, training=training)
        txt_att = self.text_attn(txt_tok, img_tok, training=training)
        img_tok = self.image_norm(img_tok + img_att)
        txt_tok = self.text_norm(txt_tok + txt_att)
        pooled = ops.concatenate([ops.mean(img_tok, axis=1), ops.mean(txt_tok, axis=1)], axis=-1)
        return self.drop(self.out_dense(pooled), training=training)

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], self.units)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_tokens": self.num_tokens,
                "key_dim": self.key_dim,
                "num_heads": self.num_heads,
                "dropout": self.dropout,
                "units": self.units,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="prodfuse")
class ProductFusion(keras.layers.Layer):
    """Late fusion: a weighted product of the two streams' class probabilities (a product of experts).

    ``probs = softmax(image_weight * log p_image + text_weight * log p_text)``, where each ``p`` comes from a
    model trained on its stream alone, so neither stream learns less because the other already explains the
    training rows, and the weights are fitted on validation afterwards (``prodfuse.modeling.experts``). The
    weights also calibrate: 1/T of temperature scaling is the weight of a single stream. A stream whose raw input
    is all zeros for an item (no text, or a blanked stream in the ablation) has weight 0 for that item.

    A third expert, the linear probe (a logistic regression on both embeddings side by side), joins with
    ``probe_weight``: ``+ probe_weight * log p_probe``, for every item (it reads whichever streams are there).

    Called on ``[p_image, p_text, image_input, text_input]``, or ``[..., p_probe]`` with a probe; returns
    ``[B, classes]`` float32 probabilities.

    Args:
        image_weight: weight of log p_image (>= 0).
        text_weight: weight of log p_text (>= 0).
        probe_weight: weight of log p_probe (>= 0), or None: no probe expert.
    """

    def __init__(self, image_weight=1.0, text_weight=1.0, probe_weight=None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.image_weight = float(image_weight)
        self.text_weight = float(text_weight)
        self.probe_weight = None if probe_weight is None else float(probe_weight)
        for name in ("image_weight", "text_weight") + (("probe_weight",) if probe_weight is not None else ()):
            if not getattr(self, name) >= 0:
                raise ValueError(f"ProductFusion {name} must be >= 0, got {getattr(self, name)!r}.")

    @staticmethod
    def present(x):
        """[B, 1] float32: 1 where an item's input has any nonzero value (the stream is there), else 0."""
        there = ops.any(ops.not_equal(x, ops.zeros_like(x)), axis=tuple(range(1, len(x.shape))))
        return ops.cast(ops.expand_dims(there, -1), "float32")

    def call(self, inputs):
        p_image, p_text, image, text = inputs[:4]
        log = lambda p: ops.log(ops.clip(ops.cast(p, "float32"), 1e-12, 1.0))  # noqa: E731
        z = self.image_weight * self.present(image) * log(p_image) + self.text_weight * self.present(text) * log(p_text)
        if self.probe_weight is not None:
            z = z + self.probe_weight * log(inputs[4])
        return ops.softmax(z, axis=-1)

    def stream_weights(self):
        """(image, text): the two streams' fitted weights (retrieval's fused space shares them out)."""
        return self.image_weight, self.text_weight

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])

    def get_config(self):
        config = super().get_config()
        config.update({"image_weight": self.image_weight, "text_weight": self.text_weight})
        if self.probe_weight is not None:  # absent: a 0.2 model file's config, unchanged
            config["probe_weight"] = self.probe_weight
        return config


@keras.saving.register_keras_serializable(package="prodfuse")
class StackFusion(keras.layers.Layer):
    """Stacking: a multinomial logistic regression (the meta-classifier) on both streams' log-probabilities.

    ``probs = softmax([present_image * log p_image, present_text * log p_text] @ kernel + bias)``, where each ``p``
    comes from a model trained on its stream alone and the kernel was fitted on out-of-fold probabilities of the
    training rows (``prodfuse.modeling.stacking``), so it learns how far to trust each stream for each class rather
    than two global weights. A stream whose raw input is all zeros for an item contributes zeros, as it did in the
    fit.

    Called on ``[p_image, p_text, image_input, text_input]``; returns ``[B, classes]`` float32 probabilities.

    Args:
        num_classes: classes of both streams and of the output.
        kernel: ``[2 * num_classes, num_classes]`` fitted coefficients (None: zeros, to be set by ``set_weights``).
        bias: ``[num_classes]`` fitted intercepts.
    """

    def __init__(self, num_classes, kernel=None, bias=None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        if self.num_classes < 2:
            raise ValueError(f"StackFusion num_classes must be >= 2, got {num_classes!r}.")
        # the fitted values travel as the layer's weights (saved with the model), not in its config
        self._initial = (kernel, bias)

    def build(self, input_shape):
        k = self.num_classes
        if tuple(input_shape[0])[-1] != k or tuple(input_shape[1])[-1] != k:
            raise ValueError(
                f"StackFusion expects [p_image, p_text, image, text] with {k} classes each, got {input_shape!r}."
            )
        kernel, bias = self._initial
        self.kernel = self.add_weight(shape=(2 * k, k), initializer="zeros", trainable=False, name="kernel")
        self.bias = self.add_weight(shape=(k,), initializer="zeros", trainable=False, name="bias")
        if kernel is not None:
            self.kernel.assign(ops.convert_to_tensor(kernel, "float32"))
        if bias is not None:
            self.bias.assign(ops.convert_to_tensor(bias, "float32"))
        self.built = True

    def call(self, inputs):
        p_image, p_text, image, text = inputs
        log_image = ops.log(ops.clip(ops.cast(p_image, "float32"), 1e-12, 1.0)) * ProductFusion.present(image)
        log_text = ops.log(ops.clip(ops.cast(p_text, "float32"), 1e-12, 1.0)) * ProductFusion.present(text)
        z = ops.matmul(ops.concatenate([log_image, log_text], axis=-1), self.kernel) + self.bias
        return ops.softmax(z, axis=-1)

    def stream_weights(self):
        """(image, text): the mean diagonal coefficient of each stream's block, at least 0: how much a class's own
        log-probability counts, the stacked counterpart of the product's two weights (retrieval's fused space)."""
        import numpy as np

        w = np.asarray(keras.ops.convert_to_numpy(self.kernel))
        k = self.num_classes
        return tuple(max(float(np.mean(np.diag(w[i * k : (i + 1) * k]))), 0.0) for i in range(2))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])

    def get_config(self):
        config = super().get_config()
        config.update({"num_classes": self.num_classes})
        return config


_FUSION_CLASSES = {"concat": ConcatFusion, "gated": GatedFusion, "cross_attention": CrossAttentionFusion}
# The fusions that are one layer over the two branch vectors, trained jointly with the branches ("product" is not:
# it multiplies the probabilities of two models trained alone, prodfuse.modeling.experts).
JOINT_FUSIONS = tuple(_FUSION_CLASSES)


def get_fusion(kind, **kwargs):
    """Instantiate the fusion layer ``kind`` (one of JOINT_FUSIONS) with ``kwargs`` (layer args, ``name`` too)."""
    if kind not in _FUSION_CLASSES:
        raise ValueError(f"Unknown fusion layer {kind!r}; choose one of {list(JOINT_FUSIONS)}.")
    return _FUSION_CLASSES[kind](**kwargs)
