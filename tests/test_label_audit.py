"""audit --labels: a planted mislabel ranks first (linear probe and default model), the files it writes, a class too
small for the folds reported, rows with an empty label in no fold (train's folds) and counted, bad input refused with
nothing written."""

import base64
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from prodfuse import AuditLabelsConfig, audit_labels
from prodfuse.data import shards
from prodfuse.evaluation.label_audit import ISSUE_COLUMNS, SUMMARY_COLUMNS
from synthetic import HEADER, write_synthetic_shards

PLANTED = "p6"  # looks like class a in both streams, labelled b


def _catalog(folder, n_per_class=12, rare=2, seed=0, spread=4.0, blank=None):
    """Classes a, b, c, well apart in both streams, plus `rare` items of class r; item p6 (an a) is labelled b, and
    the rows in `blank` ({row: empty cell}) have no label. Each row's image_path points at a tiny PNG in
    `folder`/img."""
    rng = np.random.default_rng(seed)
    labels = np.array(["a", "b", "c"] * n_per_class + ["r"] * rare, dtype=object)
    truth = labels.copy()
    labels[6] = "b"
    assert truth[6] == "a"
    for row, cell in (blank or {}).items():
        labels[row] = cell
    centres = {c: (rng.normal(size=16) * spread, rng.normal(size=8) * spread) for c in "abcr"}
    n = len(labels)
    img = np.stack([centres[c][0] for c in truth]) + rng.normal(size=(n, 16))
    txt = np.stack([centres[c][1] for c in truth]) + rng.normal(size=(n, 8))
    (folder / "img").mkdir(parents=True)
    colours = {"a": (200, 30, 30), "b": (30, 200, 30), "c": (30, 30, 200), "r": (90, 90, 90)}
    paths = []
    for i, c in enumerate(truth):
        path = folder / "img" / f"{i}.png"
        Image.new("RGB", (20, 30), colours[c]).save(path)
        paths.append(str(path))
    emb = write_synthetic_shards(
        folder / "emb",
        img.astype(np.float32),
        txt.astype(np.float32),
        labels,
        extra={"image_path": paths, "text": [f"product {i} of kind {c}" for i, c in enumerate(truth)]},
    )
    return emb


def test_linear_probe_ranks_the_planted_mislabel_first_and_writes_every_file(tmp_path):
    emb = _catalog(tmp_path)
    out = tmp_path / "audit"
    s = audit_labels(AuditLabelsConfig(embeddings=str(emb), model="lr", folds=5, top=3, out=str(out)))
    issues = pd.read_csv(out / "label_issues.csv", dtype={"id": str})
    assert list(issues.columns) == ISSUE_COLUMNS
    first = issues.iloc[0]
    assert (first["id"], first["rank"], first["given_label"], first["suggested_label"]) == (PLANTED, 1, "b", "a")
    assert first["suggested_prob"] > first["given_prob"]
    assert first["text"] == "product 6 of kind a" and first["image_path"].endswith("img/6.png")
    # the class with fewer items than folds: reported, never ranked
    assert s["left_out"]["classes"] == {"r": 2} and s["audited_rows"] == s["rows"] - 2
    assert "r" not in set(issues["given_label"])
    pairs = pd.read_csv(out / "label_issues_summary.csv")
    assert list(pairs.columns) == SUMMARY_COLUMNS
    assert ((pairs.given_label == "b") & (pairs.suggested_label == "a")).any()
    assert pairs["count"].sum() == len(issues) == s["issues"]
    # the page embeds the thumbnail of the planted item's photo, resized JPEG, and its labels
    page = (out / "label_issues.html").read_text()
    assert page.count("<img ") == min(3, len(issues)) and PLANTED in page and "file://" not in page
    uri = page.split('src="data:image/jpeg;base64,', 1)[1].split('"', 1)[0]
    import io

    with Image.open(io.BytesIO(base64.b64decode(uri))) as thumb:
        assert thumb.format == "JPEG" and max(thumb.size) <= 128
        assert thumb.convert("RGB").getpixel((5, 5))[0] > 150  # class a's red photo
    saved = np.load(out / "pred_probs.npz")
    assert saved["probs"].shape == (s["rows"], 4) and np.isnan(saved["probs"][~saved["audited"]]).all()
    assert json.loads((out / "label_audit.json").read_text())["issues"] == s["issues"]


