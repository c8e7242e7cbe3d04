import keras
import numpy as np
import pytest

from prodfuse.modeling.fusion import ConcatFusion, CrossAttentionFusion, GatedFusion
from prodfuse.modeling.model import SEQ_LEN, VOCAB_SIZE, build_model, gate_model, model_inputs

IMG, TXT, K = 16, 8, 4
SMALL = dict(image_units=(12, 8), image_dropout=(0.1, 0.1), text_units=(10, 6), text_dropout=(0.1, 0.1))
SMALL_CNN = dict(vocab_size=50, seq_len=12, embed_dim=8, cnn_filters=4, cnn_units=6)
SMALL_FUSION = {
    "concat": {"units": (10, 6), "dropout": (0.1, 0.1)},
    "gated": {"units": 6, "gate_units": 1, "dropout": 0.1},
    "cross_attention": {"num_tokens": 2, "key_dim": 4, "num_heads": 2, "units": 6},
}
FUSION_CLASSES = {"concat": ConcatFusion, "gated": GatedFusion, "cross_attention": CrossAttentionFusion}


def _batch(names, n=6, seed=0, seq_len=12, vocab=50):
    rng = np.random.default_rng(seed)
    data = {
        "image": rng.normal(size=(n, IMG)).astype("float32"),
        "text": rng.normal(size=(n, TXT)).astype("float32"),
        "tokens": rng.integers(0, vocab, size=(n, seq_len)).astype("int32"),
    }
    return {k: data[k] for k in names}


def _predict(model, data):
    # A direct inference call: model.predict would trace a tf.function per model (seconds each).
    return keras.ops.convert_to_numpy(model(data, training=False))


def _small_model(fusion="concat", image_branch="mlp", text_branch="mlp", **kw):
    return build_model(
        K,
        IMG,
        TXT,
        image_branch=image_branch,
        text_branch=text_branch,
        fusion=fusion,
        fusion_kwargs=SMALL_FUSION[fusion],
        **SMALL,
        **SMALL_CNN,
        **kw,
    )


@pytest.mark.parametrize(
    "image_branch,text_branch,expected",
    [
        ("mlp", "none", ["image"]),
        ("none", "mlp", ["text"]),
        ("none", "cnn", ["tokens"]),
        ("mlp", "mlp", ["image", "text"]),
        ("mlp", "cnn", ["image", "tokens"]),
    ],
)
def test_branch_combinations_take_only_needed_inputs(image_branch, text_branch, expected):
    model = _small_model(image_branch=image_branch, text_branch=text_branch)
    assert model_inputs(model) == expected
    assert sorted(model.input) == sorted(expected)
    dtypes = {name: t.dtype for name, t in model.input.items()}
    assert all(dtypes[n] == ("int32" if n == "tokens" else "float32") for n in expected)
    probs = _predict(model, _batch(expected))
    assert probs.shape == (6, K)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    has_fusion = len(expected) == 2
    assert any(layer.name == "fusion" for layer in model.layers) == has_fusion
    if "image" in expected:
        assert model.get_layer("image_branch_out").output.shape == (None, 8)
    if expected != ["image"]:
        assert model.get_layer("text_branch_out").output.shape == (None, 6)


@pytest.mark.parametrize("fusion", ["concat", "gated", "cross_attention"])
@pytest.mark.parametrize("text_branch", ["mlp", "cnn"])
def test_each_fusion_uses_its_layer(fusion, text_branch):
    model = _small_model(fusion=fusion, text_branch=text_branch)
    assert isinstance(model.get_layer("fusion"), FUSION_CLASSES[fusion])
    assert model.get_layer("probs").output.shape == (None, K)


@pytest.mark.parametrize(
    "fusion,text_branch", [("concat", "mlp"), ("gated", "mlp"), ("cross_attention", "mlp"), ("gated", "cnn")]
)
def test_save_load_round_trip(tmp_path, fusion, text_branch):
    model = _small_model(fusion=fusion, text_branch=text_branch, seed=1)
    names = model_inputs(model)
    # Random (positive) values for every weight, BatchNorm statistics included, so a weight that
    # failed to load would show up instead of matching a fresh init.
    rng = np.random.default_rng(2)
    model.set_weights([np.abs(rng.normal(size=w.shape)).astype(w.dtype) * 0.5 + 0.1 for w in model.get_weights()])
    data = _batch(names, seed=3)
    before = _predict(model, data)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.get_layer("fusion"), FUSION_CLASSES[fusion])
    assert loaded.get_layer("fusion").get_config() == model.get_layer("fusion").get_config()
    np.testing.assert_allclose(_predict(loaded, data), before, atol=1e-6)
    if fusion == "gated":
        np.testing.assert_allclose(_predict(gate_model(loaded), data), _predict(gate_model(model), data), atol=1e-6)


