"""Evaluation: metrics against scikit-learn, ablation inputs, and the `evaluate` command on a tiny trained run."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import classification_report, f1_score, top_k_accuracy_score

from prodfuse.evaluation.evaluate import confusion, gate_per_class, modality_ablation, per_class_report
from prodfuse.evaluation.plots import plot_confusion, top_confusions
from prodfuse.modeling.metrics import classification_metrics, expected_calibration_error
from synthetic import write_synthetic_shards


def make_shards(folder, labels, image_dim=16, text_dim=8, seed=0, shard_rows=25, spread=2.0):
    """A complete shard folder whose image and text vectors sit near a per-class centre (`spread` apart)."""
    rng = np.random.default_rng(seed)
    names = sorted(set(labels))
    y = np.array([names.index(c) for c in labels])
    n = len(labels)
    img = (rng.normal(size=(len(names), image_dim))[y] * spread + rng.normal(size=(n, image_dim))).astype(np.float32)
    txt = (rng.normal(size=(len(names), text_dim))[y] * spread + rng.normal(size=(n, text_dim))).astype(np.float32)
    return write_synthetic_shards(
        folder,
        img,
        txt,
        np.asarray(labels),
        tokens=np.ones((n, 60), np.int32),
        shard_rows=shard_rows,
        ids=[f"p{seed}-{i:04d}" for i in range(n)],
        extra={"group": ["even" if c % 2 == 0 else "odd" for c in y]},
    )


# ------------------------------------------------------------------------------------------ pure functions


def _fixed_predictions():
    rng = np.random.default_rng(7)
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3, 4, 4, 1, 0, 3, 2])
    probs = rng.random((len(y), 6)) + np.eye(6)[y] * rng.random((len(y), 1)) * 1.2  # mostly right, some wrong
    return y, probs / probs.sum(axis=1, keepdims=True)


def test_metrics_match_scikit_learn():
    y, probs = _fixed_predictions()
    pred = probs.argmax(1)
    m = classification_metrics(y, probs)
    assert m["accuracy"] == pytest.approx(np.mean(pred == y))
    assert 0 < m["accuracy"] < 1  # the fixture has both right and wrong items
    for k in (3, 5):
        assert m[f"top{k}_accuracy"] == pytest.approx(top_k_accuracy_score(y, probs, k=k, labels=range(6)))
    assert m["weighted_f1"] == pytest.approx(f1_score(y, pred, average="weighted"))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["n"] == len(y)


def test_per_class_report_matches_classification_report():
    y, probs = _fixed_predictions()
    pred = probs.argmax(1)
    classes = ["a", "b", "c", "d", "e", "f"]
    rep = per_class_report(y, pred, classes)
    ref = classification_report(y, pred, labels=range(6), target_names=classes, output_dict=True, zero_division=0)
    assert list(rep["class"]) == classes
    for _, row in rep.iterrows():
        r = ref[row["class"]]
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx(
            (r["precision"], r["recall"], r["f1-score"], r["support"])
        )
    assert rep["predicted"].sum() == len(y) and rep.loc[5, "support"] == 0


def test_top_confusions_are_the_largest_off_diagonal_cells(tmp_path):
    y = np.array([0] * 5 + [1] * 4 + [2] * 3)
    pred = np.array([0, 0, 1, 1, 1, 1, 1, 0, 2, 2, 2, 0])
    cm = confusion(y, pred, 3)
    assert cm.tolist() == [[2, 3, 0], [1, 2, 1], [1, 0, 2]]
    top = top_confusions(cm, ["x", "y", "z"], n=10)
    assert top[0] == {"true": "x", "pred": "y", "count": 3, "share_of_true": 0.6}
    assert [(t["true"], t["pred"]) for t in top[1:]] == [("y", "x"), ("y", "z"), ("z", "x")]
    plot_confusion(
        np.random.default_rng(0).integers(0, 9, (90, 90)), [f"c{i}" for i in range(90)], tmp_path / "cm.png"
    )  # 90 classes must not blow up the figure
    assert (tmp_path / "cm.png").stat().st_size > 10_000


class RecordingModel:
    """Stands in for a Keras model: records every input dict and answers from the image/text sums."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, training=False):  # few rows: called directly, as Keras models are
        return self.predict(x)

    def predict(self, x, batch_size=None, verbose=0):
        self.calls.append({k: np.array(v) for k, v in x.items()})
        score = sum(np.asarray(v, dtype=float).sum(axis=1, keepdims=True) for v in x.values())
        logits = np.concatenate([score, -score, np.zeros_like(score)], axis=1)
        e = np.exp(logits - logits.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)


