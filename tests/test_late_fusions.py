"""Fusions of two stream models trained alone, beside the product: stacking on out-of-fold probabilities, a joint
head on the frozen streams, and the linear probe as a third expert. Synthetic shards where each stream carries two
of four classes, so only a fusion tells all four apart."""

import json
from pathlib import Path

import keras
import numpy as np
import pytest

from prodfuse.data.shards import read_shards
from prodfuse.modeling.probabilities import predict_arrays, probe_expert, product_parts, stream_models
from synthetic import image_vs_text_classes, write_synthetic_shards
from test_train import train


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    img, txt, labels = image_vs_text_classes()
    return write_synthetic_shards(tmp_path_factory.mktemp("synth"), img, txt, labels)


@pytest.fixture(scope="module")
def late(synth, tmp_path_factory):
    base = tmp_path_factory.mktemp("late")
    flags = {
        "stack": ["--fusion", "stack", "--stack-folds", "2"],
        "joint": ["--fusion", "joint"],
        "probe": ["--fusion", "product"],  # the probe expert is on by default
    }
    return {name: train(synth, base / name, *f) for name, f in flags.items()}


def _inputs(synth, rows=200):
    data = read_shards(synth, ["image_embedding", "text_embedding"], rows=np.arange(rows))
    return {"image": data["image_embedding"], "text": data["text_embedding"]}


def test_each_late_fusion_tells_apart_what_neither_stream_can(late):
    for name, r in late.items():
        assert r["metrics"]["val"]["accuracy"] >= 0.95, name
        assert r["metrics"]["test"]["accuracy"] >= 0.95, name
        streams = json.loads((Path(r["run"]) / "metrics.json").read_text())["streams"]
        for stream in ("image", "text"):  # each stream alone: two classes right, two guessed
            assert 0.4 < streams[stream]["val"]["accuracy"] < 0.85, (name, stream)


def test_stack_is_a_logistic_regression_on_out_of_fold_log_probabilities(late, synth):
    run = Path(late["stack"]["run"])
    fit = json.loads((run / "config.json").read_text())["late_fusion"]["fit"]
    assert fit["folds"] == 2 and set(fit["best_epoch"]) == {"image", "text"}
    for stream in ("image", "text"):  # out of fold, each stream still knows only its two classes
        assert 0.4 < fit["oof_accuracy"][stream] < 0.85, stream
    assert not (run / "oof").exists()  # the fold models are not kept
    model = keras.models.load_model(run / "model.keras")  # registered layers only
    x = _inputs(synth)
    image, text, fusion = product_parts(model)
    kernel, bias = (keras.ops.convert_to_numpy(w) for w in (fusion.kernel, fusion.bias))
    p_img = image.predict({"image": x["image"]}, verbose=0)
    p_txt = text.predict({"text": x["text"]}, verbose=0)
    has_text = np.any(x["text"] != 0, axis=1)[:, None]
    z = np.concatenate([np.log(np.clip(p_img, 1e-12, 1)), has_text * np.log(np.clip(p_txt, 1e-12, 1))], 1)
    z = z @ kernel + bias
    expected = np.exp(z - z.max(1, keepdims=True))
    np.testing.assert_allclose(predict_arrays(model, x), expected / expected.sum(1, keepdims=True), atol=1e-5)
    # each stream's own class gets a positive weight on its own log-probability, so both have a say
    assert min(fusion.stream_weights()) > 0