@pytest.mark.parametrize("gate_units", [1, 6])
@pytest.mark.parametrize("text_branch", ["mlp", "cnn"])
def test_gate_model_range_and_shape(gate_units, text_branch):
    model = build_model(
        K,
        IMG,
        TXT,
        text_branch=text_branch,
        fusion="gated",
        fusion_kwargs={"units": 6, "gate_units": gate_units},
        **SMALL,
        **SMALL_CNN,
    )
    gm = gate_model(model)
    assert model_inputs(gm) == model_inputs(model)
    gate = _predict(gm, _batch(model_inputs(model), n=7))
    assert gate.shape == (7, gate_units)
    assert np.all((gate >= 0) & (gate <= 1))


def test_gate_model_none_when_not_gated():
    assert gate_model(_small_model(fusion="concat")) is None
    assert gate_model(_small_model(fusion="cross_attention")) is None
    assert gate_model(_small_model(fusion="gated", text_branch="none")) is None


def test_default_sizes_match_spec():
    # Parameter counts written out from the spec: Dense = in*out + out, BatchNorm = 4 * width.
    def dense_bn(i, o):
        return i * o + o + 4 * o

    image = dense_bn(2048, 512) + dense_bn(512, 256)
    text = dense_bn(384, 256) + dense_bn(256, 128)
    cnn = VOCAB_SIZE * 128 + sum(k * 128 * 64 + 64 + 4 * 64 for k in (2, 3, 4)) + dense_bn(192, 128)
    concat = dense_bn(256 + 128, 256) + dense_bn(256, 128)
    head = 128 * 81 + 81

    def wide(width):  # the linear path from the (normalised) embeddings straight to the 81 logits
        return width * 81 + 81

    assert build_model(81, 2048, image_branch="mlp", text_branch="none").count_params() == image + 256 * 81 + 81 + wide(
        2048
    )
    assert (
        build_model(81, 2048, image_branch="mlp", text_branch="none", wide=False).count_params()
        == image + 256 * 81 + 81
    )
    assert build_model(81, text_dim=384, image_branch="none").count_params() == text + head + wide(384)
    cnn_model = build_model(81, image_branch="none", text_branch="cnn")
    assert cnn_model.count_params() == cnn + head  # token ids have no linear path
    assert cnn_model.input["tokens"].shape == (None, SEQ_LEN)
    assert build_model(81, 2048, 384, fusion="concat").count_params() == image + text + concat + head + wide(2048 + 384)
    gated = build_model(81, 2048, 384, fusion="gated")
    assert gated.get_layer("fusion").count_params() == (256 * 256 + 256) + (128 * 256 + 256) + (384 + 1)


def test_seed_makes_weights_reproducible():
    a = _small_model(seed=7).get_weights()
    b = _small_model(seed=7).get_weights()
    c = _small_model(seed=8).get_weights()
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_mixed_precision_output_is_float32():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        for fusion in ("concat", "gated", "cross_attention"):
            model = _small_model(fusion=fusion)
            assert model.get_layer("fusion").compute_dtype == "float16"
            assert model.output.dtype == "float32"
            probs = _predict(model, _batch(["image", "text"]))
            assert probs.dtype == np.float32 and np.all(np.isfinite(probs))
    finally:
        keras.config.set_dtype_policy(previous)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"image_branch": "cnn"}, r"'cnn'.*\['mlp', 'none'\]"),
        ({"text_branch": "rnn"}, r"'rnn'.*\['mlp', 'cnn', 'none'\]"),
        ({"fusion": "sum"}, r"'sum'.*\['concat', 'gated', 'cross_attention', 'product', 'stack', 'joint'\]"),
        ({"image_branch": "none", "text_branch": "none"}, "both 'none'"),
        ({"image_dim": None}, "image_dim"),
        ({"text_dim": None}, "text_dim"),
        ({"num_classes": 1}, "num_classes"),
        ({"image_units": (8, 4), "image_dropout": (0.1,)}, "dropout"),
    ],
)
def test_bad_options_raise(kwargs, match):
    args = {"num_classes": K, "image_dim": IMG, "text_dim": TXT, **kwargs}
    with pytest.raises(ValueError, match=match):
        build_model(**args)


