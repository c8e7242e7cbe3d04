"""`prodfuse train`: shards -> fusion MLP run folder."""

from __future__ import annotations

import argparse

from prodfuse.cli.common import check_shard_column, check_shard_folders, default, make_config
from prodfuse.modeling.config import (
    CLASS_WEIGHTS,
    FUSIONS,
    IMAGE_BRANCHES,
    INPUT_NORMS,
    LR_SCHEDULES,
    MONITORS,
    PRECISIONS,
    STRATEGIES,
    TEXT_BRANCHES,
    TrainConfig,
)
from prodfuse.modeling.hierarchy import LABEL_PARENTS

HELP = "shards -> fusion MLP run folder"


def d(name):
    return default(TrainConfig, name)


def add_shared_args(p: argparse.ArgumentParser) -> None:
    """Flags that compare shares with train."""
    p.add_argument("--val-embeddings", default=None, help="separate shard folder used as the validation split")
    p.add_argument(
        "--test-embeddings",
        default=None,
        help="separate shard folder scored as the test split (never used for early stopping)",
    )
    p.add_argument(
        "--label-col", default=None, help="label column carried in the shards (default: the one recorded at extraction)"
    )
    p.add_argument(
        "--split-col",
        default=None,
        help="train/val/test column in the shards (default: the one recorded at extraction; '' none)",
    )
    p.add_argument("--epochs", type=int, default=d("epochs"), help=f"at most this many, 1.. (default {d('epochs')})")
    p.add_argument(
        "--patience",
        type=int,
        default=d("patience"),
        help=f"early-stopping patience in epochs, 1.. (default {d('patience')})",
    )
    p.add_argument("--batch-size", type=int, default=d("batch_size"), help=f"1..65536 (default {d('batch_size')})")
    p.add_argument("--seed", type=int, default=d("seed"), help=f"0..2^31-1 (default {d('seed')})")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing run folder (its model, temperature and evaluations are deleted)",
    )


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embeddings", default=None, help="shard folder (default embeddings/demo)")
    add_shared_args(p)
    p.add_argument(
        "--folds",
        type=int,
        default=None,
        help="stratified K-fold (K >= 3) instead of the split column / 80-10-10 split: fold --fold is "
        "test, the next fold val (used by compare --folds)",
    )
    p.add_argument("--fold", type=int, default=0, help="which fold is the test split with --folds (default 0)")
    p.add_argument(
        "--label-cols",
        default=None,
        help="a category hierarchy: comma list of label columns carried in the shards, coarse to fine (e.g. "
        "master_category,sub_category,article_type); the model learns the last, each coarser level's probability "
        "is the sum of its labels' (docs/concepts/hierarchies.md)",
    )
    p.add_argument(
        "--label-parents",
        default=d("label_parents"),
        choices=LABEL_PARENTS,
        help="with --label-cols: a label found under two parents is an error (unique, the default), or keeps its "
        "most frequent parent (majority; hierarchy.json lists the conflicts)",
    )
    p.add_argument(
        "--fusion",
        default=d("fusion"),
        choices=FUSIONS,
        help="product (default): each stream trained alone, probabilities multiplied with weights fitted on "
        "validation; stack: a logistic regression on the streams' out-of-fold log-probabilities; joint: a head on "
        "the frozen streams' vectors; concat, gated, cross_attention: one model trained jointly",
    )
    p.add_argument(
        "--probe-expert",
        action=argparse.BooleanOptionalAction,
        default=d("probe_expert"),
        help="with --fusion product: a third expert, a logistic regression on both embeddings, its weight fitted "
        "on validation with the streams' (default: on for the product of an image and a text embedding; "
        "--no-probe-expert: the two streams alone)",
    )
    p.add_argument(
        "--stack-folds",
        type=int,
        default=d("stack_folds"),
        help="with --fusion stack: folds of the training rows for the out-of-fold probabilities (default 3; each "
        "fold trains both streams once more)",
    )
    p.add_argument("--text-branch", default=d("text_branch"), choices=TEXT_BRANCHES)
    p.add_argument("--image-branch", default=d("image_branch"), choices=IMAGE_BRANCHES)
    p.add_argument(
        "--wide",
        action=argparse.BooleanOptionalAction,
        default=d("wide"),
        help="a linear path from the embeddings to the logits beside the MLP (default on)",
    )
    p.add_argument(
        "--input-norm",
        default=d("input_norm"),
        choices=INPUT_NORMS,
        help="scale each image embedding to unit length inside the model (default l2)",
    )
    p.add_argument("--lr", type=float, default=d("lr"), help=f"learning rate, 1e-7..10 (default {d('lr')})")
    p.add_argument("--lr-schedule", default=d("lr_schedule"), choices=LR_SCHEDULES)
    p.add_argument(
        "--weight-decay", type=float, default=d("weight_decay"), help="AdamW decay, 0..1 (default 0.05; 0: off)"
    )
    p.add_argument(
        "--monitor", default=d("monitor"), choices=MONITORS, help="what early stopping follows (default val_loss)"
    )
    p.add_argument(
        "--class-weight",
        default=d("class_weight"),
        choices=CLASS_WEIGHTS,
        help="balanced: n / (k n_c) per class, for macro F1 on skewed catalogs; default none, which "
        "measured 0.5-1.5 points more accuracy on fashion and grocery (docs/reports/model-quality.md)",
    )
    p.add_argument("--label-smoothing", type=float, default=d("label_smoothing"), help="0..0.99 (default 0.1)")
    p.add_argument("--mixup", type=float, default=d("mixup"), help="Beta(a, a) mixup of the image stream; 0 = off")
    p.add_argument(
        "--modality-dropout",
        type=float,
        default=d("modality_dropout"),
        help="fraction 0..1 of training items with one stream blanked, half of them the image, half the "
        "text (default 0.5: the fused model must also classify from either stream alone)",
    )
    p.add_argument(
        "--ensemble",
        type=int,
        default=d("ensemble"),
        help="train N models (seeds seed..seed+N-1) and save their averaged probabilities as one model",
    )
    p.add_argument(
        "--staged",
        action="store_true",
        help="train each branch alone first, then the fusion with a 10x lower rate on the branches",
    )
    p.add_argument("--precision", default=d("precision"), choices=PRECISIONS)
    p.add_argument(
        "--strategy",
        default=d("strategy"),
        choices=STRATEGIES,
        help="mirrored: one model replica per device (tf.distribute.MirroredStrategy over the visible GPUs, or "
        "--devices), the same feed, each global batch of --batch-size split evenly between the replicas and their "
        "gradients summed, so --lr stays right; default: one device",
    )
    p.add_argument(
        "--devices",
        default=None,
        help="with --strategy mirrored: comma list of the devices to mirror over, e.g. /gpu:0,/gpu:1 (default: "
        "every visible GPU, the CPU when there is none)",
    )
    p.add_argument("--out", default=None, help="run folder (default runs/<embeddings name>-<fusion>)")


