"""Training on synthetic shards: fusion must use both streams; the gate must lean to the stream that carries the class."""

import json
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

import prodfuse
from prodfuse.cli import build_parser
from prodfuse.cli import train as train_cli
from prodfuse.data.splits import stratified_split
from prodfuse.modeling import model as model_lib
from prodfuse.modeling.training import balanced_class_weights
from synthetic import image_vs_text_classes, write_synthetic_shards


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    img, txt, labels = image_vs_text_classes()
    return write_synthetic_shards(tmp_path_factory.mktemp("synth"), img, txt, labels)


def train_config(*argv):
    """The TrainConfig the command line makes of `prodfuse train ARGV` (flags checked as the CLI does)."""
    args = build_parser().parse_args(["train", *argv])
    args.stderr_tty = False
    return train_cli.config(args)


def train(emb, out, *extra):
    run = prodfuse.train(
        train_config(
            "--embeddings",
            str(emb),
            "--out",
            str(out),
            "--epochs",
            "25",
            "--patience",
            "8",
            "--batch-size",
            "64",
            "--quiet",
            *extra,
        )
    )
    return {"run": str(run.path), "metrics": run.metrics, "best_epoch": run.config["best_epoch"], "loaded": run}


@pytest.fixture(scope="module")
def runs(synth, tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    return {
        name: train(synth, base / name, *flags)
        for name, flags in {
            "concat": ["--fusion", "concat"],
            "gated": ["--fusion", "gated"],
            "product": ["--fusion", "product", "--no-probe-expert"],  # the two streams' product (test_late_fusions)
            "gated_deep_only": [
                *("--fusion", "gated", "--no-wide", "--modality-dropout", "0", "--input-norm", "none"),
                # the mechanism alone: decay pulls the gate's weights (so its logit) to 0, and the lowest-loss epoch
                # of this easy task comes before the gate has moved far from one half
                *("--weight-decay", "0", "--monitor", "val_accuracy"),
            ],
        }.items()
    }


def test_fusion_uses_both_streams_and_unimodal_cannot(runs):
    for name in ("concat", "gated", "gated_deep_only", "product"):
        assert runs[name]["metrics"]["val"]["accuracy"] >= 0.95, name
    # each unimodal model can only tell apart one pair of classes: at best ~75% (the product run trains both alone,
    # as --text-branch none and --image-branch none do, and records their validation accuracy)
    fit = runs["product"]["loaded"].config["product_fusion"]["fit"]
    for stream in ("image", "text"):
        assert 0.4 < fit[stream]["accuracy"] < 0.85, stream


def test_gate_leans_to_the_stream_that_carries_the_class(runs, synth):
    # The gate mechanism on its own: without the wide path the gate alone decides how much each stream says (with
    # it, the linear path also does), without modality dropout no image-class item is seen with its image blanked,
    # without the in-model L2 norm the raw image scale reaches the gate as in the GMU paper, and without weight decay
    # nothing pulls the gate towards one half.
    from prodfuse.data.shards import read_shards

    run = runs["gated_deep_only"]["run"]
    model = keras.models.load_model(f"{run}/model.keras")
    data = read_shards(synth, ["image_embedding", "text_embedding", "label"])
    gates = model_lib.gate_model(model).predict(
        {"image": data["image_embedding"], "text": data["text_embedding"]}, verbose=0
    )
    mean = pd.Series(gates.mean(1)).groupby(data["label"]).mean()
    assert mean["img_a"] > 0.5 and mean["img_b"] > 0.5  # no text: the image dominates
    assert mean["txt_c"] < 0.5 and mean["txt_d"] < 0.5  # image uninformative: the text dominates


def test_run_folder_contents_and_early_stopping_restores_best(runs):
    run = runs["concat"]["run"]
    from pathlib import Path

    p = Path(run)
    for f in ("model.keras", "labels.json", "config.json", "history.csv", "metrics.json", "curves.png"):
        assert (p / f).is_file(), f
    assert not (p / "checkpoint.keras").exists()
    metrics = json.loads((p / "metrics.json").read_text())
    assert set(metrics["val"]) >= {"accuracy", "weighted_f1", "macro_f1"} and "test" in metrics
    hist = pd.read_csv(p / "history.csv")
    # the saved model is the best epoch's (by the default monitor, the validation loss), not the last
    assert metrics["val"]["accuracy"] == pytest.approx(hist["val_accuracy"][hist["val_loss"].idxmin()], abs=1e-6)
    config = json.loads((p / "config.json").read_text())
    assert config["splits"]["train"] + config["splits"]["val"] + config["splits"]["test"] == 600
    assert len(config["manifest_sha256"]) == 64 and config["train"]["fusion"] == "concat"
    assert config["schema_version"] == 2 and config["model_sha256"] == prodfuse.Run.load(p).fingerprint
    assert json.loads((p / "labels.json").read_text()) == ["img_a", "img_b", "txt_c", "txt_d"]


def test_product_fusion_multiplies_two_models_trained_alone(runs, synth):
    from prodfuse.data.shards import read_shards

    p = Path(runs["product"]["run"])
    for stream in ("image", "text"):
        assert (p / stream / "history.csv").is_file() and (p / stream / "curves.png").is_file(), stream
        assert not (p / stream / "checkpoint.keras").exists()
    hist = pd.read_csv(p / "history.csv")
    assert list(hist.columns[:1]) == ["stream"] and set(hist["stream"]) == {"image", "text"}
    fit = json.loads((p / "config.json").read_text())["product_fusion"]["fit"]
    a, b = fit["product"]["weights"]
    # each stream carries two of the four classes: both get a say, and together they beat either alone
    assert a > 0.2 and b > 0.2, (a, b)
    assert fit["product"]["accuracy"] > max(fit["image"]["accuracy"], fit["text"]["accuracy"]) + 0.15
    assert set(fit["best_epoch"]) == {"image", "text"}

    model = keras.models.load_model(p / "model.keras")  # registered layers only: no custom objects
    data = read_shards(synth, ["image_embedding", "text_embedding"], rows=np.arange(40))
    x = {"image": data["image_embedding"], "text": data["text_embedding"]}
    both = model.predict(x, verbose=0)
    p_img = model.get_layer("prodfuse_mlp_none").predict({"image": x["image"]}, verbose=0)
    p_txt = model.get_layer("prodfuse_none_mlp").predict({"text": x["text"]}, verbose=0)
    has_text = np.any(x["text"] != 0, axis=1)[:, None]
    z = a * np.log(p_img) + b * has_text * np.log(p_txt)
    np.testing.assert_allclose(both, np.exp(z) / np.exp(z).sum(1, keepdims=True), atol=1e-4)
    # no text: the image model's word alone (sharpened by its weight)
    alone = model.predict({**x, "text": np.zeros_like(x["text"])}, verbose=0)
    np.testing.assert_array_equal(alone.argmax(1), p_img.argmax(1))


def test_early_stopping_restores_best_weights_not_last(synth, tmp_path):
    # a huge learning rate makes later epochs worse than the best; the saved model must still be the best one
    args = [
        "--fusion",
        "concat",
        "--lr",
        "0.5",
        "--patience",
        "3",
        "--label-smoothing",
        "0",
        "--monitor",
        "val_accuracy",
    ]
    r = train(synth, tmp_path / "r", *args)
    hist = pd.read_csv(tmp_path / "r" / "history.csv")
    assert r["metrics"]["val"]["accuracy"] == pytest.approx(hist["val_accuracy"].max(), abs=1e-6)
    assert r["best_epoch"] == int(hist["val_accuracy"].idxmax()) + 1


def test_saved_model_loads_without_custom_objects(runs, synth):
    from prodfuse.data.shards import read_shards

    data = read_shards(synth, ["image_embedding", "text_embedding"], rows=np.arange(10))
    m = keras.models.load_model(f"{runs['gated']['run']}/model.keras")
    p = m.predict({"image": data["image_embedding"], "text": data["text_embedding"]}, verbose=0)
    assert p.shape == (10, 4) and np.allclose(p.sum(1), 1, atol=1e-5)


def test_staged_and_cnn_and_cosine_run(synth, tmp_path):
    r = train(synth, tmp_path / "s", "--staged", "--fusion", "gated", "--epochs", "6")
    assert r["metrics"]["val"]["accuracy"] > 0.8
    r = train(synth, tmp_path / "c", "--text-branch", "cnn", "--lr-schedule", "cosine", "--epochs", "3")
    assert r["metrics"]["val"]["accuracy"] > 0.3  # tokens are all padding here: the image carries half the classes


def test_class_weights_formula():
    y = np.array([0, 0, 0, 1, 2, 2])
    w = balanced_class_weights(y, 4)
    assert w == {0: 6 / (3 * 3), 1: 6 / (3 * 1), 2: 6 / (3 * 2)}  # n / (k * n_c); class 3 absent


def test_stratified_split_reports_small_classes():
    labels = np.array(["a"] * 20 + ["b"] * 5 + ["c"] * 2)
    splits, small = stratified_split(labels, seed=1)
    assert small == [("c", 2)]
    assert sorted(np.concatenate(list(splits.values())).tolist()) == list(range(27))  # nothing lost
    assert {len(splits["val"]), len(splits["test"])} == {3}  # a: 2 + b: 1
    again, _ = stratified_split(labels, seed=1)
    assert all(np.array_equal(splits[k], again[k]) for k in splits)


def test_missing_demo_shards_message(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="Run `python extract_embeddings.py` first"):
        prodfuse.train(prodfuse.TrainConfig())


def test_branch_rate_adam_scales_only_branch_steps():
    from prodfuse.modeling.optimizer import BranchRateAdam

    inp = keras.Input((1,), name="image")
    h = keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros", name="image_dense_0")(inp)
    out = keras.layers.Dense(1, use_bias=False, kernel_initializer="ones", name="fusion_dense")(h)
    m = keras.Model(inp, out)
    opt = BranchRateAdam(branch_rate=0.1, learning_rate=0.01)
    opt.build(m.trainable_variables)
    grads = [np.ones((1, 1), np.float32), np.ones((1, 1), np.float32)]
    before = [v.numpy().copy() for v in m.trainable_variables]
    opt.apply_gradients(zip(grads, m.trainable_variables))
    steps = [abs(float((v.numpy() - b).ravel()[0])) for v, b in zip(m.trainable_variables, before)]
    assert steps[1] == pytest.approx(0.01, rel=1e-3)  # fusion: full rate (Adam's first step = lr)
    assert steps[0] == pytest.approx(0.001, rel=1e-3)  # branch: a tenth


def test_kfold_split_partitions_every_class():
    from prodfuse.data.splits import kfold_split

    labels = np.array(["a"] * 10 + ["b"] * 7 + ["c"] * 2)
    tests = []
    for k in range(5):
        s, small = kfold_split(labels, 5, k, seed=3)
        assert small == [("c", 2)]
        rows = np.concatenate(list(s.values()))
        assert sorted(rows.tolist()) == list(range(19))  # a partition: nothing lost, nothing twice
        assert len(s["test"]) in (3, 4) and len(s["val"]) in (3, 4)  # a: 2 per fold, b: 1 or 2
        tests.append(s["test"])
    assert sorted(np.concatenate(tests).tolist()) == list(range(17))  # every splittable item is tested once
    again, _ = kfold_split(labels, 5, 2, seed=3)
    assert np.array_equal(again["test"], tests[2])
    with pytest.raises(ValueError, match="folds must be an int >= 3"):
        kfold_split(labels, 2, 0, seed=3)


def test_folds_leave_the_split_columns_test_rows_out():
    from prodfuse.data.splits import make_splits

    labels = np.array(["a", "b"] * 15)
    split = np.array(["train"] * 20 + ["val"] * 4 + ["Test"] * 6)
    tests = []
    for k in range(3):
        s, _, how = make_splits(labels, split, "split", seed=1, folds=3, fold=k)
        rows = np.concatenate(list(s.values()))
        assert sorted(rows.tolist()) == list(range(24)), how  # the 6 test rows are in no fold
        tests.append(s["test"])
    assert sorted(np.concatenate(tests).tolist()) == list(range(24)) and "'split' train and val rows" in how
    s, _, _ = make_splits(labels, None, None, seed=1, folds=3, fold=0)  # no split column: folds over every row
    assert len(np.concatenate(list(s.values()))) == 30


def test_separate_test_folder_leaves_train_and_val_to_the_main_folder():
    from prodfuse.data.splits import plan_splits

    labels = np.array(["a"] * 20 + ["b"] * 10)
    plan, _, source = plan_splits(labels, None, None, 0, n_test_folder=7)
    assert plan["test"][0] == "test" and plan["test"][1].tolist() == list(range(7))
    assert {plan["train"][0], plan["val"][0]} == {"main"}
    assert len(plan["val"][1]) == 3 and len(plan["train"][1]) == 27  # 90/10, no test rows taken from main
    assert "separate test folder" in source


def test_rows_with_an_empty_label_are_in_no_split():
    from prodfuse.data.shards import empty_cells
    from prodfuse.data.splits import plan_labelled_splits, plan_splits

    assert empty_cells([None, float("nan"), "", "  ", "nan", "None", "red", "0"]).tolist() == [True] * 6 + [False] * 2
    labels = np.array(["a"] * 10 + ["nan"] * 3 + ["b"] * 10 + ["", None], dtype=object)
    empty = {10, 11, 12, 23, 24}
    plan, small, _, n = plan_labelled_splits({"main": labels}, None, None, 0, label_col="label")
    rows = np.concatenate([r for _, r in plan.values()])
    assert n == 5 and sorted(rows.tolist()) == sorted(set(range(25)) - empty) and small == []  # no class "nan"
    split = np.array(["train", "val", "test"] * 8 + [None], dtype=object)  # an unlabelled row's split may be empty
    plan, _, _, n = plan_labelled_splits({"main": labels}, split, "split", 0, label_col="label")
    assert n == 5 and not set(np.concatenate([r for _, r in plan.values()]).tolist()) & empty
    plan, _, _, n = plan_labelled_splits(
        {"main": labels, "val": np.array(["a", "None", "b"])}, None, None, 0, label_col="label"
    )
    assert plan["val"][0] == "val" and plan["val"][1].tolist() == [0, 2] and n == 6
    with pytest.raises(ValueError, match=r"every one of the 3 rows of 'v' has an empty 'cat' label.*--label-col"):
        plan_labelled_splits(
            {"main": labels, "val": np.array(["", "nan", None])}, None, None, 0, label_col="cat", folders={"val": "v"}
        )
    # runs trained before unlabelled rows were left out: their splits, recomputed by evaluate, were over every row
    old, _, _, n = plan_labelled_splits({"main": labels}, None, None, 0, label_col="label", skip_empty=False)
    again, _, _ = plan_splits(labels.astype(str), None, None, 0)
    assert n == 0 and all(np.array_equal(old[k][1], again[k][1]) for k in old)


def test_train_leaves_out_and_counts_the_rows_with_an_empty_label(tmp_path, eager, capsys):
    from prodfuse.cli import main

    img, txt, labels = image_vs_text_classes(n_per_class=20)
    labels = labels.astype(object)
    empty = [0, 5, 9, 30, 61, 77, 78]
    labels[empty] = ["", "nan", "None", None, "", " ", None]  # None: a null cell in the shards
    emb = write_synthetic_shards(tmp_path / "emb", img, txt, labels, shard_rows=30)
    run = tmp_path / "run"
    argv = ["--embeddings", str(emb), "--out", str(run), "--fusion", "concat", "--epochs", "1", "--quiet"]
    assert main(["train", *argv]) == 0
    assert json.loads((run / "labels.json").read_text()) == ["img_a", "img_b", "txt_c", "txt_d"]
    config = json.loads((run / "config.json").read_text())
    s = config["splits"]
    assert s["unlabelled_rows"] == len(empty) and s["train"] + s["val"] + s["test"] == len(labels) - len(empty)
    assert all(set(counts) == {"img_a", "img_b", "txt_c", "txt_d"} for counts in config["class_counts"].values())
    assert f"rows with an empty 'label' label (unlabelled, left out of every split): {len(empty)}" in (
        capsys.readouterr().out
    )
    labels[:] = ["", "nan", None, " "] * 20
    nothing = write_synthetic_shards(tmp_path / "nothing", img, txt, labels)
    with pytest.raises(ValueError, match=r"every one of the 80 rows of .* has an empty 'label' label.*--label-col"):
        prodfuse.train(prodfuse.TrainConfig(embeddings=str(nothing), out=str(tmp_path / "r2"), verbose=0))


def test_ensemble_saves_the_mean_of_its_members(synth, tmp_path):
    from prodfuse.data.sequence import read_items

    r = train(synth, tmp_path / "ens", "--fusion", "gated", "--ensemble", "2", "--epochs", "3")
    run = prodfuse.Run.load(r["run"])  # one model.keras
    model = run.model
    members = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    assert [m.name for m in members] == ["member_0", "member_1"]
    x = read_items(synth, run.inputs, rows=np.arange(20))
    probs = model.predict(x, verbose=0)
    np.testing.assert_allclose(probs, np.mean([m.predict(x, verbose=0) for m in members], axis=0), atol=1e-6)
    assert not np.allclose(members[0].predict(x, verbose=0), members[1].predict(x, verbose=0))  # two seeds
    with pytest.raises(ValueError, match="--ensemble 2 cannot be combined with staged"):
        train(synth, tmp_path / "bad", "--fusion", "gated", "--ensemble", "2", "--staged")


def test_without_out_each_run_gets_its_own_folder(synth, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = prodfuse.TrainConfig(embeddings=str(synth), epochs=1, verbose=0)
    first, second = prodfuse.train(cfg), prodfuse.train(cfg)
    name = f"{synth.name}-product"
    assert (first.path, second.path) == (Path("runs") / name, Path("runs") / f"{name}-2")
    assert (second.path / "model.keras").is_file()
    assert (first.path / "model.keras").is_file()  # the first run is untouched


def test_monitor_val_loss_restores_the_lowest_loss_epoch_and_weight_decay_shrinks_weights(synth, tmp_path):
    from prodfuse.modeling.optimizer import make_optimizer

    r = train(synth, tmp_path / "r", "--fusion", "concat", "--lr", "0.5", "--patience", "3", "--monitor", "val_loss")
    hist = pd.read_csv(tmp_path / "r" / "history.csv")
    assert r["best_epoch"] == int(hist["val_loss"].idxmin()) + 1
    assert r["metrics"]["val"]["accuracy"] == pytest.approx(hist["val_accuracy"][hist["val_loss"].idxmin()], abs=1e-6)
    # decoupled decay: with a zero gradient, one step multiplies each weight by (1 - lr * weight_decay)
    w = keras.Variable(np.ones(3, np.float32))
    opt = make_optimizer(0.1, "plateau", 1, 1, weight_decay=0.05)
    opt.apply_gradients([(keras.ops.zeros(3), w)])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(w), 1 - 0.1 * 0.05, rtol=1e-6)
    assert make_optimizer(0.1, "plateau", 1, 1).weight_decay is None