def _two_modality_data(n=512, seed=0):
    """Classes 0 vs 1 differ only in the image, 2 vs 3 only in the text; both show the group."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, size=n)
    image = rng.normal(size=(n, IMG)).astype("float32")
    text = rng.normal(size=(n, TXT)).astype("float32")
    group = np.where(y < 2, 3.0, -3.0)
    image[:, 1] += group
    text[:, 1] += group
    image[:, 0] += np.select([y == 0, y == 1], [3.0, -3.0], 0.0)
    text[:, 0] += np.select([y == 2, y == 3], [3.0, -3.0], 0.0)
    return {"image": image, "text": text}, y


def _train_accuracy(model, x, y, epochs=8):
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=32, epochs=epochs, verbose=0, shuffle=True)
    return float(np.mean(_predict(model, x).argmax(axis=1) == y))


def test_synthetic_data_needs_both_modalities():
    # Guards the learning test below: a linear model on one modality cannot pass its 0.95 bar.
    from sklearn.linear_model import LogisticRegression

    x, y = _two_modality_data()
    for name in ("image", "text"):
        acc = LogisticRegression(max_iter=500).fit(x[name], y).score(x[name], y)
        assert 0.6 <= acc <= 0.85, (name, acc)
    both = np.concatenate([x["image"], x["text"]], axis=1)
    assert LogisticRegression(max_iter=500).fit(both, y).score(both, y) >= 0.97


@pytest.mark.parametrize(
    "fusion,fusion_kwargs",
    [("concat", {"units": (32, 16), "dropout": (0.1, 0.1)}), ("gated", {"units": 16, "dropout": 0.1})],
)
def test_fusion_learns_what_neither_modality_can_alone(fusion, fusion_kwargs):
    x, y = _two_modality_data()
    sizes = dict(image_units=(32, 16), image_dropout=(0.1, 0.1), text_units=(32, 16), text_dropout=(0.1, 0.1))
    model = build_model(K, IMG, TXT, fusion=fusion, fusion_kwargs=fusion_kwargs, seed=0, **sizes)
    assert _train_accuracy(model, x, y) >= 0.95


def test_product_model_saves_loads_and_averages_the_views_before_the_product(tmp_path):
    from prodfuse.modeling.experts import product_model
    from prodfuse.modeling.probabilities import predict_arrays

    image_m = _small_model(text_branch="none", seed=1)
    text_m = _small_model(image_branch="none", seed=2)
    model = product_model(image_m, text_m, 1.5, 0.5)
    assert model_inputs(model) == ["image", "text"] and model.get_layer("probs").text_weight == 0.5
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    x = _batch(["image", "text"])
    x["text"][2] = 0  # item 2 has no text
    np.testing.assert_allclose(_predict(loaded, x), _predict(model, x), atol=1e-6)

    views = np.random.default_rng(3).normal(size=(6, 2 * IMG)).astype("float32")  # two crops beside the photo
    got = predict_arrays(loaded, {**x, "image_views": views})
    p_img = np.mean([_predict(image_m, {"image": v}) for v in (x["image"], views[:, :IMG], views[:, IMG:])], axis=0)
    p_txt = _predict(text_m, {"text": x["text"]})
    has_text = np.any(x["text"] != 0, axis=1)[:, None]
    z = 1.5 * np.log(p_img) + 0.5 * has_text * np.log(p_txt)
    np.testing.assert_allclose(got, np.exp(z) / np.exp(z).sum(1, keepdims=True), atol=1e-5)
    # one view: the model's own output
    np.testing.assert_allclose(predict_arrays(loaded, x), _predict(model, x), atol=1e-5)
    with pytest.raises(ValueError, match="fusion 'product' joins two single-stream models"):
        _small_model(fusion="gated") and build_model(K, IMG, TXT, fusion="product")
