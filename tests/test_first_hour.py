"""The first hour of a new user: run folders that never mix two runs, flags checked before any work, calibration
on small splits, the demo's random-weight fallback recorded, honest extraction summaries, reruns after a failed
extraction, the label column recorded at extraction, catalog encodings, and a quiet, fast command line."""

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import prodfuse
from prodfuse.cli import main
from prodfuse.data import shards
from synthetic import image_vs_text_classes, write_synthetic_shards

FAST = ["--backbone", "mobilenet_v2", "--weights", "none", "--image-size", "32", "--ocr", "none", "--no-progress"]
COLOURS = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (30, 40, 200)}
COARSE = {"red": "warm", "green": "cool", "blue": "cool"}


def test_main_leaves_logging_as_it_found_it(tmp_path):
    """main() points the prodfuse logger at its stderr while a command runs; called in-process (a notebook, a
    test), it must put that back, so the caller's logging and pytest's caplog keep working."""
    loggers = [logging.getLogger(n) for n in ("prodfuse", "py.warnings")]
    before = [(lg.handlers[:], lg.propagate, lg.level) for lg in loggers]
    capturing = logging._warnings_showwarning is not None
    assert main(["evaluate", "--run", str(tmp_path / "no-such-run")]) == 2  # runs _setup, then fails
    assert [(lg.handlers[:], lg.propagate, lg.level) for lg in loggers] == before
    assert (logging._warnings_showwarning is not None) == capturing


