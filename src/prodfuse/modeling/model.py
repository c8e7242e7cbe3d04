"""The product classifier: image branch + text branch + fusion + softmax head.

One builder covers the multimodal model and the unimodal baselines (set either
branch to ``"none"``), so baselines differ from the full model only in what is
switched off. Inputs are a dict keyed by name, holding only what the branches need:

- ``"image"``: float32 ``[B, image_dim]`` pre-computed image embedding,
- ``"text"``: float32 ``[B, text_dim]`` pre-computed sentence embedding,
- ``"tokens"``: int32 ``[B, SEQ_LEN]`` word ids in ``[0, VOCAB_SIZE)``, 0 = padding.
"""

import keras

from prodfuse.encoders.text import SEQUENCE_LENGTH as SEQ_LEN  # noqa: E402  (one definition)
from prodfuse.encoders.text import VOCAB_SIZE  # noqa: E402
from prodfuse.modeling.config import LATE_FUSIONS
from prodfuse.modeling.fusion import BN_MOMENTUM, FUSIONS, GatedFusion, get_fusion

IMAGE_BRANCHES = ("mlp", "none")
TEXT_BRANCHES = ("mlp", "cnn", "none")
INPUT_NAMES = ("image", "text", "tokens")
INPUT_NORMS = ("l2", "none")


def _check_choice(value, choices, what):
    if value not in choices:
        raise ValueError(f"Unknown {what} {value!r}; choose one of {list(choices)}.")


def _check_dim(value, what, branch):
    if value is None or isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{what} must be a positive int when {branch}, got {value!r}; pass the embedding width.")
    return int(value)


def _mlp(x, units, dropout, prefix, out_name):
    """Dense -> BN -> ReLU -> Dropout blocks; the last Dropout carries ``out_name``."""
    if len(units) != len(dropout):
        raise ValueError(
            f"{prefix} branch needs one dropout rate per Dense block, got units={units!r}, dropout={dropout!r}."
        )
    for i, (u, rate) in enumerate(zip(units, dropout)):
        x = keras.layers.Dense(u, name=f"{prefix}_dense_{i}")(x)
        x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{prefix}_bn_{i}")(x)
        x = keras.layers.Activation("relu", name=f"{prefix}_relu_{i}")(x)
        last = i == len(units) - 1
        x = keras.layers.Dropout(rate, name=out_name if last else f"{prefix}_dropout_{i}")(x)
    return x


def _text_cnn(tokens, vocab_size, embed_dim, kernels, filters, units, dropout):
    """Kim-style CNN: parallel Conv1D n-gram detectors, max-pooled over time."""
    # No mask: global max-pool over ReLU features is barely affected by padding positions.
    x = keras.layers.Embedding(vocab_size, embed_dim, name="text_embedding")(tokens)
    pooled = []
    for k in kernels:
        h = keras.layers.Conv1D(filters, k, name=f"text_conv_k{k}")(x)
        h = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"text_conv_bn_k{k}")(h)
        h = keras.layers.Activation("relu", name=f"text_conv_relu_k{k}")(h)
        pooled.append(keras.layers.GlobalMaxPooling1D(name=f"text_pool_k{k}")(h))
    x = pooled[0] if len(pooled) == 1 else keras.layers.Concatenate(name="text_ngrams")(pooled)
    return _mlp(x, (units,), (dropout,), "text", "text_branch_out")


