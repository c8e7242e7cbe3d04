"""Category hierarchies (issue 30): the tree learned from label columns, coarse levels as sums of the leaf model's
probabilities, back-off to a minimum confidence, per-level metrics, and the path through predict and the service."""

import json
import time
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import prodfuse
from prodfuse.cli import main
from prodfuse.cli.common import ConfigError
from prodfuse.modeling.hierarchy import (
    Hierarchy,
    back_off,
    best_paths,
    check_min_confidence,
    hierarchy_metrics,
    learn_hierarchy,
    level_probabilities,
    path_records,
)
from synthetic import image_vs_text_classes, write_synthetic_shards

LEVELS = ("family", "kind", "label")
# synthetic classes -> (family, kind): img_a and img_b are told apart by the photo, txt_c and txt_d by the text
TREE = {"img_a": ("photo", "A"), "img_b": ("photo", "B"), "txt_c": ("words", "T"), "txt_d": ("words", "T")}


def _columns(labels, tree=TREE) -> dict:
    return {
        "family": [tree[c][0] for c in labels],
        "kind": [tree[c][1] for c in labels],
        "label": list(labels),
    }


def _small_tree() -> Hierarchy:
    labels = ["img_a", "img_b", "txt_c", "txt_d", "txt_c"]
    return learn_hierarchy(_columns(labels), LEVELS)


# ------------------------------------------------------------------------------------------------ the tree


def test_tree_is_learned_from_the_labelled_rows():
    cols = _columns(["img_a", "img_b", "txt_c", "txt_d", "img_a"])
    h = learn_hierarchy(cols, LEVELS)
    assert h.levels == LEVELS and h.leaf_level == "label"
    assert h.parents == {
        "kind": {"A": "photo", "B": "photo", "T": "words"},
        "label": {"img_a": "A", "img_b": "B", "txt_c": "T", "txt_d": "T"},
    }
    assert h.path("txt_d") == ("words", "T", "txt_d")
    assert h.nodes("family") == ["photo", "words"] and h.nodes("label") == ["img_a", "img_b", "txt_c", "txt_d"]
    assert h.is_path(("photo", "A", "img_a")) and not h.is_path(("words", "A", "img_a"))
    assert not h.is_path(("photo", "img_a"))
    assert Hierarchy.from_dict(json.loads(json.dumps(h.to_dict()))) == h


def test_a_label_with_two_parents_is_an_error_naming_it_unless_majority():
    cols = _columns(["img_a"] * 3 + ["img_b", "txt_c"])
    cols["kind"][0] = "B"  # one img_a row filed under kind B
    with pytest.raises(ValueError) as e:
        learn_hierarchy(cols, LEVELS)
    msg = str(e.value)
    assert "label 'img_a' has 2 parents at level 'kind'" in msg and "'A' (2 rows), 'B' (1 rows)" in msg
    assert "--label-parents majority" in msg
    h = learn_hierarchy(cols, LEVELS, "majority")
    assert h.parents["label"]["img_a"] == "A"
    assert h.conflicts == [{"level": "label", "label": "img_a", "parents": {"A": 2, "B": 1}, "kept": "A"}]
    # a node of a middle level under two roots is a conflict too: the levels would not form a tree
    cols = _columns(["img_a", "img_b", "img_b", "txt_c"])
    cols["family"][1] = "words"
    with pytest.raises(ValueError, match="kind 'B' has 2 parents at level 'family'"):
        learn_hierarchy(cols, LEVELS)


@pytest.mark.parametrize("empty", [None, "", float("nan")])
def test_a_row_with_an_empty_finest_label_is_unlabelled_not_a_class(empty):
    # as in flat training: the row is in no split, and its coarser cells do not shape the tree
    cols = _columns(["img_a", "img_b", "txt_c"])
    cols["label"][1], cols["kind"][1] = empty, "C"
    tree = learn_hierarchy(cols, LEVELS, ids=["p0", "p1", "p2"])
    assert tree.parents == {"kind": {"A": "photo", "T": "words"}, "label": {"img_a": "A", "txt_c": "T"}}
    cols["label"] = [empty] * 3
    with pytest.raises(ValueError, match="no row has a 'label' label"):
        learn_hierarchy(cols, LEVELS)


