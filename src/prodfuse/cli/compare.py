"""`prodfuse compare`: unimodal, fused and linear-probe models on the same splits."""

from __future__ import annotations

import argparse

from prodfuse.cli.common import default, make_config
from prodfuse.cli.train import add_shared_args
from prodfuse.cli.train import check as check  # shard folders and label column, before TensorFlow loads
from prodfuse.evaluation.config import MODELS, CompareConfig
from prodfuse.modeling.config import MONITORS

HELP = "unimodal vs fusion models and linear probes on the same splits"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embeddings", required=True, help="shard folder (as for train)")
    add_shared_args(p)
    p.add_argument(
        "--folds",
        type=int,
        default=None,
        help="stratified K-fold cross-validation (K >= 3): fold k test, fold k+1 val, K runs (mean ± std)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="repeat with N seeds (model init and, without a split column, the split); mean ± std",
    )
    p.add_argument(
        "--text-branch",
        default="auto",
        choices=["auto", "mlp", "cnn"],
        help="text branch of the text and fusion models (auto: mlp when the shards hold text "
        "embeddings, else the token CNN)",
    )
    p.add_argument(
        "--late-objective",
        default="logloss",
        choices=["logloss", "accuracy"],
        help="what the late-fusion weight minimises/maximises on validation (default logloss)",
    )
    p.add_argument(
        "--weight-decay",
        type=float,
        default=default(CompareConfig, "weight_decay"),
        help="as for train: decoupled weight decay (AdamW)",
    )
    p.add_argument("--monitor", default=default(CompareConfig, "monitor"), choices=MONITORS, help="as for train")
    p.add_argument(
        "--models", default=",".join(MODELS), help=f"comma list of models to compare (default {','.join(MODELS)})"
    )
    p.add_argument("--out", default=None, help="output folder (default runs/compare-<embeddings name>)")
    p.add_argument(
        "--probe-cache",
        default=None,
        help="folder keeping the linear probes' results, keyed by a hash of their inputs: a rerun on the same "
        "shards and splits skips the fits",
    )


def config(args: argparse.Namespace) -> CompareConfig:
    return make_config(CompareConfig, args)


def run(cfg: CompareConfig, stop=None) -> int:
    import contextlib
    import logging
    import os

    import tensorflow as tf

    from prodfuse.evaluation.compare import compare

    tf.config.experimental.enable_op_determinism()  # see cli.train
    # compare fits each model with a line per epoch, which Keras writes to stdout (and it resets Keras's own logging
    # switch between models). --quiet (main() puts the prodfuse logger at WARNING) drops stdout while it runs;
    # warnings go to stderr through logging, and the summary below is printed after.
    quiet = not logging.getLogger("prodfuse").isEnabledFor(logging.INFO)
    with open(os.devnull, "w") if quiet else contextlib.nullcontext() as sink:
        with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
            s = compare(cfg)
    for n in s["notes"]:
        print(f"note: {n}")
    print(f"\ncompared {len(s['rows'])} models on the {s['split']} split of {cfg.embeddings} ({s['repeated_over']})")
    print(s["markdown"])
    if s["note"]:
        print(s["note"])
    print(f"  table: {s['out']}/compare.md, {s['out']}/compare.json")
    return 0