def write_catalog(folder: Path, n: int, seed: int = 0, missing=(), no_text=None, coarse=False) -> Path:
    """n products in 3 colour classes (small PNGs); rows in `missing` point at files that do not exist; rows in
    `no_text` (default every 5th) have an empty title."""
    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    no_text = set(range(0, n, 5) if no_text is None else no_text)
    rows = []
    for i in range(n):
        label = list(COLOURS)[i % 3]
        if i not in missing:
            arr = np.clip(np.array(COLOURS[label]) + rng.normal(0, 25, (36, 36, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(folder / "img" / f"{i}.png")
        row = {
            "product_id": f"p{i}",
            "image_path": f"img/{i}.png",
            "title": "" if i in no_text else f"{label} cotton shirt {i}",
            "description": "",
            "label": label,
        }
        if coarse:
            row["coarse"] = COARSE[label]
        rows.append(row)
    path = folder / "catalog.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def folder_digest(folder: Path) -> dict:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    """120 synthetic rows in 4 classes, split 80/10/10 by seed at training."""
    image, text, labels = image_vs_text_classes(n_per_class=30, image_dim=16, text_dim=8, seed=1)
    return write_synthetic_shards(tmp_path_factory.mktemp("small") / "emb", image, text, labels)


# ------------------------------------------------------------------------------------ 1. run folders


def test_second_train_into_same_folder_is_refused_and_overwrite_clears_it(
    small_shards, tmp_path, eager, capsys, caplog
):
    from prodfuse.modeling.run import save_temperature

    a = tmp_path / "run_a"
    base = ["train", "--embeddings", str(small_shards), "--epochs", "1", "--quiet"]
    assert main([*base, "--out", str(a)]) == 0
    before = folder_digest(a)
    assert "model.keras" in before and "config.json" in before
    capsys.readouterr()
    assert main([*base, "--out", str(a), "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and str(a) in err
    assert folder_digest(a) == before  # the first run is untouched
    assert json.loads((a / "config.json").read_text())["train"]["seed"] == 42

    # a temperature fitted on this very model is used
    save_temperature(a, 1.7, {"fitted_on": "val"})
    first = prodfuse.Run.load(a)
    assert first.temperature == pytest.approx(1.7) and first.calibrated is True
    old_temperature = tmp_path / "old_temperature.json"
    shutil.copy(a / "temperature.json", old_temperature)

    # --overwrite clears the folder first: the old temperature and evaluations are gone
    (a / "eval-test").mkdir()
    (a / "eval-test" / "metrics.json").write_text("{}")
    assert main([*base, "--out", str(a), "--seed", "3", "--overwrite"]) == 0
    assert not (a / "temperature.json").exists() and not (a / "eval-test").exists()
    assert json.loads((a / "config.json").read_text())["train"]["seed"] == 3
    second = prodfuse.Run.load(a)
    assert second.temperature == 1.0 and second.calibrated is False
    assert second.fingerprint != first.fingerprint

    # a temperature.json copied from another run folder (fitted on another model) is ignored with a warning
    shutil.copy(old_temperature, a / "temperature.json")
    run_log = logging.getLogger("prodfuse.modeling.run")
    run_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="prodfuse.modeling.run"):
            copied = prodfuse.Run.load(a)
    finally:
        run_log.removeHandler(caplog.handler)
    assert copied.temperature == 1.0 and copied.calibrated is False
    assert any("temperature.json" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


# ------------------------------------------------------------------------------------ 2. flag ranges

BAD_FLAGS = [
    ("train", ["--epochs", "0"], "--epochs", "0"),
    ("train", ["--epochs", "-1"], "--epochs", "-1"),
    ("train", ["--batch-size", "0"], "--batch-size", "0"),
    ("train", ["--lr", "-5"], "--lr", "-5"),
    ("train", ["--modality-dropout", "1.5"], "--modality-dropout", "1.5"),
    ("train", ["--patience", "0"], "--patience", "0"),
    ("train", ["--ensemble", "0"], "--ensemble", "0"),
    ("extract", ["--image-size", "8"], "--image-size", "8"),
    ("extract", ["--shard-rows", "0"], "--shard-rows", "0"),
    ("extract", ["--ocr-workers", "0"], "--ocr-workers", "0"),
    ("extract", ["--batch-size", "0"], "--batch-size", "0"),
    ("extract", ["--views", "9"], "--views", "9"),
    ("predict", ["--top-k", "0"], "--top-k", "0"),
    ("evaluate", ["--top-confusions", "-1"], "--top-confusions", "-1"),
    ("compare", ["--seeds", "0"], "--seeds", "0"),
    ("compare", ["--folds", "2"], "--folds", "2"),
    ("tune", ["--folds", "2"], "--folds", "2"),
    ("tune", ["--budget-minutes", "0"], "--budget-minutes", "0"),
    ("tune", ["--space", "lr,depth"], "--space", "depth"),
    ("serve", ["--max-batch", "0"], "--max-batch", "0"),
    ("serve", ["--port", "70000"], "--port", "70000"),
    ("serve", ["--max-upload-mb", "0"], "--max-upload-mb", "0"),
]


@pytest.mark.parametrize("command,flags,flag,value", BAD_FLAGS, ids=[f"{c}{' '.join(f)}" for c, f, _, _ in BAD_FLAGS])
def test_out_of_range_flag_exits_2_before_any_work(command, flags, flag, value, tmp_path, small_shards):
    out = tmp_path / "out"
    required = {
        "train": ["--embeddings", str(small_shards), "--out", str(out)],
        "extract": ["--catalog", str(tmp_path / "c.csv"), "--out", str(out)],
        "predict": ["--run", str(tmp_path / "run"), "--embeddings", str(small_shards), "--out", str(out / "p.csv")],
        "evaluate": ["--run", str(tmp_path / "run"), "--out", str(out)],
        "compare": ["--embeddings", str(small_shards), "--out", str(out)],
        "tune": ["--embeddings", str(small_shards), "--out", str(out)],
        "serve": ["--run", str(out)],
    }[command]
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "prodfuse.cli", command, *required, *flags],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    seconds = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stderr
    assert flag in proc.stderr and value in proc.stderr.split(flag, 1)[1], proc.stderr
    assert "Traceback" not in proc.stderr
    assert seconds < 5  # no TensorFlow import, no training
    assert not out.exists()


@pytest.mark.parametrize(
    "make,field,value",
    [
        (lambda: prodfuse.TrainConfig(epochs=0), "epochs", "0"),
        (lambda: prodfuse.TrainConfig(lr=-5.0), "lr", "-5"),
        (lambda: prodfuse.TrainConfig(modality_dropout=1.5), "modality_dropout", "1.5"),
        (lambda: prodfuse.ExtractConfig(image_size=8), "image_size", "8"),
        (lambda: prodfuse.ExtractConfig(views=9), "views", "9"),
        (lambda: prodfuse.PredictConfig(run="r", out="o.csv", embeddings="e", top_k=0), "top_k", "0"),
        (lambda: prodfuse.EvaluateConfig(run="r", top_confusions=-1), "top_confusions", "-1"),
        (lambda: prodfuse.CompareConfig(embeddings="e", folds=2), "folds", "2"),
        (lambda: prodfuse.TuneConfig(embeddings="e", max_trials=0), "max_trials", "0"),
    ],
)
def test_config_objects_check_ranges(make, field, value):
    with pytest.raises(ValueError) as e:
        make()
    msg = str(e.value)
    assert msg.startswith(field) and f"got {value}" in msg.replace("'", "")


# ------------------------------------------------------------------------------------ 3. calibration


@pytest.mark.parametrize("n_val", [10, 120])
def test_calibration_on_small_and_larger_validation_splits(n_val, tmp_path):
    from prodfuse.evaluation.evaluate import MIN_CALIBRATION_ITEMS, split_probs
    from prodfuse.inference.calibration import T_BOUNDS, apply_temperature
    from prodfuse.modeling.metrics import expected_calibration_error

    image, text, labels = image_vs_text_classes(n_per_class=80, image_dim=16, text_dim=8, seed=2)
    n_test = 60
    split = np.array(["train"] * len(labels), dtype=object)
    split[:n_val] = "val"
    split[n_val : n_val + n_test] = "test"
    emb = write_synthetic_shards(tmp_path / "emb", image, text, labels, split=split)
    # label smoothing leaves this easy data under-confident: a fitted T < 1 lowers the ECE a lot. A jointly trained
    # fusion: the default product fusion's weights, fitted on validation, already calibrate (T then stays near 1).
    run = prodfuse.train(
        prodfuse.TrainConfig(
            fusion="gated",
            embeddings=str(emb),
            out=str(tmp_path / "run"),
            epochs=2 if n_val < MIN_CALIBRATION_ITEMS else 5,
            batch_size=64,
            verbose=0,
        )
    )
    assert run.config["splits"]["val"] == n_val and run.config["splits"]["test"] == n_test
    r = prodfuse.evaluate(prodfuse.EvaluateConfig(run=str(run.path)))
    metrics = json.loads((run.path / "eval-test" / "metrics.json").read_text())
    cal = metrics["calibration"]
    saved = json.loads((run.path / "temperature.json").read_text())
    assert metrics["temperature"] == cal["temperature"] == saved["temperature"] == r["temperature"]
    # a test split of fewer than 100 items: the report says its numbers are noisy
    assert metrics["n"] == n_test and isinstance(metrics["note"], str) and str(n_test) in metrics["note"]
    if n_val < MIN_CALIBRATION_ITEMS:
        assert cal["temperature"] == 1.0
        assert isinstance(cal["val_kept_t1"], str) and str(n_val) in cal["val_kept_t1"]
        assert cal["val_kept_t1"] in (run.path / "eval-test" / "report.md").read_text()
    else:
        t = cal["temperature"]
        assert T_BOUNDS[0] <= t <= T_BOUNDS[1]
        assert cal["val_n"] == n_val
        # recomputed independently: the calibrated validation ECE is not above the uncalibrated one
        y, probs = split_probs(prodfuse.Run.load(run.path), "val")
        before = expected_calibration_error(y, probs)
        after = expected_calibration_error(y, apply_temperature(probs, t))
        assert after <= before + 1e-12
        assert cal["val_ece_before"] == pytest.approx(before, abs=1e-6)
        assert cal["val_ece_after"] == pytest.approx(after, abs=1e-6)
        assert cal["val_kept_t1"] is None and t < 0.9  # a fitted temperature was kept and applied
        assert after < before


# ------------------------------------------------------------------------------------ 4. random weights


def test_demo_random_weight_fallback_is_recorded(tmp_path, monkeypatch):
    from prodfuse.data import demo
    from prodfuse.encoders import image as image_encoders

    # The demo path of extract, on a tiny catalog, with the ImageNet download failing as it does offline (no test
    # touches the network: the download is replaced, not attempted).
    catalog = write_catalog(tmp_path / "cat", 9)
    monkeypatch.setattr(demo, "write_demo_catalog", lambda *a, **k: catalog)
    real = image_encoders._construct

    def offline(name, weights, image_size):
        if weights == "imagenet":
            raise Exception("URL fetch failure: no network")
        return real(name, weights, image_size)

    monkeypatch.setattr(image_encoders, "_construct", offline)
    out = tmp_path / "demo"
    summary = prodfuse.extract(
        prodfuse.ExtractConfig(
            catalog=None, out=str(out), backbone="mobilenet_v2", image_size=32, ocr="none", progress=False
        )
    )
    m = shards.read_manifest(out)
    assert summary["weights"] == m["settings"]["weights"] == "random (fallback)"
    assert m["settings"]["image"]["weights"] == "random (fallback)"
    assert m["summary"]["embedded_rows"] == 9


def test_random_weights_are_the_same_on_two_builds():
    from prodfuse.encoders.image import build_backbone

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 32, 32, 3)).astype("float32")
    a = build_backbone("mobilenet_v2", "none", 32)
    b = build_backbone("mobilenet_v2", "none", 32)
    assert a.weights_source == b.weights_source == "none"
    ea, eb = np.asarray(a(x, training=False)), np.asarray(b(x, training=False))
    assert ea.shape == (2, 1280) and np.abs(ea).sum() > 0
    np.testing.assert_array_equal(ea, eb)


# ------------------------------------------------------------------------------------ 5. extraction summary


def test_extraction_summary_counts_only_embedded_rows(tmp_path, capsys):
    # 13 rows; the 3 with missing images all have text; 10 of 13 have text, 7 of the 10 embedded ones
    catalog = write_catalog(tmp_path / "cat", 13, missing=(10, 11, 12), no_text=(0, 4, 8))
    out = tmp_path / "emb"
    assert main(["extract", "--catalog", str(catalog), "--out", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    s = shards.read_manifest(out)["summary"]
    assert s["input_rows"] == 13 and s["embedded_this_run"] == s["embedded_rows"] == 10
    assert s["rejected_rows"] == 3 and s["rejected_by_reason"] == {"missing_file": 3}
    assert s["input_rows"] == s["embedded_rows"] + s["rejected_rows"]
    assert s["with_text_this_run"] == 7 <= s["embedded_this_run"]
    assert int(shards.read_shards(out, ["has_text"])["has_text"].sum()) == 7
    assert "with text: 7 of the 10 rows embedded this run" in printed


# ------------------------------------------------------------------------------------ 6. rerun after a failure


@pytest.mark.parametrize("how", ["all_rows_rejected", "interrupted"])
def test_failed_extraction_does_not_refuse_a_corrected_rerun(how, tmp_path, monkeypatch, capsys):
    out = tmp_path / "emb"
    if how == "all_rows_rejected":
        bad = write_catalog(tmp_path / "bad", 6, missing=range(6))
        assert main(["extract", "--catalog", str(bad), "--out", str(out), *FAST]) == 0
        assert shards.read_manifest(out)["rows"] == 0
    else:
        real = shards.write_shard

        def killed(*a, **k):
            raise KeyboardInterrupt("killed")

        monkeypatch.setattr(shards, "write_shard", killed)
        good = write_catalog(tmp_path / "good", 12)
        assert main(["extract", "--catalog", str(good), "--out", str(out), *FAST]) == 130
        monkeypatch.setattr(shards, "write_shard", real)
        assert shards.read_manifest(out)["shards"] == []
    good = write_catalog(tmp_path / "good", 12)
    other = [*FAST[:4], "--image-size", "40", *FAST[6:]]
    capsys.readouterr()
    assert main(["extract", "--catalog", str(good), "--out", str(out), *other]) == 0, capsys.readouterr().err
    m = shards.read_manifest(out)
    assert m["complete"] and m["rows"] == 12 and m["settings"]["image_size"] == 40
    # complete shards made with other settings are still refused, saying what the folder holds
    capsys.readouterr()
    assert main(["extract", "--catalog", str(good), "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert "1 shard(s) (12 rows" in err and "image_size: existing 40, requested 32" in err and "--overwrite" in err
    assert shards.read_manifest(out)["rows"] == 12


# ------------------------------------------------------------------------------------ 7. label column


def test_train_defaults_to_the_label_column_recorded_at_extraction(tmp_path, eager):
    catalog = write_catalog(tmp_path / "cat", 30, coarse=True)
    emb, run = tmp_path / "emb", tmp_path / "run"
    assert (
        main(
            [
                "extract",
                "--catalog",
                str(catalog),
                "--out",
                str(emb),
                *FAST,
                "--text-encoder",
                "tfidf",
                "--label-col",
                "coarse",
            ]
        )
        == 0
    )
    assert shards.read_manifest(emb)["columns"]["label"] == "coarse"
    assert main(["train", "--embeddings", str(emb), "--out", str(run), "--epochs", "1", "--quiet"]) == 0
    assert json.loads((run / "labels.json").read_text()) == ["cool", "warm"]
    assert json.loads((run / "config.json").read_text())["label_col"] == "coarse"


# ------------------------------------------------------------------------------------ 8. encodings


def test_latin1_catalog_needs_encoding_flag(tmp_path, capsys):
    (tmp_path / "img").mkdir()
    for i, colour in enumerate(COLOURS.values()):
        Image.new("RGB", (36, 36), colour).save(tmp_path / "img" / f"{i}.png")
    text = (
        "product_id,image_path,title,label\n"
        "a,img/0.png,red shirt,red\n"
        "b,img/1.png,café au lait mug,green\n"
        "c,img/2.png,blue shirt,blue\n"
    )
    catalog = tmp_path / "catalog.csv"
    catalog.write_bytes(text.encode("latin-1"))
    out = tmp_path / "emb"
    assert main(["extract", "--catalog", str(catalog), "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert "--encoding" in err and "line 3" in err and "Traceback" not in err
    assert main(["extract", "--catalog", str(catalog), "--out", str(out), *FAST, "--encoding", "latin-1"]) == 0
    got = shards.read_shards(out, ["product_id", "text"])
    assert dict(zip(got["product_id"], got["text"]))["b"] == "café au lait mug"


# ------------------------------------------------------------------------------------ 9. a quiet, fast CLI


def _env_without_tf_log_level():
    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the CLI itself must quieten TensorFlow
    return env


def test_help_is_fast_and_does_not_import_tensorflow(tmp_path):
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "prodfuse.cli", "--help"], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert proc.returncode == 0 and "extract" in proc.stdout
    assert time.perf_counter() - t0 < 2
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "prodfuse.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 0
    assert "prodfuse" in proc.stderr  # importtime did list the imports
    assert not [line for line in proc.stderr.splitlines() if "tensorflow" in line or "keras" in line]


def test_train_and_extract_subprocesses_print_no_tensorflow_chatter_or_escape_codes(tmp_path, small_shards):
    env = _env_without_tf_log_level()
    catalog = write_catalog(tmp_path / "cat", 8)
    commands = {
        "train": ["train", "--embeddings", str(small_shards), "--out", str(tmp_path / "run"), "--epochs", "1"],
        # progress stays on (no --no-progress), but stderr is a pipe, not a terminal
        "extract": ["extract", "--catalog", str(catalog), "--out", str(tmp_path / "emb"), *FAST[:-1]],
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "prodfuse.cli", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
            env=env,
        )
        for name, argv in commands.items()
    }  # side by side: most of each is TensorFlow's start-up
    done = {name: p.communicate(timeout=300) for name, p in procs.items()}
    for name, (out, err) in done.items():
        assert procs[name].returncode == 0, err
        noisy = [line for line in err.splitlines() if any(w in line for w in ("I0000", "cudart", "oneDNN"))]
        assert not noisy, err
        assert "\r" not in out + err and "\x1b[" not in out + err, repr(out + err)
    assert "trained" in done["train"][0]
    assert "extracted 8 of 8 rows" in done["extract"][0]


# ------------------------------------------------------------------------------------ issue 27: the first hour


@pytest.fixture(scope="module")
def coarse_run(tmp_path_factory):
    """A run trained on a catalog whose label column is `coarse` (warm/cool), with `sku`/`photo` for id/image."""
    import tensorflow as tf

    root = tmp_path_factory.mktemp("coarse")
    catalog = write_catalog(root / "cat", 30, coarse=True)
    df = pd.read_csv(catalog, dtype=str, keep_default_na=False)
    df.drop(columns=["label"]).rename(columns={"product_id": "sku", "image_path": "photo"}).to_csv(catalog, index=False)
    emb, run = root / "emb", root / "run"
    cols = ["--id-col", "sku", "--image-col", "photo", "--label-col", "coarse"]
    assert main(["extract", "--catalog", str(catalog), "--out", str(emb), *FAST, "--views", "1", *cols]) == 0
    tf.config.run_functions_eagerly(True)
    try:
        assert main(["train", "--embeddings", str(emb), "--out", str(run), "--epochs", "1", "--quiet"]) == 0
    finally:
        tf.config.run_functions_eagerly(False)
    return root


def test_extract_like_carries_the_column_flags(coarse_run, tmp_path, capsys):
    """Item 11: `extract --like` reads the id, image, text, label and split columns the folder was made with;
    a column flag given explicitly still wins."""
    new = write_catalog(tmp_path / "new", 6, seed=3, coarse=True)
    df = pd.read_csv(new, dtype=str, keep_default_na=False)
    df.drop(columns=["label"]).rename(columns={"product_id": "sku", "image_path": "photo"}).to_csv(new, index=False)
    like = ["--like", str(coarse_run / "emb"), "--no-progress"]
    assert main(["extract", "--catalog", str(new), "--out", str(tmp_path / "a"), *like]) == 0, capsys.readouterr()
    m = shards.read_manifest(tmp_path / "a")
    assert m["columns"]["id"] == "sku" and m["columns"]["image"] == "photo" and m["columns"]["label"] == "coarse"
    got = shards.read_shards(tmp_path / "a", ["sku", "coarse"])
    assert list(got["sku"]) == [f"p{i}" for i in range(6)] and set(got["coarse"]) == {"warm", "cool"}
    # an explicit flag wins: an unlabelled extraction of the same catalog
    assert main(["extract", "--catalog", str(new), "--out", str(tmp_path / "b"), *like, "--label-col", ""]) == 0
    assert shards.read_manifest(tmp_path / "b")["columns"]["label"] is None


def test_predict_defaults_to_the_runs_label_column(coarse_run, tmp_path, capsys):
    """Item 12: with no --label-col, predict reads the run's label column (`coarse`): a true-label column and
    an accuracy line."""
    new = write_catalog(tmp_path / "new", 6, seed=4, coarse=True)
    out = tmp_path / "pred.csv"
    argv = ["predict", "--run", str(coarse_run / "run"), "--catalog", str(new), "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    pred = pd.read_csv(out)
    assert "coarse" in pred.columns and "label" not in pred.columns
    assert pred["coarse"].tolist() == [COARSE[list(COLOURS)[i % 3]] for i in range(6)]
    assert "top-1 accuracy on the 6 items with a known label" in printed
    # a catalog without that column: predictions without accuracy, and no error
    pd.read_csv(new).drop(columns=["coarse"]).to_csv(new, index=False)
    assert main(argv) == 0
    assert "coarse" not in pd.read_csv(out).columns and "no label column" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,hint",
    [
        (["extract", "--catalog", "missing.csv", "--out", "emb"], "does not exist"),
        (["train", "--embeddings", "missing", "--out", "run"], "prodfuse extract --catalog CATALOG --out missing"),
        (["predict", "--run", "missing", "--catalog", "c.csv", "--out", "p.csv"], "not a complete run folder"),
        (["evaluate", "--run", "missing"], "not a complete run folder"),
    ],
    ids=["extract", "train", "predict", "evaluate"],
)
def test_a_missing_path_fails_before_tensorflow_is_imported(argv, hint, tmp_path):
    """Item 14: each command checks its files and folders before its heavy imports."""
    code = (
        "import sys\n"
        "import prodfuse\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules\n"
        "assert callable(prodfuse.extract) and prodfuse.ExtractConfig.__name__ == 'ExtractConfig'\n"
        "from prodfuse.cli import main\n"
        f"rc = main({argv!r})\n"
        "print('rc', rc, 'tensorflow' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-3:] == ["rc", "2", "False"], proc.stdout + proc.stderr
    assert hint in proc.stderr and "extract_embeddings.py" not in proc.stderr


def test_train_with_a_wrong_label_column_leaves_no_run_folder(small_shards, tmp_path, capsys):
    """Item 15: --label-col nope stops before the run folder is made, naming the shards' columns."""
    out = tmp_path / "run"
    assert main(["train", "--embeddings", str(small_shards), "--label-col", "nope", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--label-col 'nope'" in err and "'label'" in err
    assert not out.exists()


def test_compare_quiet_prints_no_epoch_lines(small_shards, tmp_path, eager, capsys):
    argv = ["compare", "--embeddings", str(small_shards), "--models", "image", "--epochs", "2", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "c")]) == 0
    printed = capsys.readouterr()
    assert "compared 1 models" in printed.out
    assert "Epoch" not in printed.out + printed.err and "loss" not in printed.out + printed.err


def test_extraction_summary_counts_photos_and_names_rejects(tmp_path, capsys):
    """Item 15: the rate counts photos (each of --views backbone images), OCR counts only the photos that were
    embedded, and a path outside the catalog's folder says why it is refused."""
    catalog = write_catalog(tmp_path / "cat", 5, missing=(3,))
    df = pd.read_csv(catalog, dtype=str, keep_default_na=False)
    df.loc[4, "image_path"] = "../outside.png"
    df.to_csv(catalog, index=False)
    out = tmp_path / "emb"
    fast_ocr = [*FAST[:6], "--ocr", "rapidocr", "--ocr-workers", "1", "--ocr-cache", str(tmp_path / "ocr")]
    assert main(["extract", "--catalog", str(catalog), "--out", str(out), *fast_ocr, "--views", "2"]) == 0
    printed = capsys.readouterr().out
    s = shards.read_manifest(out)["summary"]
    assert s["embedded_rows"] == 3 and s["ocr"]["images"] == 3  # the missing file was handed to OCR, not read
    assert s["views"] == 2 and s["photos_per_s"] == pytest.approx(s["views_per_s"] / 2, abs=0.1)  # rounded to 0.1
    assert "OCR (rapidocr): 3 photos" in printed and "photos/s" in printed and "images/s" not in printed
    rejects = pd.read_csv(out / shards.REJECTS, keep_default_na=False).set_index("reason")
    assert "catalog's folder" in rejects.loc["outside_catalog_dir", "detail"]


def test_index_summary_names_its_parameters_and_queries(small_shards, tmp_path, capsys):
    assert main(["index", "--embeddings", str(small_shards), "--out", str(tmp_path / "ix")]) == 0
    printed = capsys.readouterr().out
    assert "flat (exact)" in printed and "{}" not in printed
    assert "--id ID | --image PATH)" in printed and "--text" not in printed


def test_audit_pairs_hold_a_text_excerpt(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(4, 8)).astype(np.float32)
    image[1] = image[0]
    long = "organic oat drink " * 40
    emb = write_synthetic_shards(
        tmp_path / "emb",
        image,
        np.zeros((4, 4), np.float32),
        np.array(["a", "a", "b", "b"]),
        extra={"text": [long] * 4},
    )
    out = tmp_path / "audit"
    assert main(["audit", "--embeddings", str(emb), "--out", str(out)]) == 0
    pairs = pd.read_csv(out / "pairs.csv")
    assert len(pairs) == 1 and pairs["text_a"].str.len().max() <= 120
    assert pairs["text_a"][0].startswith("organic oat drink") and pairs["text_a"][0].endswith("…")


def test_empty_id_is_reported_by_file_line(tmp_path, capsys):
    catalog = tmp_path / "c.csv"
    catalog.write_text("product_id,image_path,label\na,x.png,red\n,y.png,red\nc,z.png,red\n")
    assert main(["extract", "--catalog", str(catalog), "--out", str(tmp_path / "emb"), *FAST]) == 2
    assert "lines [3]" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text",
    [
        "{b64}",
        "{b64_lines}",
        "data:image/png;base64,{b64}",
        "data:image/png;base64,{b64_lines}",
    ],
)
def test_base64_photo_with_line_breaks_or_a_data_url_decodes(text):
    import base64

    from prodfuse.serving.uploads import decode_base64

    photo = bytes(range(256)) * 3
    b64 = base64.b64encode(photo).decode()
    b64_lines = base64.encodebytes(photo).decode()  # MIME style: a line break every 76 characters
    assert decode_base64(text.format(b64=b64, b64_lines=b64_lines)) == photo
    with pytest.raises(ValueError, match="base64"):
        decode_base64("data:image/png;base64,not*base64")