def test_an_empty_coarser_label_on_a_labelled_row_is_an_error():
    cols = _columns(["img_a", "img_b", "txt_c"])
    cols["kind"][2] = ""
    with pytest.raises(ValueError, match=r"1 rows with a 'label' label have no 'kind' \(empty\), e.g. ids \['p2'\]"):
        learn_hierarchy(cols, LEVELS, ids=["p0", "p1", "p2"])


def test_label_cols_flag_checks(tmp_path):
    from prodfuse.cli import build_parser
    from prodfuse.cli import train as train_cli

    def config(*argv):
        args = build_parser().parse_args(["train", *argv])
        args.stderr_tty = False
        return train_cli.config(args)

    cfg = config("--label-cols", "family, kind,label")
    assert cfg.label_cols == ("family", "kind", "label") and cfg.label_col == "label"
    assert config("--label-cols", "family,label", "--label-col", "label").label_col == "label"
    with pytest.raises(ConfigError, match=r"--label-cols needs at least two columns.*got \['label'\]"):
        config("--label-cols", "label")
    with pytest.raises(ConfigError, match=r"--label-cols names \['kind'\] more than once"):
        config("--label-cols", "kind,kind,label")
    with pytest.raises(ConfigError, match="--label-col 'kind' is not the finest of label_cols"):
        config("--label-cols", "family,label", "--label-col", "kind")
    with pytest.raises(ConfigError, match="--label-parents 'majority' applies to a hierarchy"):
        config("--label-parents", "majority")


# ------------------------------------------------------------------------------------------------ probabilities


def test_level_probabilities_are_sums_of_leaves_and_the_best_path_is_consistent():
    h = _small_tree()
    classes = ["img_a", "img_b", "txt_c", "txt_d"]
    probs = np.random.default_rng(0).dirichlet(np.ones(4) * 0.3, size=200).astype(np.float32)
    levels = level_probabilities(h, probs, classes)
    assert list(levels) == list(LEVELS)
    assert levels["kind"]["nodes"] == ["A", "B", "T"] and levels["family"]["nodes"] == ["photo", "words"]
    np.testing.assert_allclose(levels["kind"]["probs"], np.c_[probs[:, 0], probs[:, 1], probs[:, 2] + probs[:, 3]])
    np.testing.assert_allclose(levels["family"]["probs"], np.c_[probs[:, :2].sum(1), probs[:, 2:].sum(1)], rtol=1e-6)
    for lv in levels.values():
        np.testing.assert_allclose(lv["probs"].sum(1), 1, rtol=1e-5)
    paths = best_paths(h, probs, classes)
    leaf = probs.argmax(1)
    assert paths["label"][0].tolist() == [classes[i] for i in leaf]
    for i in range(len(probs)):
        nodes = [paths[level][0][i] for level in LEVELS]
        assert h.is_path(nodes) and tuple(nodes) == h.path(classes[leaf[i]])
    p = np.stack([paths[level][1] for level in LEVELS], 1)
    assert (np.diff(p, axis=1) <= 0).all()  # a node holds its child's leaves: never less probable


