"""`prodfuse tune`: search the head's settings by K-fold cross-validation within a time budget."""

from __future__ import annotations

import argparse

from prodfuse.cli.common import check_shard_column, check_shard_folders, default, make_config
from prodfuse.evaluation.config import TUNE_SPACE, TuneConfig
from prodfuse.modeling.config import FUSIONS

HELP = "search the head's settings by K-fold cross-validation within a time budget"


def add_args(p: argparse.ArgumentParser) -> None:
    d = lambda name: default(TuneConfig, name)  # noqa: E731
    p.add_argument(
        "--embeddings",
        required=True,
        help="training shard folder; rows its split column marks test are left out of the folds (a folder without "
        "one is folded whole: keep your held-out test set out of it)",
    )
    p.add_argument("--folds", type=int, default=d("folds"), help="K >= 3: fold k test, fold k+1 val (default 3)")
    p.add_argument(
        "--budget-minutes",
        type=float,
        default=d("budget_minutes"),
        help="no new trial starts after this many minutes; a started one is finished (default 60)",
    )
    p.add_argument("--max-trials", type=int, default=None, help="stop after this many trials as well")
    p.add_argument("--fusion", default=d("fusion"), choices=FUSIONS, help="the model searched (default product)")
    p.add_argument(
        "--space",
        default=None,
        help=f"comma list of settings to search, from {','.join(TUNE_SPACE)} (default: all that apply to the fusion)",
    )
    p.add_argument("--label-col", default=None, help="label column (default: the one recorded at extraction)")
    p.add_argument("--split-col", default=None, help="split column (default: the one recorded at extraction)")
    p.add_argument("--epochs", type=int, default=d("epochs"), help="per model, as for train (default 100)")
    p.add_argument("--patience", type=int, default=d("patience"), help="as for train (default 20)")
    p.add_argument("--seed", type=int, default=d("seed"), help="the sampler's and every model's seed (default 42)")
    p.add_argument("--out", default=None, help="output folder (default runs/tune-<embeddings name>); a rerun continues")
    p.add_argument("--overwrite", action="store_true", help="discard a stored search in --out and start afresh")


def config(args: argparse.Namespace) -> TuneConfig:
    return make_config(TuneConfig, args)


def check(cfg: TuneConfig) -> None:
    """The shard folder and its label column, before TensorFlow loads."""
    check_shard_folders(embeddings=cfg.embeddings)
    check_shard_column(cfg.embeddings, cfg.label_col, "label", "--label-col")


def run(cfg: TuneConfig, stop=None) -> int:
    import logging

    import tensorflow as tf

    from prodfuse.evaluation.tune import import_optuna, tune

    optuna = import_optuna()
    tf.config.experimental.enable_op_determinism()  # see cli.train
    # One progress line per fold and per trial comes from tune itself: quiet each training run's own lines (unless
    # --verbose) and Optuna's echo of each trial, and put both back for callers of main() in-process.
    # TensorFlow's warning that each new model retraces its functions, too: a search builds one model per fold.
    quiet = [logging.getLogger("prodfuse.modeling"), tf.get_logger()]
    levels, verbosity = [lg.level for lg in quiet], optuna.logging.get_verbosity()
    if logging.getLogger("prodfuse").level > logging.DEBUG:
        for lg in quiet:
            lg.setLevel(logging.ERROR)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        s = tune(cfg)
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
        optuna.logging.set_verbosity(verbosity)
    best, base = s["best"], s["defaults"]
    t = s["trials"]
    print(
        f"\n{t['complete']} trials complete, {t['pruned']} pruned, {t['fail']} failed in {s['seconds'] / 60:.1f} min; "
        f"{s['folds']}-fold mean accuracy"
    )
    print(f"  best (trial {best['trial']}): {best['accuracy']:.4f} ± {best['accuracy_std']:.4f}")
    if base is not None:
        print(f"  defaults (trial 0): {base['accuracy']:.4f} ± {base['accuracy_std']:.4f}")
    print(f"  train with: prodfuse train --embeddings {cfg.embeddings} {s['train_flags']}")
    print(f"  trials: {s['out']}/trials.csv, summary: {s['out']}/tune.json")
    return 0
