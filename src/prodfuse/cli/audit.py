"""`prodfuse audit`: near-duplicate listings within a catalog or between two (train/test leakage); with `--labels`,
the likely mislabelled products."""

from __future__ import annotations

import argparse

from prodfuse.cli.common import ConfigError, check_shard_folders, default, make_config
from prodfuse.evaluation.config import LABEL_AUDIT_MODELS, AuditLabelsConfig
from prodfuse.retrieval.config import AuditConfig

HELP = "near-duplicate pairs and groups within shards, or between two shard folders; likely mislabelled rows"
# flags of the label audit alone: None unless given, so a duplicate audit can refuse them
LABEL_FLAGS = ("label_col", "folds", "model", "top", "epochs", "patience", "batch_size")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embeddings", required=True, help="shard folder to audit")
    p.add_argument("--against", default=None, help="a second shard folder (e.g. train, when --embeddings is test)")
    p.add_argument(
        "--threshold",
        type=float,
        default=default(AuditConfig, "threshold"),
        help="image cosine at or above which two items pair (default 0.95)",
    )
    p.add_argument("--text-threshold", type=float, default=None, help="also require this text cosine")
    p.add_argument(
        "--out",
        default=None,
        help="folder for pairs.csv, groups.csv, summary.json (required); with --labels for label_issues.csv, "
        "label_issues_summary.csv, label_issues.html, label_audit.json, pred_probs.npz (default audit)",
    )
    g = p.add_argument_group("mislabelled products (--labels)")
    g.add_argument(
        "--labels",
        action="store_true",
        help="list likely mislabelled rows instead of near duplicates: out-of-fold probabilities, then cleanlab's "
        "confident learning",
    )
    g.add_argument("--label-col", default=None, help="label column to audit (default: the one recorded at extraction)")
    g.add_argument(
        "--folds",
        type=int,
        default=None,
        help=f"stratified folds; each row is scored by a model trained without it (default "
        f"{default(AuditLabelsConfig, 'folds')}, at least 3); classes with fewer items are left out and listed",
    )
    g.add_argument(
        "--model",
        default=None,
        choices=LABEL_AUDIT_MODELS,
        help="default: train's default model, one run per fold; lr: the linear probe on [L2(image); text], "
        "minutes instead of hours; image, text: the default model's single streams (default default)",
    )
    g.add_argument(
        "--top",
        type=int,
        default=None,
        help=f"suspects shown in label_issues.html (default {default(AuditLabelsConfig, 'top')})",
    )
    for flag, what in (
        ("--epochs", "at most this many epochs per fold"),
        ("--patience", "early stopping's patience"),
        ("--batch-size", "batch size"),
    ):
        field = flag[2:].replace("-", "_")
        g.add_argument(
            flag, type=int, default=None, help=f"trained models: {what} (default {default(AuditLabelsConfig, field)})"
        )


def config(args: argparse.Namespace) -> AuditConfig | AuditLabelsConfig:
    given = {k: getattr(args, k) for k in LABEL_FLAGS if getattr(args, k) is not None}
    if args.labels:
        if args.against or args.text_threshold is not None:
            raise ConfigError(
                "--against and --text-threshold belong to the near-duplicate audit; drop them or --labels"
            )
        unset = {k: default(AuditLabelsConfig, k) for k in LABEL_FLAGS if k not in given}
        return make_config(AuditLabelsConfig, args, **unset, **given, out=args.out or default(AuditLabelsConfig, "out"))
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ConfigError(f"{flags} only apply to the label audit: add --labels, or drop them")
    if not args.out:
        raise ConfigError("--out is required for the near-duplicate audit (a folder for pairs.csv, groups.csv)")
    return make_config(AuditConfig, args)


def check(cfg: AuditConfig | AuditLabelsConfig) -> None:
    """The shard folders (and the label column), before TensorFlow loads."""
    if isinstance(cfg, AuditLabelsConfig):
        from prodfuse.evaluation.label_audit import check_label_audit

        check_shard_folders(embeddings=cfg.embeddings)
        check_label_audit(cfg)
        return
    check_shard_folders(embeddings=cfg.embeddings, against=cfg.against)


def run(cfg: AuditConfig | AuditLabelsConfig, stop=None) -> int:
    if isinstance(cfg, AuditLabelsConfig):
        return run_labels(cfg)
    from prodfuse.retrieval.duplicates import audit

    s = audit(cfg)
    where = f"{s['items']} items against {s['against_items']}" if s["against"] else f"{s['items']} items"
    print(
        f"\naudited {where}: {s['pairs']} near-duplicate pairs (image cosine >= {s['threshold']}"
        + (f", text >= {s['text_threshold']}" if s["text_threshold"] is not None else "")
        + f") in {s['groups']} groups"
    )
    if s.get("pairs_with_different_labels") is not None:
        print(f"  pairs whose labels differ: {s['pairs_with_different_labels']}")
    if s["against"]:
        print(f"  items with a near duplicate in {s['against']}: {s['items_with_a_duplicate_in_against']}")
    print(f"  {s['out']}/pairs.csv, groups.csv, summary.json")
    return 0


def run_labels(cfg: AuditLabelsConfig) -> int:
    import tensorflow as tf

    from prodfuse.evaluation.label_audit import audit_labels

    tf.config.experimental.enable_op_determinism()  # repeatable fold runs for a seed, as train and compare have them
    s = audit_labels(cfg)
    print(
        f"\naudited {s['audited_rows']} of {s['rows']} rows of {s['label_col']!r} ({s['classes']} classes, "
        f"{s['model']} model, {s['folds']} folds, out-of-fold accuracy {s['out_of_fold_accuracy']:.4f}): "
        f"{s['issues']} likely mislabelled"
    )
    if s.get("unlabelled_rows"):
        print(
            f"  rows with an empty {s['label_col']!r} label (unlabelled, in no fold, not audited): {s['unlabelled_rows']}"
        )
    for pair in s["pairs"]:
        print(f"  {pair['count']:5d}  {pair['given_label']} -> {pair['suggested_label']}")
    left = s["left_out"]
    if left["classes"]:
        shown = ", ".join(f"{c} ({n})" for c, n in list(left["classes"].items())[:10])
        more = f" and {len(left['classes']) - 10} more" if len(left["classes"]) > 10 else ""
        print(f"  left out (fewer than {s['folds']} items, not ranked; check by hand): {shown}{more}")
    print(f"  {s['out']}/label_issues.csv, label_issues_summary.csv, label_issues.html (top {s['in_html']})")
    return 0