def test_ablation_zeroes_exactly_one_stream():
    rng = np.random.default_rng(0)
    arrays = {"image": rng.random((6, 4)).astype(np.float32), "tokens": rng.integers(1, 9, (6, 5)).astype(np.int32)}
    model = RecordingModel()
    res = modality_ablation(model, arrays, np.zeros(6, int))
    both, no_image, no_text = model.calls
    for k in arrays:
        np.testing.assert_array_equal(both[k], arrays[k])
    assert not no_image["image"].any()
    np.testing.assert_array_equal(no_image["tokens"], arrays["tokens"])
    np.testing.assert_array_equal(no_text["image"], arrays["image"])
    assert not no_text["tokens"].any()  # all padding
    assert arrays["image"].all() and arrays["tokens"].all()  # the caller's arrays are untouched
    assert set(res) == {"both", "no_image", "no_text"} and res["both"]["accuracy"] == 1.0


def test_ablation_of_an_absent_stream_is_none():
    model = RecordingModel()
    res = modality_ablation(model, {"image": np.ones((4, 3), np.float32)}, np.zeros(4, int))
    assert res["no_text"] is None and res["no_image"] is not None
    assert len(model.calls) == 2


def test_gate_per_class_means():
    df = gate_per_class(np.array([0.2, 0.4, 0.9, 1.0]), np.array([0, 0, 2, 2]), ["a", "b", "c"])
    assert df["image_gate"].tolist()[0] == pytest.approx(0.3) and np.isnan(df["image_gate"][1])
    assert df["text_share"][2] == pytest.approx(0.05) and df["n"].tolist() == [2, 0, 2]


# ------------------------------------------------------------------------------------------ the command


@pytest.fixture(scope="module")
def gated_run(tmp_path_factory):
    import prodfuse

    root = tmp_path_factory.mktemp("eval")
    # Noisy on purpose: the run must make mistakes, so scoring other rows than its test split would show.
    emb = make_shards(root / "emb", [c for c in "abcd" for _ in range(15)], spread=0.7)
    config = prodfuse.TrainConfig(embeddings=str(emb), out=str(root / "run"), epochs=10, fusion="gated", verbose=0)
    import tensorflow as tf

    tf.config.run_functions_eagerly(True)  # on 60 rows graph tracing would be most of the training time
    try:
        prodfuse.train(config)
    finally:
        tf.config.run_functions_eagerly(False)
    return root


