import keras
import numpy as np
import pytest

from prodfuse.modeling.experts import fit_product_weights, product_probs
from prodfuse.modeling.fusion import (
    JOINT_FUSIONS,
    ConcatFusion,
    CrossAttentionFusion,
    GatedFusion,
    ProductFusion,
    get_fusion,
)

B, IMG, TXT = 5, 16, 8


@pytest.fixture
def pair():
    rng = np.random.default_rng(0)
    return [rng.normal(size=(B, IMG)).astype("float32"), rng.normal(size=(B, TXT)).astype("float32")]


def _small(kind):
    return {
        "concat": ConcatFusion(units=(12, 6), dropout=(0.4, 0.3)),
        "gated": GatedFusion(units=10, gate_units=1, dropout=0.2),
        "cross_attention": CrossAttentionFusion(num_tokens=3, key_dim=4, num_heads=2, dropout=0.1, units=7),
    }[kind]


def test_concat_output_shape_and_weights(pair):
    layer = ConcatFusion(units=(12, 6), dropout=(0.4, 0.3))
    out = layer(pair)
    assert tuple(out.shape) == (B, 6)
    # Dense kernels see the concatenation (16 + 8 = 24) and then the first block's width.
    kernels = [w for w in layer.weights if w.path.endswith("kernel")]
    assert [tuple(k.shape) for k in kernels] == [(24, 12), (12, 6)]
    assert np.all(keras.ops.convert_to_numpy(out) >= 0)  # ReLU, inference-mode dropout is identity


def test_concat_single_dropout_broadcasts():
    layer = ConcatFusion(units=(4, 3, 2), dropout=0.25)
    assert layer.dropout == (0.25, 0.25, 0.25)


def test_gated_outputs_and_gate_range(pair):
    fused, gate = GatedFusion(units=10, gate_units=1)(pair)
    assert tuple(fused.shape) == (B, 10)
    assert tuple(gate.shape) == (B, 1)
    g = keras.ops.convert_to_numpy(gate)
    assert np.all((g >= 0) & (g <= 1))

    fused, gate = GatedFusion(units=10, gate_units=10)(pair)
    assert tuple(fused.shape) == (B, 10)
    assert tuple(gate.shape) == (B, 10)


def test_gated_is_convex_mix_of_projections(pair):
    layer = GatedFusion(units=10, gate_units=1, dropout=0.5)
    fused, gate = layer(pair, training=False)
    img, txt = pair
    h_img = np.tanh(img @ layer.image_proj.kernel.numpy() + layer.image_proj.bias.numpy())
    h_txt = np.tanh(txt @ layer.text_proj.kernel.numpy() + layer.text_proj.bias.numpy())
    logits = np.concatenate(pair, axis=-1) @ layer.gate.kernel.numpy() + layer.gate.bias.numpy()
    g = 1 / (1 + np.exp(-logits))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(gate), g, atol=1e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(fused), g * h_img + (1 - g) * h_txt, atol=1e-5)


def test_gated_gate_can_depend_on_missing_text(pair):
    # The gate sees [img; txt], so an all-zero text vector changes it (down-weighting is learnable).
    layer = GatedFusion(units=10)
    _, g_full = layer(pair)
    _, g_missing = layer([pair[0], np.zeros_like(pair[1])])
    assert not np.allclose(keras.ops.convert_to_numpy(g_full), keras.ops.convert_to_numpy(g_missing))


def test_cross_attention_output_shape_and_uses_both_streams(pair):
    layer = CrossAttentionFusion(num_tokens=3, key_dim=4, num_heads=2, dropout=0.1, units=7)
    out = keras.ops.convert_to_numpy(layer(pair))
    assert out.shape == (B, 7)
    img, txt = pair
    other_img = keras.ops.convert_to_numpy(layer([img + 1.0, txt]))
    other_txt = keras.ops.convert_to_numpy(layer([img, txt + 1.0]))
    assert not np.allclose(out, other_img)
    assert not np.allclose(out, other_txt)
    # Deterministic at inference (attention dropout off).
    np.testing.assert_array_equal(out, keras.ops.convert_to_numpy(layer(pair)))


@pytest.mark.parametrize("kind", JOINT_FUSIONS)
def test_config_round_trip(kind, pair):
    layer = _small(kind)
    layer(pair)
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    # Serialisation through the registry (what a .keras file uses) restores the same class.
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(restored) is type(layer)
    assert restored.get_config() == config
    restored(pair)
    assert [tuple(w.shape) for w in restored.weights] == [tuple(w.shape) for w in layer.weights]


@pytest.mark.parametrize("kind", JOINT_FUSIONS)
def test_build_creates_all_weights_before_call(kind):
    # Explicit build() must create every sublayer weight so saved weights can be loaded into it.
    layer = _small(kind)
    layer.build([(None, IMG), (None, TXT)])
    called = _small(kind)
    called([np.zeros((2, IMG), "float32"), np.zeros((2, TXT), "float32")])
    assert len(layer.weights) == len(called.weights) > 0
    assert sum(int(np.prod(w.shape)) for w in layer.weights) == sum(int(np.prod(w.shape)) for w in called.weights)