def config(args: argparse.Namespace) -> TrainConfig:
    verbose = 0 if args.quiet else 1 if args.stderr_tty else 2
    return make_config(TrainConfig, args, verbose=verbose)


def check(cfg) -> None:
    """Shard folders and the label/split columns, from manifests and parquet schemas: before TensorFlow loads, and
    before the run folder is made (a wrong --label-col must not leave an empty one behind). compare and tune too."""
    check_shard_folders(
        embeddings=cfg.embeddings, val_embeddings=cfg.val_embeddings, test_embeddings=cfg.test_embeddings
    )
    if cfg.embeddings:
        check_shard_column(cfg.embeddings, cfg.label_col, "label", "--label-col")
        if cfg.split_col:
            check_shard_column(cfg.embeddings, cfg.split_col, "split", "--split-col")
        for column in getattr(cfg, "label_cols", None) or ():  # compare and tune have no hierarchy
            check_shard_column(cfg.embeddings, column, "label", "--label-cols")


def run(cfg: TrainConfig, stop=None) -> int:
    import tensorflow as tf

    from prodfuse.modeling.training import train

    # Repeatable runs for a seed: a process-wide switch, so the command sets it, not the library.
    tf.config.experimental.enable_op_determinism()
    print_summary(train(cfg))
    return 0


