"""`prodfuse evaluate`: metrics, ablation and calibration of a run."""

from __future__ import annotations

import argparse
from pathlib import Path

from prodfuse.cli.common import check_shard_folders, default, make_config
from prodfuse.evaluation.config import SPLITS, EvaluateConfig

HELP = "metrics, ablation and calibration of a run"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run folder written by train")
    p.add_argument(
        "--embeddings", default=None, help="shard folder to score (default: the run's training shards, held-out rows)"
    )
    p.add_argument(
        "--split",
        default=None,
        choices=SPLITS,
        help="rows to score (default: test, or val when the run has no test split, on the run's own "
        "shards; all rows of any other folder)",
    )
    p.add_argument("--group-col", default=None, help="shard column to break the results down by (e.g. group)")
    p.add_argument("--out", default=None, help="output folder (default <run>/eval-<split>)")
    p.add_argument(
        "--top-confusions",
        type=int,
        default=default(EvaluateConfig, "top_confusions"),
        help="confusions listed in the table, 0..10000 (default 20)",
    )
    p.add_argument(
        "--batch-size", type=int, default=default(EvaluateConfig, "batch_size"), help="items per model batch"
    )
    p.add_argument(
        "--exclude-duplicates-of",
        default=None,
        metavar="TRAIN_SHARDS",
        help="also report the figures on the items with no near-duplicate photo in these shards (the run's own "
        "training shards: its train rows)",
    )
    p.add_argument(
        "--duplicate-threshold",
        type=float,
        default=default(EvaluateConfig, "duplicate_threshold"),
        help="image cosine at or above which two photos are near duplicates (default 0.95)",
    )


def config(args: argparse.Namespace) -> EvaluateConfig:
    return make_config(EvaluateConfig, args)


def check(cfg: EvaluateConfig) -> None:
    """The run folder and shard folders, from file listings and JSON: before TensorFlow loads."""
    from prodfuse.modeling.run import read_run_config

    read_run_config(cfg.run)
    check_shard_folders(embeddings=cfg.embeddings, exclude_duplicates_of=cfg.exclude_duplicates_of)


def run(cfg: EvaluateConfig, stop=None) -> int:
    from prodfuse.evaluation.evaluate import evaluate

    print_summary(evaluate(cfg))
    return 0


def print_summary(r: dict) -> None:
    out_dir = Path(r["out"])
    print(f"\nevaluated {r['model']} on {r['n']} items ({r['rows']})")
    print(
        f"  accuracy {r['accuracy']:.4f}  top-3 {r['top3_accuracy']:.4f}  top-5 {r['top5_accuracy']:.4f}  "
        f"weighted F1 {r['weighted_f1']:.4f}  macro F1 {r['macro_f1']:.4f}"
    )
    if r.get("levels"):
        from prodfuse.cli.train import print_levels

        print_levels(r)
    kept = r["calibration"].get("val_kept_t1")
    if kept:
        print(f"  ECE {r['ece']:.4f}; temperature kept at 1: {kept}")
    else:
        print(
            f"  ECE {r['ece']:.4f} -> {r['ece_calibrated']:.4f} with temperature {r['temperature']:.4g} "
            f"(fitted on val, saved in the run folder)"
        )
    ab = r["ablation"]
    parts = [
        f"{name} {ab[key]['accuracy']:.4f}"
        for name, key in (("both", "both"), ("image zeroed", "no_image"), ("text zeroed", "no_text"))
        if ab[key]
    ]
    print(
        "  ablation accuracy: "
        + ", ".join(parts)
        + (f"; mean gate {ab['gate_mean']:.3f}" if ab.get("gate_mean") is not None else "")
    )
    for g, m in r["per_group"].items():
        print(f"  {r['group_col']}={g}: accuracy {m['accuracy']:.4f}  weighted F1 {m['weighted_f1']:.4f}  (n={m['n']})")
    wd = r.get("without_duplicates")
    if wd:
        line = f"accuracy {wd['accuracy']:.4f}  weighted F1 {wd['weighted_f1']:.4f}" if wd["n"] else "no item left"
        print(
            f"  without the {wd['duplicates']} items that have a near duplicate (cosine >= {wd['threshold']}) in "
            f"{wd['against']}: {line}  (n={wd['n']})"
        )
    if r["unknown_label_rows"]:
        print(f"  {r['unknown_label_rows']} rows have labels the run never saw (not scored): {r['unknown_labels']}")
    if r.get("unlabelled_rows"):
        print(f"  {r['unlabelled_rows']} rows have an empty label (unlabelled, not scored)")
    if r.get("note"):
        print(f"  NOTE: {r['note']}")
    print(f"  report: {out_dir / 'report.md'}")