def test_evaluate_scores_the_runs_own_test_split(gated_run, capsys):
    from prodfuse.cli import main

    out = gated_run / "ev"
    assert main(["evaluate", "--run", str(gated_run / "run"), "--group-col", "group", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    trained = json.loads((gated_run / "run" / "metrics.json").read_text())["test"]
    config = json.loads((gated_run / "run" / "config.json").read_text())
    # the split was recomputed exactly as training made it: same rows, same numbers
    assert m["n"] == config["splits"]["test"] == trained["n"] == 8
    for key in ("accuracy", "top3_accuracy", "weighted_f1", "macro_f1"):
        assert m[key] == pytest.approx(trained[key])
    assert 0.3 < m["accuracy"] < 1.0
    assert m["split"] == "test" and m["unknown_label_rows"] == 0
    assert set(m["per_group"]) == {"even", "odd"} and sum(g["n"] for g in m["per_group"].values()) == 8
    assert all(m["ablation"][k] is not None for k in ("both", "no_image", "no_text"))
    assert m["ablation"]["both"]["accuracy"] == pytest.approx(m["accuracy"])
    assert 0 < m["ablation"]["gate_mean"] < 1
    t = json.loads((gated_run / "run" / "temperature.json").read_text())
    assert t["temperature"] == pytest.approx(m["temperature"]) and t["n"] == config["splits"]["val"]
    report = (out / "report.md").read_text()
    for png in ("confusion.png", "reliability.png", "confusion_even.png", "confusion_odd.png"):
        assert (out / png).is_file() and f"]({png})" in report
    per_class = pd.read_csv(out / "per_class.csv")
    assert per_class["class"].tolist() == list("abcd") and per_class["support"].sum() == 8
    assert len(pd.read_csv(out / "gate_per_class.csv")) == 4
    preds = pd.read_csv(out / "predictions.csv")
    assert len(preds) == 8 and np.allclose(preds[[f"prob_{i}" for i in range(1, 5)]].sum(axis=1), 1, atol=1e-5)
    # the calibrated ECE in metrics.json is the ECE of the calibrated probabilities written per item
    classes = list("abcd")
    full = np.zeros((8, 4))
    for i in range(1, 5):
        full[np.arange(8), [classes.index(c) for c in preds[f"label_{i}"]]] = preds[f"prob_{i}"]
    y = np.array([classes.index(c) for c in preds["label"]])
    assert m["ece_calibrated"] == pytest.approx(expected_calibration_error(y, full), abs=1e-4)
    assert "accuracy" in capsys.readouterr().out


def test_evaluate_other_folder_reports_unknown_labels(gated_run):
    from prodfuse.cli import main

    other = make_shards(gated_run / "other", list("abcd") * 2 + ["zz", "zz", "yy"], seed=0)
    out = gated_run / "ev_other"
    assert main(["evaluate", "--run", str(gated_run / "run"), "--embeddings", str(other), "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["split"] == "all" and m["n"] == 8
    assert m["unknown_label_rows"] == 3 and m["unknown_labels"] == {"zz": 2, "yy": 1}
    assert len(pd.read_csv(out / "predictions.csv")) == 11  # reported and predicted, just not scored
    assert "never saw" in (out / "report.md").read_text()


def test_evaluate_leaves_out_and_counts_the_rows_with_an_empty_label(gated_run, capsys):
    from prodfuse.cli import main
    from prodfuse.evaluation.config import EvaluateConfig
    from prodfuse.evaluation.evaluate import evaluate

    other = make_shards(gated_run / "unlabelled", list("abcd") * 2 + ["", "nan", "None", " ", "zz"], seed=0)
    out = gated_run / "ev_unlabelled"
    assert main(["evaluate", "--run", str(gated_run / "run"), "--embeddings", str(other), "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 8 and m["unlabelled_rows"] == 4
    assert m["unknown_label_rows"] == 1 and m["unknown_labels"] == {"zz": 1}  # an empty label is not an unknown class
    assert "4 rows have an empty label (unlabelled, not scored)" in capsys.readouterr().out
    assert "4 rows with an empty label were not scored" in (out / "report.md").read_text()
    preds = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert len(preds) == 13 and preds["label"].tolist()[8:] == ["", "", "", "", "zz"]  # predicted, not scored
    nothing = make_shards(gated_run / "all_unlabelled", ["", "nan", "None"], seed=0)
    with pytest.raises(ValueError, match=r"Every one of the 3 rows selected .* has an empty 'label' label"):
        evaluate(EvaluateConfig(run=str(gated_run / "run"), embeddings=str(nothing), out=str(gated_run / "ev_none")))


def test_evaluate_rejects_a_missing_group_column(gated_run, capsys):
    from prodfuse.cli import main

    assert (
        main(["evaluate", "--run", str(gated_run / "run"), "--group-col", "aisle", "--out", str(gated_run / "ev_bad")])
        == 2
    )
    assert "'aisle'" in capsys.readouterr().err