def test_back_off_answers_the_parent_when_the_leaf_is_below_the_minimum():
    h = _small_tree()
    classes = ["img_a", "img_b", "txt_c", "txt_d"]
    probs = np.array([[0.05, 0.05, 0.5, 0.4], [0.97, 0.01, 0.01, 0.01]])
    full = path_records(best_paths(h, probs, classes))
    assert [(s["level"], s["label"]) for s in full[0]] == [("family", "words"), ("kind", "T"), ("label", "txt_c")]
    assert [s["probability"] for s in full[0]] == pytest.approx([0.9, 0.9, 0.5])
    assert [s["label"] for s in back_off(full[0], 0.8)] == ["words", "T"]  # the leaf is below: its parent answers
    assert [s["label"] for s in back_off(full[0], 0.5)] == ["words", "T", "txt_c"]
    assert back_off(full[0], 0.95) == [] and back_off(full[0], None) == full[0]
    assert [len(p) for p in path_records(best_paths(h, probs, classes), 0.8)] == [2, 3]
    # metrics: an answer at a coarser level is right when it is the item's own node there
    m = hierarchy_metrics(h, probs, classes, np.array([3, 0]), {"family": ["words", "photo"], "kind": ["T", "A"]})
    assert m["levels"]["label"]["accuracy"] == 0.5 and m["levels"]["kind"]["accuracy"] == 1.0
    assert m["consistent_paths"] == 1.0
    assert m["backoff"]["0.8"] == {"leaf": 0.5, "answered": 1.0, "accuracy": 1.0}
    assert m["backoff"]["0.5"] == {"leaf": 1.0, "answered": 1.0, "accuracy": 0.5}
    assert m["backoff"]["0.99"] == {"leaf": 0.0, "answered": 0.0, "accuracy": None}


def test_consistent_paths_is_checked_against_the_tree(monkeypatch):
    import prodfuse.modeling.hierarchy as hierarchy

    h = _small_tree()
    classes = ["img_a", "img_b", "txt_c", "txt_d"]
    probs = np.array([[0.1, 0.1, 0.7, 0.1], [0.7, 0.1, 0.1, 0.1]])
    truth = {"family": ["words", "photo"], "kind": ["T", "A"]}
    assert hierarchy_metrics(h, probs, classes, np.array([2, 0]), truth)["consistent_paths"] == 1.0
    right = best_paths(h, probs, classes)
    wrong = {**right, "family": (np.array(["words", "words"], dtype=object), right["family"][1])}
    monkeypatch.setattr(hierarchy, "best_paths", lambda *a: wrong)  # as if the second path left the tree
    assert hierarchy_metrics(h, probs, classes, np.array([2, 0]), truth)["consistent_paths"] == 0.5


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan"), "0.9", True])
def test_min_confidence_must_lie_in_zero_to_one(bad):
    with pytest.raises(ValueError, match=r"min_confidence must be a number in \(0, 1\].*got " + repr(bad)[:3]):
        check_min_confidence(bad)
    with pytest.raises(ValueError, match="min_confidence"):
        back_off([], bad)


def test_min_confidence_checks_of_predict_and_the_predictor(capsys):
    assert check_min_confidence(1) == 1.0 and check_min_confidence(0.9) == 0.9 and check_min_confidence(None) is None
    with pytest.raises(ValueError, match=r"min_confidence must be a number in \(0, 1\].*got 0"):
        prodfuse.PredictConfig(run="r", out="o.csv", embeddings="e", min_confidence=0)
    args = ["predict", "--run", "r", "--embeddings", "e", "--out", "o.csv", "--min-confidence", "1.5"]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and "--min-confidence must be a number in (0, 1]" in capsys.readouterr().err
    from prodfuse.inference.predictor import check_min_confidence as for_run

    flat = SimpleNamespace(hierarchy=None, path=__import__("pathlib").Path("runs/flat"))
    assert for_run(flat, None) is None
    with pytest.raises(ValueError, match="min_confidence 0.9 backs off along a category hierarchy.*'flat' has none"):
        for_run(flat, 0.9)


# ------------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    img, txt, labels = image_vs_text_classes(n_per_class=100)
    extra = _columns(labels)
    extra.pop("label")
    # three unlabelled rows (a stray family): training leaves them out, the tree never sees them
    labels = list(labels)
    for i in (5, 150, 300):
        labels[i], extra["kind"][i], extra["family"][i] = "", "", "stray"
    return write_synthetic_shards(tmp_path_factory.mktemp("synth"), img, txt, labels, extra=extra)