def print_levels(m: dict) -> None:
    """The per-level lines of a split's metrics (train and evaluate)."""
    levels = ", ".join(f"{level} {v['accuracy']:.4f}" for level, v in m["levels"].items())
    print(f"        accuracy per level: {levels}; consistent paths {m['consistent_paths']:.4f}")
    b = m["backoff"].get("0.9")
    if b:
        accuracy = "–" if b["accuracy"] is None or b["accuracy"] != b["accuracy"] else f"{b['accuracy']:.4f}"
        print(
            f"        at min confidence 0.9: {b['answered']:.1%} answered ({b['leaf']:.1%} at the finest level), "
            f"accuracy {accuracy}"
        )


def print_summary(run) -> None:
    c = run.config
    s = c["splits"]
    fit = (c.get("product_fusion") or {}).get("fit")
    late = (c.get("late_fusion") or {}).get("fit")
    best = (fit or late or {}).get("best_epoch")
    epochs = (
        "best epochs " + ", ".join(f"{k} {v}" for k, v in best.items())
        if best
        else f"best epoch {c['best_epoch']} of {c['epochs_run']}"
    )
    print(
        f"\ntrained {run.model.name} in {c['train_seconds']} s: {epochs} "
        f"({s['source']}: {s['train']} train / {s['val']} val / {s['test']} test)"
    )
    if fit:
        a, b, *probe_w = fit["product"]["weights"]
        probe = f", probe weight {probe_w[0]:.3g}" if probe_w else ""
        probe_alone = f", probe alone {fit['probe']['accuracy']:.4f}" if probe_w else ""
        print(
            f"  product fusion: image weight {a:.3g}, text weight {b:.3g}{probe}, fitted on validation (accuracy "
            f"{fit['product']['accuracy']:.4f}; image alone {fit['image']['accuracy']:.4f}, text alone "
            f"{fit['text']['accuracy']:.4f}{probe_alone})"
        )
    if late and "folds" in late:
        acc = late["oof_accuracy"]
        print(
            f"  stack: meta-classifier on {late['folds']}-fold out-of-fold probabilities of the training rows (image "
            f"{acc['image']:.4f}, text {acc['text']:.4f} out of fold)"
        )
    train = c.get("train", {})
    if train.get("strategy", "default") != "default":
        batch, replicas = train["batch_size"], c["replicas"]
        print(
            f"  {train['strategy']} strategy: {replicas} replica(s), global batch {batch} ({batch // replicas} per replica)"
        )
    for name, m in run.metrics.items():
        print(
            f"  {name:5s} accuracy {m['accuracy']:.4f}  top-3 {m['top3_accuracy']:.4f}  weighted F1 "
            f"{m['weighted_f1']:.4f}  macro F1 {m['macro_f1']:.4f}  (n={m['n']})"
        )
        if "levels" in m:
            print_levels(m)
    if run.hierarchy is not None and run.hierarchy.conflicts:
        print(
            f"  hierarchy: {len(run.hierarchy.conflicts)} label(s) had several parents; each kept its most frequent "
            f"(listed in {run.path / 'hierarchy.json'})"
        )
    weights = c["extraction"]["settings"].get("weights")
    if weights == "random (fallback)":
        print(
            "  NOTE: the image embeddings came from RANDOM backbone weights (the demo's fallback when ImageNet "
            "weights cannot be downloaded): these figures say nothing about ImageNet features"
        )
    if s["too_small_for_split"]:
        small = ", ".join(f"{d['label']} ({d['items']})" for d in s["too_small_for_split"])
        print(f"  classes too small to split (kept in train only): {small}")
    if s.get("unlabelled_rows"):
        n, col = s["unlabelled_rows"], c["label_col"]
        print(f"  rows with an empty {col!r} label (unlabelled, left out of every split): {n}")
    if s["unseen_labels_excluded"]:
        print(f"  val/test items whose label never occurs in train (not scored): {s['unseen_labels_excluded']}")
    print(f"  run folder: {run.path}")
