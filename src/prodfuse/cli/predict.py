"""`prodfuse predict`: top-k labels for a new catalog or shard folder, a loop over a Predictor."""

from __future__ import annotations

import argparse

from prodfuse.cli.common import add_column_args, add_trust_pickle, default, make_config
from prodfuse.inference.config import PredictConfig

HELP = "top-k labels for a new catalog or shards"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run folder written by train")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--catalog", help="new catalog (CSV/TSV/parquet/JSONL): embedded like the run's training data")
    src.add_argument("--embeddings", help="shard folder already embedded like the run's training data")
    p.add_argument(
        "--out",
        required=True,
        help="predictions CSV to write; rows that cannot be embedded go to <out stem>_rejects.csv",
    )
    p.add_argument("--top-k", type=int, default=default(PredictConfig, "top_k"), help="labels per item (default 3)")
    p.add_argument(
        "--min-confidence",
        type=float,
        default=None,
        metavar="P",
        help="a run trained with --label-cols: each item's path (pred_LEVEL, prob_LEVEL columns) stops at the "
        "deepest level whose probability is at least P, in (0, 1] (default: every level)",
    )
    p.add_argument("--batch-size", type=int, default=default(PredictConfig, "batch_size"), help="items per model batch")
    p.add_argument("--ocr-workers", type=int, default=None, help="OCR processes (default: in-process)")
    p.add_argument("--ocr-cache", default=None, help="OCR cache folder (default ~/.cache/prodfuse/ocr)")
    add_column_args(
        p,
        split=False,
        inherit_label="the run's when the catalog has it",
        text_help="the catalog's text columns, mapped in order onto the run's (e.g. name for a run trained on "
        "title,description feeds name to title); default: the run's own names",
    )
    p.add_argument(
        "--column",
        dest="column_map",
        action="append",
        default=[],
        metavar="RUN_COLUMN=CATALOG_COLUMN",
        help="feed a catalog column to one of the run's text columns by name, e.g. --column title=name (repeatable)",
    )
    p.add_argument(
        "--allow-missing-text",
        action="store_true",
        help="predict even when the catalog has none of the run's text columns (from the photo alone)",
    )
    add_trust_pickle(p)


def config(args: argparse.Namespace) -> PredictConfig:
    return make_config(PredictConfig, args, progress=args.progress_ok, column_map=tuple(args.column_map))


def check(cfg: PredictConfig) -> None:
    """Run folder, catalog columns and shard folder, from headers and config.json: before TensorFlow loads."""
    from prodfuse.inference.predict import check_inputs

    check_inputs(cfg)


def run(cfg: PredictConfig, stop=None) -> int:
    import logging

    from prodfuse.inference.batch import predict

    log = logging.getLogger("prodfuse.cli")
    s = predict(cfg, on_batch=lambda done, total: log.info("predicted %d/%d rows", done, total))
    print(f"\npredicted {s['n']} items with {s['model']} -> {s['predictions']}")
    if s["calibrated"]:
        print(f"  probabilities calibrated with temperature {s['temperature']:.4g} from the run folder")
    else:
        print(f"  probabilities NOT calibrated (T=1): run `prodfuse evaluate --run {s['run']}` to fit a temperature")
    if cfg.catalog:
        mapped = ", ".join(
            (f"{r} <- {c}" if c != r else r) if c else f"{r} (absent)" for r, c in s["text_columns"].items()
        )
        if mapped:
            print(f"  text columns: {mapped}; {s['rows_with_text']} of {s['input_rows']} rows have text")
        rej = ", ".join(f"{k} {v}" for k, v in sorted(s["rejected_by_reason"].items())) or "none"
        print(f"  rejected (not embeddable): {s['rejected']} ({rej}); see {s['rejects']}")
    if "hierarchy" in s:
        h = s["hierarchy"]
        at = ", ".join(f"{level} {n}" for level, n in h["answered_at"].items())
        how = f"min confidence {h['min_confidence']}" if h["min_confidence"] is not None else "no min confidence"
        print(f"  levels {' > '.join(h['levels'])}; deepest level answered ({how}): {at}")
    if cfg.catalog and not s["label_col"]:
        print("  no label column in the catalog: no accuracy (pass --label-col NAME if it has one)")
    if "accuracy_known_labels" in s:
        print(
            f"  top-1 accuracy on the {s['n_known_labels']} items with a known label: {s['accuracy_known_labels']:.4f}"
        )
    return 0