def test_joint_head_trains_on_frozen_streams(late, synth):
    run = Path(late["joint"]["run"])
    fit = json.loads((run / "config.json").read_text())["late_fusion"]["fit"]
    assert set(fit["best_epoch"]) == {"image", "text", "joint"}
    assert (run / "joint" / "history.csv").is_file() and not (run / "joint" / "checkpoint.keras").exists()
    model = keras.models.load_model(run / "model.keras")
    image, text = stream_models(model)
    assert all(not w.trainable for m in (image, text) for w in m.weights)
    assert {w.path.split("/")[0] for w in model.trainable_weights} == {"joint_dense", "joint_bn", "deep_logits"}
    x = _inputs(synth)
    # each stream alone, scored from the saved model, is the stream metrics.json scored
    y_img = predict_arrays(image, {"image": x["image"]})
    assert y_img.shape == (len(x["image"]), 4) and np.allclose(y_img.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(model.predict(x, verbose=0), predict_arrays(model, x), atol=1e-5)
    # the streams inside are the ones metrics.json scored alone
    streams = json.loads((run / "metrics.json").read_text())["streams"]
    assert streams["how"] == "its own model, trained alone"


def test_probe_expert_joins_the_product_with_its_own_weight(late, synth):
    run = Path(late["probe"]["run"])
    fit = json.loads((run / "config.json").read_text())["product_fusion"]["fit"]
    a, b, c = fit["product"]["weights"]
    assert c > 0.2 and fit["probe"]["accuracy"] >= 0.95  # a linear model on both streams separates all four
    model = keras.models.load_model(run / "model.keras")
    probe = probe_expert(model)
    x = _inputs(synth)
    image, text, fusion = product_parts(model)
    assert fusion.probe_weight == pytest.approx(c)
    log = lambda p: np.log(np.clip(p, 1e-12, 1))  # noqa: E731
    has_text = np.any(x["text"] != 0, axis=1)[:, None]
    z = (
        a * log(image.predict({"image": x["image"]}, verbose=0))
        + b * has_text * log(text.predict({"text": x["text"]}, verbose=0))
        + c * log(probe.predict(x, verbose=0))
    )
    expected = np.exp(z - z.max(1, keepdims=True))
    np.testing.assert_allclose(predict_arrays(model, x), expected / expected.sum(1, keepdims=True), atol=1e-5)


def test_probe_expert_matches_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    from prodfuse.modeling.experts import probe_model

    rng = np.random.default_rng(0)
    image, text = rng.normal(size=(120, 6)).astype("float32"), rng.normal(size=(120, 4)).astype("float32")
    text[::5] = 0  # items without text keep a zero text part
    y = (image[:, 0] + text[:, 1] > 0).astype(int) + 2 * (image[:, 2] > 0.5)
    model = probe_model([image], text, y, num_classes=4)
    unit = lambda v: v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)  # noqa: E731
    x = np.concatenate([unit(image), unit(text)], 1)
    want = LogisticRegression(C=10, max_iter=1000, random_state=0).fit(x, y).predict_proba(x)
    np.testing.assert_allclose(model.predict({"image": image, "text": text}, verbose=0), want, atol=1e-5)


def test_late_fusion_settings_are_checked():
    from prodfuse.modeling.config import TrainConfig

    with pytest.raises(ValueError, match="probe_expert joins the product fusion.*got fusion 'stack'"):
        TrainConfig(fusion="stack", probe_expert=True)
    assert TrainConfig().uses_probe_expert and not TrainConfig(probe_expert=False).uses_probe_expert
    # where it does not apply, the default leaves it off instead of refusing
    assert not TrainConfig(fusion="gated").uses_probe_expert and not TrainConfig(text_branch="none").uses_probe_expert
    with pytest.raises(ValueError, match="stack_folds"):
        TrainConfig(fusion="stack", stack_folds=1)
    with pytest.raises(ValueError, match="staged training.*'joint'"):
        TrainConfig(fusion="joint", staged=True)


@pytest.mark.parametrize("fusion", ["joint", "product"])
def test_an_ensemble_of_late_fusions_is_one_model(synth, tmp_path, fusion):
    """Each member is named apart, so the averaged model builds, saves and loads (a joint ensemble did not)."""
    r = train(synth, tmp_path / fusion, "--fusion", fusion, "--ensemble", "2", "--epochs", "3")
    model = keras.models.load_model(Path(r["run"]) / "model.keras")
    assert [layer.name for layer in model.layers if isinstance(layer, keras.Model)] == ["member_0", "member_1"]
    assert r["metrics"]["val"]["accuracy"] > 0.25
