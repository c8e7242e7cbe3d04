"""tune: the search space and its defaults, the flags it prints, and a search on tiny shards that resumes."""

import json

import numpy as np
import pandas as pd
import pytest

from prodfuse import TrainConfig, TuneConfig
from prodfuse.evaluation.config import TUNE_SPACE, tune_space
from prodfuse.evaluation.tune import defaults_of, train_flags
from synthetic import image_vs_text_classes, write_synthetic_shards


def test_space_holds_every_default_and_follows_the_fusion():
    assert "modality_dropout" not in tune_space(None, "product")  # product trains each stream alone
    assert "modality_dropout" in tune_space(None, "gated")
    for name, value in defaults_of(TUNE_SPACE).items():  # trial 0 must be a point of the space
        spec = TUNE_SPACE[name]
        assert value in spec[1] if spec[0] == "categorical" else spec[1] <= value <= spec[2], name
    assert TuneConfig("E", space="wide, lr").space == ("wide", "lr")
    with pytest.raises(ValueError, match="unknown \\['dropout'\\]"):
        TuneConfig("E", space="lr,dropout")
    with pytest.raises(ValueError, match="folds"):
        TuneConfig("E", folds=2)


def test_printed_flags_set_those_values_in_train():
    from prodfuse.cli import build_parser
    from prodfuse.cli import train as train_cli

    params = {"lr": 0.000345678, "batch_size": 64, "wide": False, "input_norm": "none", "lr_schedule": "cosine"}
    flags = train_flags(params)
    assert flags == "--lr 0.0003457 --batch-size 64 --no-wide --input-norm none --lr-schedule cosine"
    args = build_parser().parse_args(["train", "--embeddings", "E", *flags.split()])
    args.stderr_tty = False
    cfg = train_cli.config(args)
    got = {k: getattr(cfg, k) for k in params}
    assert got == {**params, "lr": pytest.approx(params["lr"], rel=1e-3)}


def test_tune_scores_the_defaults_first_keeps_the_best_and_resumes(tmp_path, capsys, eager):
    from prodfuse.cli import main

    img, txt, labels = image_vs_text_classes(n_per_class=12, image_dim=8, text_dim=6)
    emb = write_synthetic_shards(tmp_path / "emb", img, txt, labels)
    out = tmp_path / "tune"
    args = ["tune", "--embeddings", str(emb), "--fusion", "concat", "--space", "lr,wide", "--epochs", "2"]
    args += ["--patience", "2", "--out", str(out)]
    assert main([*args, "--max-trials", "2"]) == 0
    summary = json.loads((out / "tune.json").read_text())
    trials = pd.read_csv(out / "trials.csv")
    assert list(trials["trial"]) == [0, 1] and summary["trials"] == {"complete": 2, "pruned": 0, "fail": 0}
    base = trials.iloc[0]
    assert base["lr"] == TrainConfig.lr and bool(base["wide"]) is TrainConfig.wide  # trial 0: the defaults
    folds = [json.loads(f.replace("'", '"')) for f in trials["fold_accuracy"]]
    assert all(len(f) == 3 for f in folds)
    assert trials["accuracy"].tolist() == pytest.approx([np.mean(f) for f in folds])
    best = trials["accuracy"].idxmax()
    assert summary["best"]["trial"] == int(trials["trial"][best])
    assert summary["gain_over_defaults"] == pytest.approx(trials["accuracy"][best] - base["accuracy"])
    assert summary["best_params"]["lr"] == pytest.approx(trials["lr"][best])
    assert not (out / "fold-runs").exists()  # trials keep scores, not models
    printed = capsys.readouterr().out
    assert "2 trials complete" in printed and f"prodfuse train --embeddings {emb} --lr " in printed

    # A search killed mid-trial leaves that trial running in the study (here: asked for and never told).
    import optuna

    optuna.load_study(study_name="prodfuse-tune", storage=f"sqlite:///{out / 'study.db'}").ask()
    # The same search again continues the stored study: the orphan recorded as failed, one more trial, the
    # defaults not repeated.
    assert main([*args, "--max-trials", "1"]) == 0
    trials = pd.read_csv(out / "trials.csv")
    assert list(trials["trial"]) == [0, 1, 2, 3] and list(trials["state"])[2:] == ["fail", "complete"]
    assert (trials["lr"] == TrainConfig.lr).sum() == 1
    # Other settings would mix two searches in one study: refused, naming what differs.
    with pytest.raises(ValueError, match="epochs: 2"):
        from prodfuse.evaluation.tune import tune

        tune(TuneConfig(str(emb), fusion="concat", space="lr,wide", epochs=3, out=str(out)))


def test_without_optuna_the_error_names_the_extra(monkeypatch, tmp_path):
    from prodfuse.evaluation.tune import tune

    monkeypatch.setitem(__import__("sys").modules, "optuna", None)  # import optuna -> ImportError
    with pytest.raises(ImportError, match=r"pip install -e \.\[tune\]"):
        tune(TuneConfig(str(tmp_path), out=str(tmp_path / "t")))
    assert not (tmp_path / "t").exists()


def test_an_interrupted_search_says_its_trials_are_kept():
    import argparse

    from prodfuse.cli import _resume_hint

    assert "run the same command again to continue" in _resume_hint(argparse.Namespace(command="tune"))