def build_model(
    num_classes,
    image_dim=None,
    text_dim=None,
    *,
    image_branch="mlp",
    text_branch="mlp",
    fusion="gated",
    image_units=(512, 256),
    image_dropout=(0.5, 0.4),
    text_units=(256, 128),
    text_dropout=(0.4, 0.3),
    vocab_size=VOCAB_SIZE,
    seq_len=SEQ_LEN,
    embed_dim=128,
    cnn_kernels=(2, 3, 4),
    cnn_filters=64,
    cnn_units=128,
    cnn_dropout=0.3,
    fusion_kwargs=None,
    input_norm="l2",
    wide=True,
    seed=None,
    name=None,
):
    """Build the (multi- or unimodal) classifier as a Functional ``keras.Model``.

    ``image_dim`` is needed when ``image_branch="mlp"``, ``text_dim`` when
    ``text_branch="mlp"``; ``"cnn"`` reads ``"tokens"`` instead. ``fusion`` is used
    only when both branches are on; ``fusion_kwargs`` go to its layer.
    ``input_norm="l2"`` scales each image embedding to unit length inside the model
    (the text embedding already is), as a linear probe on these features wants.
    ``wide=True`` adds a linear path beside the MLP ("wide and deep"): the class
    logits are a linear map of the normalised embeddings plus the MLP's, so the model
    starts from what logistic regression can do and the MLP adds what it cannot. ``seed``
    calls ``keras.utils.set_random_seed`` (global) so weights are reproducible.
    The output layer ``"probs"`` is a float32 softmax, safe under mixed precision.
    """
    _check_choice(image_branch, IMAGE_BRANCHES, "image_branch")
    _check_choice(text_branch, TEXT_BRANCHES, "text_branch")
    _check_choice(fusion, FUSIONS, "fusion")
    if image_branch == "none" and text_branch == "none":
        raise ValueError("image_branch and text_branch are both 'none'; switch at least one branch on.")
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}.")
    if seed is not None:
        keras.utils.set_random_seed(seed)

    _check_choice(input_norm, INPUT_NORMS, "input_norm")
    inputs, branches, linear_in = {}, [], []
    if image_branch == "mlp":
        image_dim = _check_dim(image_dim, "image_dim", "image_branch='mlp'")
        inputs["image"] = keras.Input((image_dim,), dtype="float32", name="image")
        image = inputs["image"]
        if input_norm == "l2":
            image = keras.layers.UnitNormalization(name="image_l2")(image)
        linear_in.append(image)
        branches.append(_mlp(image, tuple(image_units), tuple(image_dropout), "image", "image_branch_out"))
    if text_branch == "mlp":
        text_dim = _check_dim(text_dim, "text_dim", "text_branch='mlp'")
        inputs["text"] = keras.Input((text_dim,), dtype="float32", name="text")
        linear_in.append(inputs["text"])
        branches.append(_mlp(inputs["text"], tuple(text_units), tuple(text_dropout), "text", "text_branch_out"))
    elif text_branch == "cnn":
        inputs["tokens"] = keras.Input((seq_len,), dtype="int32", name="tokens")
        branches.append(
            _text_cnn(inputs["tokens"], vocab_size, embed_dim, tuple(cnn_kernels), cnn_filters, cnn_units, cnn_dropout)
        )

    if len(branches) == 2 and fusion in LATE_FUSIONS:
        raise ValueError(
            f"fusion {fusion!r} joins two single-stream models trained alone (prodfuse.modeling.experts, "
            f"prodfuse.modeling.stacking); build_model makes one jointly trained model: choose concat, gated or "
            f"cross_attention"
        )
    if len(branches) == 2:
        fused = get_fusion(fusion, name="fusion", **(fusion_kwargs or {}))(branches)
        x = fused[0] if isinstance(fused, (list, tuple)) else fused  # gated also returns the gate
    else:
        x = branches[0]
    if wide and linear_in:
        # Separate logits layers then one softmax; "probs" stays the output's name for every variant.
        logits = keras.layers.Dense(num_classes, dtype="float32", name="deep_logits")(x)
        lin = linear_in[0] if len(linear_in) == 1 else keras.layers.Concatenate(name="wide_in")(linear_in)
        wide_logits = keras.layers.Dense(num_classes, dtype="float32", name="wide_logits")(lin)
        logits = keras.layers.Add(name="logits")([logits, wide_logits])
        probs = keras.layers.Activation("softmax", dtype="float32", name="probs")(logits)
    else:
        probs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="probs")(x)
    if name is None:
        name = f"prodfuse_{image_branch}_{text_branch}" + (f"_{fusion}" if len(branches) == 2 else "")
    return keras.Model(inputs, probs, name=name)


def model_inputs(model):
    """Names of the inputs ``model`` takes, in the order image, text, tokens."""
    names = {t.name for t in model.inputs}
    if isinstance(model.input, dict):
        names |= set(model.input)
    return [n for n in INPUT_NAMES if n in names]


def gate_model(model):
    """Sub-model from ``model``'s inputs to the per-item gate ``[B, gate_units]``; None if not gated.

    Gate values near 1 mean the image stream dominates the fused vector.
    """
    try:
        layer = model.get_layer("fusion")
    except ValueError:
        return None
    if not isinstance(layer, GatedFusion):
        return None
    return keras.Model(model.input, layer.output[1], name=f"{model.name}_gate")
