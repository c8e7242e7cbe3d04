"""Prediction: a new catalog with a bad image, reproducing evaluate's probabilities, contributions and the table."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import prodfuse
from prodfuse.cli import main
from prodfuse.data import shards
from prodfuse.data.catalog import Columns, read_catalog
from prodfuse.inference.forward import contributions
from prodfuse.inference.predict import prediction_table
from prodfuse.modeling.probabilities import zero_stream

FAST = [
    "--backbone",
    "mobilenet_v2",
    "--weights",
    "none",
    "--image-size",
    "32",
    "--ocr",
    "none",
    "--text-encoder",
    "tfidf",
    "--no-progress",
]
COLOURS = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (30, 40, 200)}


def _write_catalog(folder, n, with_label=True, seed=0):
    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        label = list(COLOURS)[i % 3]
        arr = np.clip(np.array(COLOURS[label]) + rng.normal(0, 25, (36, 36, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / "img" / f"{i}.png")
        row = {
            "product_id": f"{folder.name}-{i}",
            "image_path": f"img/{i}.png",
            "title": "" if i % 5 == 0 else f"{label} cotton shirt size {i % 4}",
            "description": "",
        }
        if with_label:
            row["label"] = label
        rows.append(row)
    path = folder / "catalog.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def catalog_items(trained, ids) -> list[dict]:
    """The training catalog's rows `ids` as Predictor items: photo path, title and description."""
    cat = read_catalog(trained / "train" / "catalog.csv").set_index("product_id")
    return [
        {
            "image": str(trained / "train" / cat.loc[pid, "image_path"]),
            "title": cat.loc[pid, "title"],
            "description": cat.loc[pid, "description"],
        }
        for pid in ids
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    catalog = _write_catalog(root / "train", 30)
    assert main(["extract", "--catalog", str(catalog), "--out", str(root / "emb"), *FAST]) == 0
    import tensorflow as tf

    tf.config.run_functions_eagerly(True)  # on 30 rows graph tracing would be most of the training time
    try:
        assert (
            main(
                [
                    "train",
                    "--embeddings",
                    str(root / "emb"),
                    "--out",
                    str(root / "run"),
                    "--epochs",
                    "2",
                    "--fusion",
                    "gated",
                    "--quiet",
                ]
            )
            == 0
        )
    finally:
        tf.config.run_functions_eagerly(False)
    return root


def test_predict_catalog_rejects_bad_image_and_predicts_the_rest(trained, capsys):
    (trained / "run" / "temperature.json").unlink(missing_ok=True)
    new = trained / "new"
    catalog = _write_catalog(new, 5, with_label=False, seed=1)
    (new / "img" / "1.png").write_bytes(b"definitely not a png")
    df = pd.read_csv(catalog)
    df.loc[3, "image_path"] = "img/gone.png"
    df.to_csv(catalog, index=False)
    out = trained / "out" / "pred.csv"
    assert (
        main(["predict", "--run", str(trained / "run"), "--catalog", str(catalog), "--out", str(out), "--top-k", "2"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "rejected (not embeddable): 2" in printed and "NOT calibrated (T=1)" in printed
    rejects = pd.read_csv(trained / "out" / "pred_rejects.csv")
    assert sorted(rejects["id"]) == ["new-1", "new-3"]
    pred = pd.read_csv(out)
    assert list(pred.columns) == [
        "product_id",
        "label_1",
        "prob_1",
        "label_2",
        "prob_2",
        "image_contribution",
        "text_contribution",
    ]
    assert pred["product_id"].tolist() == ["new-0", "new-2", "new-4"]
    assert set(pred["label_1"]) <= set(COLOURS) and (pred["label_1"] != pred["label_2"]).all()
    assert (pred["prob_1"] >= pred["prob_2"]).all()
    # The same items through the Predictor (loaded once), and through `extract --like` + `predict --embeddings`:
    # the same probabilities and contributions (the default model has a wide path, so each stream's contribution
    # is the drop of the top class's probability when that stream is zeroed).
    predictor = prodfuse.Predictor.from_run(trained / "run")
    cat = read_catalog(catalog, Columns(label=None), require_label=False)
    items = [
        {
            "image": str(new / cat.loc[i, "image_path"]),
            "title": cat.loc[i, "title"],
            "description": cat.loc[i, "description"],
        }
        for i in range(5)
    ]
    items[3] = {**items[2], "image": Image.open(new / "img" / "2.png")}  # item 2 as a PIL image: same pixels
    got = predictor.predict(items, top_k=2)
    assert got[1]["error"].startswith("not_an_image") and got[1]["labels"] == []
    assert [g["error"] for g in got if g is not got[1]] == [None] * 4
    for row, i in zip(pred.itertuples(), (0, 2, 4)):
        assert got[i]["labels"] == [row.label_1, row.label_2]
        np.testing.assert_allclose(got[i]["probs"], [row.prob_1, row.prob_2], atol=1e-5)
        np.testing.assert_allclose(
            [got[i]["image_contribution"], got[i]["text_contribution"]],
            [row.image_contribution, row.text_contribution],
            atol=1e-5,
        )
    np.testing.assert_allclose(got[3]["probs"], got[2]["probs"], atol=1e-5)
    assert np.abs(pred[["image_contribution", "text_contribution"]].to_numpy()).max() > 0
    emb2 = trained / "out" / "new.emb"
    assert (
        main(
            [
                "extract",
                "--catalog",
                str(catalog),
                "--out",
                str(emb2),
                "--like",
                str(trained / "emb"),
                "--label-col",
                "",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "predict",
                "--run",
                str(trained / "run"),
                "--embeddings",
                str(emb2),
                "--out",
                str(trained / "out" / "via-shards.csv"),
                "--top-k",
                "2",
            ]
        )
        == 0
    )
    via = pd.read_csv(trained / "out" / "via-shards.csv").set_index("product_id").loc[pred["product_id"]]
    cols = ["prob_1", "prob_2", "image_contribution", "text_contribution"]
    np.testing.assert_allclose(via[cols].to_numpy(), pred[cols].to_numpy(), atol=1e-5)
    assert via["label_1"].tolist() == pred["label_1"].tolist()


def test_predict_reproduces_evaluate_probabilities(trained, capsys):
    run = str(trained / "run")
    assert main(["evaluate", "--run", run, "--out", str(trained / "ev")]) == 0
    assert (
        main(
            [
                "predict",
                "--run",
                run,
                "--embeddings",
                str(trained / "emb"),
                "--out",
                str(trained / "all.csv"),
                "--top-k",
                "5",
            ]
        )
        == 0
    )
    assert "calibrated with temperature" in capsys.readouterr().out
    ev = pd.read_csv(trained / "ev" / "predictions.csv")
    pr = pd.read_csv(trained / "all.csv").set_index("product_id").loc[ev["product_id"]].reset_index()
    assert len(ev) == json.loads((trained / "run" / "config.json").read_text())["splits"]["test"] > 0
    assert len(pd.read_csv(trained / "all.csv")) == 30 and "label" in pr.columns  # true label carried
    for c in ("label_1", "label_2", "label_3", "label"):
        assert ev[c].tolist() == pr[c].tolist()
    cols = ["prob_1", "prob_2", "prob_3", "image_contribution", "text_contribution"]
    np.testing.assert_allclose(ev[cols].to_numpy(), pr[cols].to_numpy(), atol=2e-6)
    # both are the model's softmax recalibrated with the temperature evaluate saved in the run folder
    from prodfuse.data.sequence import read_items
    from prodfuse.inference.calibration import apply_temperature
    from prodfuse.modeling.probabilities import predict_arrays

    t = json.loads((trained / "run" / "temperature.json").read_text())["temperature"]
    r = prodfuse.Run.load(run)
    assert r.temperature == t and r.calibrated
    raw = predict_arrays(r.model, {k: v for k, v in read_items(trained / "emb", r.inputs).items()})
    expected = np.sort(apply_temperature(raw, t), axis=1)[:, ::-1]
    all_rows = pd.read_csv(trained / "all.csv")
    np.testing.assert_allclose(all_rows[["prob_1", "prob_2", "prob_3"]].to_numpy(), expected, atol=2e-6)
    # and the Predictor, from the catalog's files, agrees with evaluate on its shards (issue 11: <= 1e-5)
    got = prodfuse.Predictor.from_run(run).predict(catalog_items(trained, ev["product_id"]), top_k=3)
    assert [g["labels"] for g in got] == ev[["label_1", "label_2", "label_3"]].values.tolist()
    np.testing.assert_allclose([g["probs"] for g in got], ev[["prob_1", "prob_2", "prob_3"]].to_numpy(), atol=1e-5)


def test_predict_refuses_shards_from_another_backbone(trained, tmp_path, capsys):
    header = {
        "catalog_path": "x",
        "catalog_sha256": "-",
        "columns": {"id": "product_id"},
        "settings": {},
        "encoders": {"image": {"backbone": "resnet50", "dim": 2048}, "text": {"kind": "tfidf", "dim": 4}},
        "versions": {},
    }
    m = shards.open_shards(tmp_path / "s", header)
    shards.write_shard(
        tmp_path / "s",
        m,
        {"product_id": ["a"], "image_embedding": np.zeros((1, 2048)), "text_embedding": np.zeros((1, 4))},
        0,
        1,
    )
    shards.finish(tmp_path / "s", m)
    assert (
        main(
            [
                "predict",
                "--run",
                str(trained / "run"),
                "--embeddings",
                str(tmp_path / "s"),
                "--out",
                str(tmp_path / "p.csv"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "'resnet50'" in err and "--like" in err


def test_zero_stream_and_contributions():
    arrays = {"image": np.ones((2, 3), np.float32), "text": np.ones((2, 4), np.float32)}
    z = zero_stream(arrays, "text")
    assert z["image"] is arrays["image"] and not z["text"].any() and arrays["text"].all()
    with pytest.raises(ValueError, match="'audio'"):
        zero_stream(arrays, "audio")
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    out = {
        "probs": probs,
        "gate": None,
        "no_image": np.array([[0.4, 0.5, 0.1], [0.1, 0.3, 0.6]]),
        "no_text": np.array([[0.8, 0.1, 0.1], [0.3, 0.3, 0.4]]),
    }
    img, txt = contributions(out)
    np.testing.assert_allclose(img, [0.3, 0.0])
    np.testing.assert_allclose(txt, [-0.1, 0.2])
    img, txt = contributions({**out, "no_text": None})
    assert np.isnan(txt).all()
    img, txt = contributions({**out, "gate": np.array([0.9, 0.25])})
    np.testing.assert_allclose(img + txt, 1.0)
    np.testing.assert_allclose(img, [0.9, 0.25])
    img, txt = contributions({**out, "gate": np.array([0.9, 0.25]), "wide": True})  # the gate is not all of it
    np.testing.assert_allclose(img, [0.3, 0.0])


def test_prediction_table_orders_labels_by_probability():
    probs = np.array([[0.1, 0.6, 0.3], [0.5, 0.25, 0.25]])
    t = prediction_table(["x", "y"], probs, ["a", "b", "c"], k=5, true_labels=["b", "a"])
    assert list(t.columns) == [
        "product_id",
        "label",
        "label_1",
        "prob_1",
        "label_2",
        "prob_2",
        "label_3",
        "prob_3",
        "image_contribution",
        "text_contribution",
    ]
    assert t.loc[0, ["label_1", "label_2", "label_3"]].tolist() == ["b", "c", "a"]
    assert t.loc[1, ["label_1", "label_2", "label_3"]].tolist() == ["a", "b", "c"]  # tie -> lower index first
    assert t["prob_1"].tolist() == [0.6, 0.5]


def test_an_item_without_a_photo_is_classified_from_its_text(trained):
    """No photo: the image stream is blank (zeros, as modality dropout showed the model in training), so the item
    gets exactly the probabilities of the photo-ablated item; with neither photo nor text it gets an error."""
    from prodfuse.inference.forward import forward

    predictor = prodfuse.Predictor.from_run(trained / "run")
    title = "red cotton shirt size 1"
    image = str(trained / "train" / "img" / "1.png")
    got = predictor.predict([{"title": title}, {"title": "  "}, {}], top_k=3)
    assert got[0]["error"] is None and len(got[0]["labels"]) == 3
    assert got[0]["image_contribution"] == pytest.approx(0.0, abs=1e-7)
    assert [g["error"] is not None and "no image and no text" in g["error"] for g in got[1:]] == [True, True]
    arrays, ok, _ = predictor.embed([{"image": image, "title": title}])
    ablated = forward(predictor.run.model, arrays, predictor.run.temperature)["no_image"][0]
    order = np.argsort(-ablated, kind="stable")[:3]
    assert got[0]["labels"] == [predictor.run.classes[c] for c in order]
    np.testing.assert_allclose(got[0]["probs"], ablated[order], atol=1e-6)


def test_predict_maps_renamed_text_columns_or_stops(trained, capsys):
    """Issue 27 item 10: a catalog whose text column is called `name` (the run was trained on title,description)
    is refused with the run's columns named, not predicted from the photo alone; --text-cols name maps it in
    order, --column title=name by name, and both give the probabilities of the same catalog with `title`."""
    new = trained / "renamed"
    catalog = _write_catalog(new, 6, seed=2)
    ref = trained / "out" / "renamed-ref.csv"
    base = ["predict", "--run", str(trained / "run"), "--top-k", "2"]
    assert main([*base, "--catalog", str(catalog), "--out", str(ref)]) == 0
    df = pd.read_csv(catalog, dtype=str, keep_default_na=False)
    df.rename(columns={"title": "name"}).drop(columns=["description"]).to_csv(new / "shop.csv", index=False)
    shop = new / "shop.csv"
    capsys.readouterr()
    out = trained / "out" / "renamed.csv"
    assert main([*base, "--catalog", str(shop), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "['title', 'description']" in err and "--text-cols" in err and "--column" in err
    assert "--allow-missing-text" in err and not out.exists()
    expected = pd.read_csv(ref)
    for flags in (["--text-cols", "name"], ["--column", "title=name"]):
        assert main([*base, "--catalog", str(shop), "--out", str(out), *flags]) == 0, capsys.readouterr().err
        printed = capsys.readouterr().out
        assert "text columns: title <- name, description (absent); 4 of 6 rows have text" in printed
        got = pd.read_csv(out)
        np.testing.assert_allclose(got[["prob_1", "prob_2"]], expected[["prob_1", "prob_2"]], atol=1e-5)
        assert got["label_1"].tolist() == expected["label_1"].tolist()
    # a mapping that names a column the catalog lacks, or a column the run does not read, says so
    assert main([*base, "--catalog", str(shop), "--out", str(out), "--column", "title=nope"]) == 2
    assert "no column 'nope'" in capsys.readouterr().err
    assert main([*base, "--catalog", str(shop), "--out", str(out), "--column", "brand=name"]) == 2
    assert "'brand' is not a text column of the run" in capsys.readouterr().err
    # predicting from the photo alone is possible, on request
    assert main([*base, "--catalog", str(shop), "--out", str(out), "--allow-missing-text"]) == 0
    assert "0 of 6 rows have text" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags", [["--fusion", "stack", "--stack-folds", "2"], ["--fusion", "joint"], ["--fusion", "product"]], ids=str
)
def test_late_fusions_predict_as_evaluate_scores(trained, flags, tmp_path):
    """Stack, joint and the product with its probe expert (the default): the Predictor, from the catalog's files, gives evaluate's probabilities on
    the shards (<= 1e-5), and the fused retrieval space embeds them."""
    import tensorflow as tf

    run = tmp_path / "run"
    tf.config.run_functions_eagerly(True)  # 30 rows: tracing would be most of the time
    try:
        argv = ["train", "--embeddings", str(trained / "emb"), "--out", str(run), "--epochs", "2", "--quiet"]
        assert main([*argv, *flags]) == 0
    finally:
        tf.config.run_functions_eagerly(False)
    assert main(["evaluate", "--run", str(run), "--out", str(tmp_path / "ev")]) == 0
    ev = pd.read_csv(tmp_path / "ev" / "predictions.csv")
    got = prodfuse.Predictor.from_run(str(run)).predict(catalog_items(trained, ev["product_id"]), top_k=3)
    assert [g["labels"] for g in got] == ev[["label_1", "label_2", "label_3"]].values.tolist()
    np.testing.assert_allclose([g["probs"] for g in got], ev[["prob_1", "prob_2", "prob_3"]].to_numpy(), atol=1e-5)
    from prodfuse.retrieval.spaces import space_vectors

    vectors, items_table, info = space_vectors(trained / "emb", "fused", prodfuse.Run.load(run))
    assert len(vectors) == len(items_table) == 30 and np.isfinite(vectors).all()