def test_registered_names():
    for cls in (ConcatFusion, GatedFusion, CrossAttentionFusion, ProductFusion):
        assert keras.saving.get_registered_name(cls) == f"prodfuse>{cls.__name__}"


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="gate_units"):
        GatedFusion(units=8, gate_units=3)
    with pytest.raises(ValueError, match="dropout"):
        ConcatFusion(units=(8, 4), dropout=(0.1, 0.2, 0.3))
    with pytest.raises(ValueError, match="num_heads"):
        CrossAttentionFusion(num_heads=0)
    with pytest.raises(ValueError, match="'mean'.*concat"):
        get_fusion("mean")
    with pytest.raises(ValueError, match="two tensors"):
        ConcatFusion()(np.zeros((2, 4), "float32"))


def _probs(rng, n, k, sharp=3.0):
    z = rng.normal(size=(n, k)) * sharp
    return (np.exp(z) / np.exp(z).sum(1, keepdims=True)).astype("float32")


def test_product_fusion_is_a_weighted_product_and_drops_an_absent_stream():
    rng = np.random.default_rng(0)
    p_img, p_txt = _probs(rng, B, 4), _probs(rng, B, 4)
    img, txt = np.ones((B, 3), "float32"), np.ones((B, 2), "float32")
    txt[1] = 0  # item 1 has no text
    out = keras.ops.convert_to_numpy(ProductFusion(0.7, 1.8)([p_img, p_txt, img, txt]))
    z = 0.7 * np.log(p_img) + 1.8 * np.log(p_txt)
    expected = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    z1 = 0.7 * np.log(p_img[1])
    expected[1] = np.exp(z1) / np.exp(z1).sum()  # the text's weight is 0 where its input is all zeros
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-6)
    assert ProductFusion(0.7, 1.8).get_config()["text_weight"] == 1.8
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(ProductFusion(0.5, 0)))
    assert (restored.image_weight, restored.text_weight) == (0.5, 0.0)
    with pytest.raises(ValueError, match="text_weight must be >= 0, got -1.0"):
        ProductFusion(1.0, -1.0)
    assert "probe_weight" not in ProductFusion(0.5, 1.0).get_config()  # a two-expert config reads as before


def test_product_fusion_multiplies_in_the_probe_for_every_item():
    rng = np.random.default_rng(1)
    p_img, p_txt, p_probe = _probs(rng, B, 4), _probs(rng, B, 4), _probs(rng, B, 4)
    img, txt = np.ones((B, 3), "float32"), np.ones((B, 2), "float32")
    txt[1] = 0  # no text: the text model drops out, the probe (which reads the image too) stays
    out = keras.ops.convert_to_numpy(ProductFusion(0.7, 1.8, 0.4)([p_img, p_txt, img, txt, p_probe]))
    z = 0.7 * np.log(p_img) + 1.8 * np.log(p_txt) * np.any(txt != 0, axis=1)[:, None] + 0.4 * np.log(p_probe)
    np.testing.assert_allclose(out, np.exp(z) / np.exp(z).sum(1, keepdims=True), rtol=1e-4, atol=1e-6)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(ProductFusion(0.5, 1, 0.3)))
    assert (restored.image_weight, restored.text_weight, restored.probe_weight) == (0.5, 1.0, 0.3)
    with pytest.raises(ValueError, match="probe_weight must be >= 0, got -0.1"):
        ProductFusion(1.0, 1.0, -0.1)


def test_fit_product_weights_gives_the_probe_its_weight_when_it_knows_more():
    from prodfuse.modeling.experts import fit_product_weights

    rng = np.random.default_rng(2)
    y = rng.integers(0, 4, 400)
    weak, strong = _expert(rng, y, 4, 0.5), _expert(rng, y, 4, 3.0)
    a, b, c, info = fit_product_weights(y, weak, weak[rng.permutation(400)], p_probe=strong)
    assert c > max(a, b) and info["probe"]["accuracy"] > info["image"]["accuracy"]
    assert info["product"]["weights"] == [a, b, c] and info["product"]["logloss"] <= info["probe"]["logloss"]


def _expert(rng, y, k, signal):
    """A classifier's probabilities: softmax of `signal` on the true class plus independent unit noise."""
    z = rng.normal(size=(len(y), k))
    z[np.arange(len(y)), y] += signal
    return np.exp(z) / np.exp(z).sum(1, keepdims=True)


def test_product_weights_ignore_a_useless_stream_and_combine_two_useful_ones():
    rng = np.random.default_rng(1)
    k, n = 10, 2000
    y = rng.integers(0, k, n)
    good, noise = _expert(rng, y, k, 3.0), _expert(rng, y, k, 0.0)
    a, b, info = fit_product_weights(y, good, noise)
    assert a > 0.5 and b < 0.1, (a, b)  # the noise stream gets (almost) no say
    assert info["product"]["accuracy"] >= info["image"]["accuracy"] - 0.005
    # two independent experts with the same signal: together they are right more often than either
    img, txt = _expert(rng, y, k, 1.5), _expert(rng, y, k, 1.5)
    a, b, info = fit_product_weights(y, np.stack([img, img]), txt)  # two identical views: the mean is the same
    assert a > 0.3 and b > 0.3
    assert info["product"]["accuracy"] > max(info["image"]["accuracy"], info["text"]["accuracy"]) + 0.05
    both = product_probs(np.log(img)[None], np.log(txt), a, b, np.ones(n), np.ones(n))
    assert np.mean(both.argmax(1) == y) == pytest.approx(info["product"]["accuracy"])
    with pytest.raises(ValueError, match="0 validation items"):
        fit_product_weights(np.zeros(0, int), np.zeros((0, k)), np.zeros((0, k)))
