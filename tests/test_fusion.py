import keras
import numpy as np
import pytest

from prodfuse.modeling.fusion import FUSIONS, ConcatFusion, CrossAttentionFusion, GatedFusion, get_fusion

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


@pytest.mark.parametrize("kind", FUSIONS)
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


@pytest.mark.parametrize("kind", FUSIONS)
def test_build_creates_all_weights_before_call(kind):
    # Explicit build() must create every sublayer weight so saved weights can be loaded into it.
    layer = _small(kind)
    layer.build([(None, IMG), (None, TXT)])
    called = _small(kind)
    called([np.zeros((2, IMG), "float32"), np.zeros((2, TXT), "float32")])
    assert len(layer.weights) == len(called.weights) > 0
    assert sum(int(np.prod(w.shape)) for w in layer.weights) == sum(int(np.prod(w.shape)) for w in called.weights)


def test_registered_names():
    for cls in (ConcatFusion, GatedFusion, CrossAttentionFusion):
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
