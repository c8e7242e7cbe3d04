"""compare: late-fusion weight search, the train arguments per model, and a full run on tiny synthetic shards."""

import json

import numpy as np
import pytest

from prodfuse import CompareConfig
from prodfuse.evaluation.compare import fit_late_weight, repetitions, train_config
from prodfuse.evaluation.config import MODELS, TRAINED, parse_models
from synthetic import write_synthetic_shards


def _shards(folder, n_per_class=15, image_dim=12, text_dim=6, seed=0):
    """3 classes: b and c share one image centre (only the text tells them apart); a differs in both."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(["a", "b", "c"], n_per_class)
    img_centre = {"a": rng.normal(size=image_dim) * 3, "b": rng.normal(size=image_dim) * 3}
    img_centre["c"] = img_centre["b"]
    txt_centre = {"a": rng.normal(size=text_dim) * 3, "b": rng.normal(size=text_dim) * 3}
    txt_centre["c"] = -txt_centre["b"]
    n = len(labels)
    img = np.stack([img_centre[c] for c in labels]) + rng.normal(size=(n, image_dim))
    txt = np.stack([txt_centre[c] for c in labels]) + rng.normal(size=(n, text_dim))
    return write_synthetic_shards(
        folder, img.astype(np.float32), txt.astype(np.float32), labels, tokens=np.ones((n, 60), np.int32)
    )


def test_late_weight_follows_the_informative_stream():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    good = np.full((200, 4), 0.1)
    good[np.arange(200), y] = 0.7
    noise = rng.dirichlet(np.ones(4), 200)
    assert fit_late_weight(y, good, noise)[0] == 1.0
    assert fit_late_weight(y, noise, good)[0] == 0.0
    w, grid = fit_late_weight(y, good, good, "accuracy")
    assert w == 0.5 and len(grid) == 21  # a flat objective keeps the even mix
    with pytest.raises(ValueError, match="'auc'"):
        fit_late_weight(y, good, noise, "auc")


def test_parse_models_and_train_arguments(tmp_path):
    assert parse_models("gated, image,gated") == ("gated", "image")
    with pytest.raises(ValueError, match="'mlp'"):
        parse_models("image,mlp")
    cfg = CompareConfig(embeddings="E", label_col="label", epochs=3, patience=2, batch_size=16, seed=7)
    ns = {m: train_config(cfg, m, tmp_path / m, "cnn", seed=8, fold=0) for m in TRAINED if m != "late"}
    assert (ns["image"].image_branch, ns["image"].text_branch) == ("mlp", "none")
    assert (ns["text"].image_branch, ns["text"].text_branch) == ("none", "cnn")
    for f in ("concat", "gated", "cross_attention"):
        assert (ns[f].fusion, ns[f].image_branch, ns[f].text_branch) == (f, "mlp", "cnn")
    assert all(
        n.epochs == 3 and n.seed == 8 and n.patience == 2 and n.batch_size == 16 and n.out == str(tmp_path / m)
        for m, n in ns.items()
    )
    assert ns["gated"].lr == 1e-3  # everything not set by compare keeps train's default


def test_compare_trains_every_model_on_the_same_splits(tmp_path, capsys, eager):
    from prodfuse.cli import main

    emb = _shards(tmp_path / "emb")
    out = tmp_path / "cmp"
    assert main(["compare", "--embeddings", str(emb), "--epochs", "2", "--patience", "2", "--out", str(out)]) == 0
    result = json.loads((out / "compare.json").read_text())
    assert [r["model"] for r in result["rows"]] == list(MODELS)
    assert result["split"] == "test" and result["text_branch"] == "mlp"
    n_test = result["splits"]["test"]
    rows = {r["model"]: r for r in result["rows"]}
    for r in rows.values():
        assert r["n"] == n_test and (r["train_seconds"] > 0 or r["model"].startswith("lr_"))
    # b and c share their image centre, so the image alone tops out near 2/3; the text separates all three
    assert rows["lr_concat"]["accuracy"] == 1.0 and rows["lr_text"]["accuracy"] == 1.0
    assert rows["lr_image"]["accuracy"] <= 0.8
    assert rows["lr_late"]["accuracy"] >= max(rows["lr_image"]["accuracy"], rows["lr_text"]["accuracy"])
    late = result["late_fusion"]
    assert 0 <= late["weight"] <= 1 and set(late["temperatures"]) == {"image", "text"}
    for m in ("image", "text", "concat", "gated", "cross_attention"):
        config = json.loads((out / m / "config.json").read_text())
        assert config["splits"]["test"] == n_test and config["train"]["seed"] == 42
    assert (out / "image" / "temperature.json").is_file()  # late fusion calibrated the unimodal runs
    md = (out / "compare.md").read_text()
    printed = capsys.readouterr().out
    for m in MODELS:
        assert f"| {m} |" in md and f"| {m} |" in printed


def test_repetitions_by_folds_or_seeds():
    a = CompareConfig(embeddings="E", seed=5, seeds=3)
    assert [(r["seed"], r["fold"], r["name"]) for r in repetitions(a)] == [
        (5, None, "seed5"),
        (6, None, "seed6"),
        (7, None, "seed7"),
    ]
    a = CompareConfig(embeddings="E", seed=5, folds=4)
    assert [(r["seed"], r["fold"]) for r in repetitions(a)] == [(5, 0), (5, 1), (5, 2), (5, 3)]
    with pytest.raises(ValueError, match="folds 4 and seeds 2"):
        CompareConfig(embeddings="E", seed=5, folds=4, seeds=2)


def test_compare_folds_report_mean_and_std(tmp_path, eager):
    from prodfuse.cli import main

    emb = _shards(tmp_path / "emb", n_per_class=12)
    out = tmp_path / "cmp"
    assert (
        main(
            [
                "compare",
                "--embeddings",
                str(emb),
                "--folds",
                "3",
                "--epochs",
                "2",
                "--patience",
                "2",
                "--models",
                "image,lr_image,lr_concat",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads((out / "compare.json").read_text())
    assert result["repeated_over"] == "3 folds" and len(result["per_repetition"]) == 3
    tests = []
    for k in range(3):
        config = json.loads((out / f"fold{k}" / "image" / "config.json").read_text())
        assert config["train"]["folds"] == 3 and config["train"]["fold"] == k
        assert config["splits"]["test"] == 12  # 4 items per class per fold
        tests.append(config["splits"]["test"])
    row = {r["model"]: r for r in result["rows"]}["lr_concat"]
    values = row["accuracy_all"]
    assert len(values) == 3 and row["accuracy"] == pytest.approx(np.mean(values))
    assert row["accuracy_std"] == pytest.approx(np.std(values, ddof=1))
    assert "±" in (out / "compare.md").read_text()


def test_probe_cache_returns_the_same_figures_without_fitting_again(tmp_path, monkeypatch):
    from prodfuse.evaluation import probes

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 20)
    arrays = {
        "image": (rng.normal(size=(60, 8)) + y[:, None]).astype(np.float32),
        "text": rng.normal(size=(60, 4)).astype(np.float32),
    }
    splits = {"train": np.arange(0, 60, 2), "val": np.arange(1, 60, 4), "test": np.arange(3, 60, 4)}
    run = lambda a: probes.run_probes(a, y, splits, 3, "test", ("lr_image", "lr_concat"), cache_dir=str(tmp_path))
    first = run(arrays)
    assert len(list(tmp_path.glob("*.npz"))) == 2

    def no_fit(*args, **kwargs):
        raise AssertionError("fitted again although the cache holds this probe")

    monkeypatch.setattr(probes, "fit_probe", no_fit)
    again = run(arrays)
    for name in first:
        assert again[name]["metrics"] == first[name]["metrics"]
    changed = {**arrays, "text": arrays["text"] + 1.0}  # other inputs: another key, so a fit
    with pytest.raises(AssertionError, match="fitted again"):
        run(changed)