@pytest.mark.filterwarnings("ignore:Even though the `tf.config.experimental_run_functions_eagerly`:UserWarning")
def test_default_model_ranks_the_planted_mislabel_first(tmp_path, eager):
    # Far-apart classes and enough epochs that every fold's model is sure of them, whatever the op determinism and
    # thread settings other tests in the same process left behind (10 epochs on closer classes flagged nothing once).
    emb = _catalog(tmp_path, n_per_class=15, rare=0, spread=8.0)
    out = tmp_path / "audit"
    s = audit_labels(
        AuditLabelsConfig(embeddings=str(emb), model="default", folds=3, epochs=25, batch_size=4, out=str(out))
    )
    issues = pd.read_csv(out / "label_issues.csv", dtype={"id": str})
    assert issues.iloc[0][["id", "given_label", "suggested_label"]].tolist() == [PLANTED, "b", "a"]
    assert s["model"] == "default" and s["left_out"]["classes"] == {}
    saved = np.load(out / "pred_probs.npz")
    # the product fusion's own single-stream models come with it, out of fold as well
    assert {"probs", "probs_image", "probs_text"} <= set(saved.files)
    assert not np.isnan(saved["probs_image"]).any()
    assert not any(p.name.startswith(".fold-runs-") for p in out.iterdir())  # the fold runs are cleared away