def test_bad_hierarchies_stop_before_the_run_folder_is_made(synth, tmp_path, capsys):
    out = tmp_path / "run"
    # the command checks the columns from the shards' schema, before TensorFlow
    assert main(["train", "--embeddings", str(synth), "--out", str(out), "--label-cols", "family,shelf,label"]) == 2
    err = capsys.readouterr().err
    assert "--label-cols 'shelf' is not a column of the shards" in err and "'family', 'kind'" in err
    assert not out.exists()
    with pytest.raises(ValueError, match=r"label_cols \['shelf'\] are not columns of the shards.*'family', 'kind'"):
        prodfuse.train(prodfuse.TrainConfig(embeddings=str(synth), out=str(out), label_cols="family,shelf,label"))
    assert not out.exists()
    # kind -> family the wrong way round: kind T holds words, but family is finer than kind here
    with pytest.raises(ValueError, match="has 2 parents at level 'label'|has 2 parents at level 'kind'"):
        prodfuse.train(prodfuse.TrainConfig(embeddings=str(synth), out=str(out), label_cols="label,kind"))
    assert not out.exists()


@pytest.fixture(scope="module")
def trained(synth, tmp_path_factory):
    import tensorflow as tf

    out = tmp_path_factory.mktemp("runs") / "tree"
    tf.config.run_functions_eagerly(True)  # on 400 rows graph tracing would be most of the training time
    try:
        run = prodfuse.train(
            prodfuse.TrainConfig(
                embeddings=str(synth),
                out=str(out),
                label_cols="family,kind,label",
                fusion="concat",
                epochs=12,
                batch_size=64,
                verbose=0,
            )
        )
    finally:
        tf.config.run_functions_eagerly(False)
    return run


def test_train_writes_the_tree_and_per_level_metrics(trained):
    run = trained
    tree = json.loads((run.path / "hierarchy.json").read_text())
    assert tree["levels"] == list(LEVELS) and tree["parents"]["label"] == {c: k for c, (_, k) in TREE.items()}
    assert tree["conflicts"] == [] and tree["label_parents"] == "unique"
    metrics = json.loads((run.path / "metrics.json").read_text())
    assert run.config["train"]["label_cols"] == list(LEVELS) and run.config["label_col"] == "label"
    assert run.config["splits"]["unlabelled_rows"] == 3 and "" not in run.classes
    for split in ("val", "test"):
        m = metrics[split]
        print(split, {k: m[k] for k in ("accuracy", "levels", "consistent_paths")}, m["backoff"]["0.9"])
        assert m["accuracy"] >= 0.9
        assert m["levels"]["label"]["accuracy"] == m["accuracy"]  # one leaf model: the flat accuracy
        # each row's levels follow its label here, so a right leaf is right at every level above it
        assert m["levels"]["family"]["accuracy"] >= m["levels"]["kind"]["accuracy"] >= m["accuracy"]
        assert 0.9 <= m["levels"]["kind"]["weighted_f1"] <= 1
        assert m["consistent_paths"] == 1.0
        assert list(m["backoff"]) == ["0.5", "0.7", "0.8", "0.9", "0.95", "0.99"]
        answered = [b["answered"] for b in m["backoff"].values()]
        leaf = [b["leaf"] for b in m["backoff"].values()]
        assert answered == sorted(answered, reverse=True) and leaf == sorted(leaf, reverse=True)
        assert all(a >= f for a, f in zip(answered, leaf)) and answered[0] >= 0.9
        assert m["backoff"]["0.5"]["accuracy"] >= m["accuracy"] - 1e-9
    card = (run.path / "MODEL_CARD.md").read_text()
    assert "## Category hierarchy" in card and "`family` (2) > `kind` (3) > `label` (4)" in card
    assert "- Rows with an empty label (unlabelled, in no split): 3" in card
    assert prodfuse.Run.load(run.path).hierarchy == run.hierarchy


def test_evaluate_scores_each_level_from_the_shards(trained, synth, tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(["evaluate", "--run", str(trained.path), "--out", str(out)]) == 0
    assert "accuracy per level: family" in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    assert m["levels"]["label"]["accuracy"] == m["accuracy"] and m["consistent_paths"] == 1.0
    assert set(m["backoff"]["0.9"]) == {"leaf", "answered", "accuracy"}
    pred = pd.read_csv(out / "predictions.csv")
    i = list(pred.columns).index("pred_family")
    assert list(pred.columns)[i : i + 6] == [
        "pred_family",
        "prob_family",
        "pred_kind",
        "prob_kind",
        "pred_label",
        "prob_label",
    ]
    assert (pred["pred_label"] == pred["label_1"]).all() and "Category levels" in (out / "report.md").read_text()
    assert "Accuracy per level" in (trained.path / "MODEL_CARD.md").read_text()
    # shards without the coarser columns cannot be scored per level: said before any work
    img, txt, labels = image_vs_text_classes(n_per_class=10, seed=1)
    bare = write_synthetic_shards(tmp_path / "bare", img, txt, labels)
    with pytest.raises(ValueError, match=r"have no \['family', 'kind'\] column"):
        prodfuse.evaluate(prodfuse.EvaluateConfig(run=str(trained.path), embeddings=str(bare)))


# ------------------------------------------------------------------------------------------------ predict and serve

FAST = ["--backbone", "mobilenet_v2", "--weights", "none", "--image-size", "32", "--ocr", "none"]
FAST += ["--text-encoder", "tfidf", "--no-progress"]
COLOURS = {"red": (200, 30, 30), "orange": (230, 140, 20), "green": (30, 180, 40), "blue": (30, 40, 200)}
FAMILY = {"red": "warm", "orange": "warm", "green": "cool", "blue": "cool"}


@pytest.fixture(scope="module")
def catalog_run(tmp_path_factory):
    """A catalog with a department > family > colour hierarchy, extracted and trained with --label-cols."""
    root = tmp_path_factory.mktemp("tree-catalog")
    rng = np.random.default_rng(0)
    (root / "img").mkdir()
    rows = []
    for i in range(40):
        colour = list(COLOURS)[i % 4]
        arr = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 20, (36, 36, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(root / "img" / f"{i}.png")
        rows.append(
            {
                "product_id": f"c{i}",
                "image_path": f"img/{i}.png",
                "title": f"{colour} cotton shirt size {i % 3}",
                "department": "shirts",
                "family": FAMILY[colour],
                "label": colour,
            }
        )
    pd.DataFrame(rows).to_csv(root / "catalog.csv", index=False)
    assert main(["extract", "--catalog", str(root / "catalog.csv"), "--out", str(root / "emb"), *FAST]) == 0
    import tensorflow as tf

    tf.config.run_functions_eagerly(True)
    try:
        train = ["train", "--embeddings", str(root / "emb"), "--out", str(root / "run"), "--epochs", "3", "--quiet"]
        assert main([*train, "--label-cols", "department,family,label", "--fusion", "concat"]) == 0
    finally:
        tf.config.run_functions_eagerly(False)
    return root


def test_predictor_and_predict_return_the_path(catalog_run, capsys):
    root = catalog_run
    predictor = prodfuse.Predictor.from_run(root / "run")
    items = [{"image": str(root / "img" / f"{i}.png"), "title": f"{c} cotton shirt"} for i, c in enumerate(COLOURS)]
    got = predictor.predict(items, top_k=2)
    for g in got:
        path = g["path"]
        assert [s["level"] for s in path] == ["department", "family", "label"]
        assert path[-1]["label"] == g["labels"][0] and path[-1]["probability"] == pytest.approx(g["probs"][0])
        assert path[0]["label"] == "shirts" and path[0]["probability"] == pytest.approx(1.0)
        assert path[1]["label"] == FAMILY[path[2]["label"]]
        p = [s["probability"] for s in path]
        assert p[0] >= p[1] > p[2]  # a family holds two colours
        cut = predictor.predict([items[got.index(g)]], top_k=2, min_confidence=(p[1] + p[2]) / 2)[0]["path"]
        assert [s["label"] for s in cut] == [s["label"] for s in path[:2]]  # the colour is below: its family answers
        assert [s["probability"] for s in cut] == pytest.approx(p[:2], abs=1e-6)
    with pytest.raises(ValueError, match=r"min_confidence must be a number in \(0, 1\].*; got 0"):
        predictor.predict(items, min_confidence=0)

    out = root / "pred.csv"
    args = ["predict", "--run", str(root / "run"), "--catalog", str(root / "catalog.csv"), "--out", str(out)]
    assert main([*args, "--min-confidence", "0.99"]) == 0
    assert "levels department > family > label; deepest level answered (min confidence 0.99)" in capsys.readouterr().out
    pred = pd.read_csv(out)
    assert list(pred.columns)[-8:] == [
        "pred_department",
        "prob_department",
        "pred_family",
        "prob_family",
        "pred_label",
        "prob_label",
        "image_contribution",
        "text_contribution",
    ]
    assert (pred["pred_department"] == "shirts").all()
    # past the deepest level that reaches 0.99 the columns are empty
    assert (pred["pred_label"].isna() == (pred["prob_label"].isna())).all()
    assert (pred["prob_label"].dropna() >= 0.99).all() and (pred["prob_family"].dropna() >= 0.99).all()
    assert main(args[:-2] + ["--out", str(root / "all.csv")]) == 0  # no minimum: every level answered
    full = pd.read_csv(root / "all.csv")
    assert full["pred_label"].notna().all() and (full["pred_label"] == full["label_1"]).all()


def test_the_service_returns_the_path(catalog_run):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from prodfuse.serving.app import create_app
    from prodfuse.serving.config import ServeConfig

    root = catalog_run
    predictor = prodfuse.Predictor.from_run(root / "run")
    with TestClient(create_app(ServeConfig(run=str(root / "run")), predictor)) as client:
        deadline = time.monotonic() + 60
        while client.get("/health/ready").status_code != 200:
            assert time.monotonic() < deadline, "not ready"
            time.sleep(0.1)
        item = {"title": "green cotton shirt"}
        expected = predictor.predict([item], top_k=2)[0]["path"]
        r = client.post("/v1/predict", data={**item, "top_k": "2"})
        assert r.status_code == 200, r.text
        got = r.json()["path"]
        assert [(s["level"], s["label"]) for s in got] == [(s["level"], s["label"]) for s in expected]
        np.testing.assert_allclose([s["probability"] for s in got], [s["probability"] for s in expected], atol=1e-5)
        family, colour = expected[1]["probability"], expected[2]["probability"]
        assert family > colour + 1e-3
        between = (family + colour) / 2
        r = client.post("/v1/predict", data={**item, "min_confidence": str(between)})
        assert r.status_code == 200 and r.json()["path"] == got[:2]  # the colour is below: the family answers
        body = {"items": [item, {**item, "min_confidence": between}], "min_confidence": min(1.0, colour / 2)}
        results = client.post("/v1/predict/batch", json=body).json()["results"]
        assert [s["label"] for s in results[0]["path"]] == [s["label"] for s in expected]
        assert [s["label"] for s in results[1]["path"]] == [s["label"] for s in expected[:2]]
        for bad in ("0", "1.5", "abc"):
            r = client.post("/v1/predict", data={**item, "min_confidence": bad})
            assert r.status_code == 422 and r.json()["error"] == "bad_min_confidence", bad
        info = client.get("/v1/model").json()
        assert info["levels"] == ["department", "family", "label"]
        schema = client.get("/openapi.json").json()
        form = schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert form["properties"]["min_confidence"]["exclusiveMinimum"] == 0