def _unlabelled(folder):
    n = 12
    rng = np.random.default_rng(0)
    m = shards.open_shards(folder, {**HEADER, "columns": {"id": "product_id", "label": None, "split": None}})
    data = {
        "product_id": [f"p{i}" for i in range(n)],
        "image_embedding": rng.normal(size=(n, 4)),
        "text_embedding": rng.normal(size=(n, 4)),
        "has_text": np.ones(n, bool),
        "brand": ["x"] * n,
        "shelf": ["top", ""] * (n // 2),
        "note": ["", " ", "nan", "None"] * (n // 4),  # empty in every row
    }
    shards.write_shard(folder, m, data, 0, n)
    shards.finish(folder, m)
    return folder


def test_bad_input_is_refused_and_nothing_is_written(tmp_path, capsys):
    from prodfuse.cli import main

    emb = _catalog(tmp_path)
    out = tmp_path / "audit"
    with pytest.raises(ValueError, match=r"label_col 'category' is not a column.*'label'.*--label-col"):
        audit_labels(AuditLabelsConfig(embeddings=str(emb), label_col="category", model="lr", out=str(out)))
    bare = _unlabelled(tmp_path / "bare")
    with pytest.raises(
        ValueError, match=r"'.*bare' is an unlabelled shard folder.*\['product_id', 'brand', 'shelf', 'note'\]"
    ):
        audit_labels(AuditLabelsConfig(embeddings=str(bare), model="lr", out=str(out)))
    with pytest.raises(ValueError, match=r"'brand'.*has 1 class\(es\) with at least folds=5.*--folds"):
        audit_labels(AuditLabelsConfig(embeddings=str(bare), label_col="brand", model="lr", out=str(out)))
    # half its rows unlabelled: the other six are all "top", one class
    with pytest.raises(ValueError, match=r"'shelf'.*has 1 class\(es\) with at least folds=5.*\{'top': 6\}"):
        audit_labels(AuditLabelsConfig(embeddings=str(bare), label_col="shelf", model="lr", out=str(out)))
    with pytest.raises(ValueError, match=r"label_col 'note' is empty .* in every one of the 12 rows.*--label-col"):
        audit_labels(AuditLabelsConfig(embeddings=str(bare), label_col="note", model="lr", out=str(out)))
    with pytest.raises(ValueError, match=r"model must be one of .*got 'svm'"):
        AuditLabelsConfig(embeddings=str(emb), model="svm")
    assert not out.exists()
    # the command: the same errors before TensorFlow loads, exit 2, no folder
    assert main(["audit", "--labels", "--embeddings", str(bare), "--out", str(out)]) == 2
    assert "unlabelled shard folder" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit) as e:  # a label-audit flag without --labels
        main(["audit", "--embeddings", str(emb), "--model", "lr", "--out", str(out)])
    assert e.value.code == 2 and "--model only apply to the label audit" in capsys.readouterr().err
    assert not out.exists()


def test_rows_with_an_empty_label_are_in_no_fold_and_counted(tmp_path, capsys):
    from prodfuse.cli import main
    from prodfuse.evaluation.label_audit import fold_test_rows
    from prodfuse.modeling.training import load_split_data

    blank = {1: "", 11: None, 20: "nan", 33: "  "}  # among the labelled rows, not after them
    emb = _catalog(tmp_path, n_per_class=14, blank=blank)
    out = tmp_path / "audit"
    s = audit_labels(AuditLabelsConfig(embeddings=str(emb), model="lr", folds=5, out=str(out)))
    assert (s["rows"], s["unlabelled_rows"], s["audited_rows"]) == (44, 4, 44 - 4 - 2)  # 2: class r, left out
    assert json.loads((out / "label_audit.json").read_text())["unlabelled_rows"] == 4
    assert "4 row(s) with an empty label" in s["note"]
    unlabelled = [f"p{i}" for i in blank]
    issues = pd.read_csv(out / "label_issues.csv", dtype={"id": str})
    assert issues["id"].iloc[0] == PLANTED and not set(unlabelled) & set(issues["id"])
    assert s["classes"] == 4 and "" not in {p["given_label"] for p in s["pairs"]}
    # pred_probs.npz keeps one row per shard row: an unlabelled one is not audited and has no probabilities
    saved = np.load(out / "pred_probs.npz")
    assert saved["ids"].tolist() == [f"p{i}" for i in range(44)] and saved["classes"].tolist() == list("abcr")
    rows = np.isin(saved["ids"], unlabelled)
    assert not saved["audited"][rows].any() and np.isnan(saved["probs"][rows]).all()
    assert (saved["labels"][rows] == "").all() and not np.isnan(saved["probs"][saved["audited"]]).any()
    # the folds are train's (`train --folds 5 --fold k --split-col ''`), as positions among all rows; unlabelled
    # rows are in none of them
    tests = fold_test_rows(saved["labels"], 5, 42)
    for k, test in enumerate(tests):
        planned = load_split_data(emb, "label", "", 42, ["image"], folds=5, fold=k)
        assert planned["unlabelled"] == 4
        np.testing.assert_array_equal(test, planned["splits"]["test"])
    assert not np.isin(np.concatenate(tests), list(blank)).any()
    # the command says how many rows were left unaudited
    args = ["audit", "--labels", "--embeddings", str(emb), "--model", "lr", "--folds", "5"]
    assert main(args + ["--out", str(tmp_path / "cli")]) == 0
    assert "rows with an empty 'label' label (unlabelled, in no fold, not audited): 4" in capsys.readouterr().out


def test_audit_labels_command(tmp_path, capsys):
    from prodfuse.cli import main

    emb = _catalog(tmp_path)
    out = tmp_path / "audit"
    args = ["audit", "--labels", "--embeddings", str(emb), "--model", "lr", "--folds", "5", "--top", "2"]
    assert main(args + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "likely mislabelled" in printed and "b -> a" in printed and "r (2)" in printed
    assert pd.read_csv(out / "label_issues.csv", dtype={"id": str})["id"].iloc[0] == PLANTED
    assert (out / "label_issues.html").read_text().count("<img ") <= 2


def test_audit_labels_flags_reach_the_config():
    from prodfuse.cli import audit as audit_cli
    from prodfuse.cli import build_parser

    argv = ["audit", "--labels", "--embeddings", "e", "--epochs", "25", "--patience", "8", "--batch-size", "128"]
    cfg = audit_cli.config(build_parser().parse_args(argv))
    assert (cfg.epochs, cfg.patience, cfg.batch_size) == (25, 8, 128)
    assert audit_cli.config(build_parser().parse_args(argv[:4])).batch_size == AuditLabelsConfig.batch_size
