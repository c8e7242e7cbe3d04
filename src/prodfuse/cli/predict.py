"""`prodfuse predict`: top-k labels for a new catalog or shard folder, a loop over a Predictor."""

from __future__ import annotations

import argparse

from prodfuse.cli.common import add_column_args, default, make_config
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
    p.add_argument("--batch-size", type=int, default=default(PredictConfig, "batch_size"), help="items per model batch")
    p.add_argument("--ocr-workers", type=int, default=None, help="OCR processes (default: in-process)")
    p.add_argument("--ocr-cache", default=None, help="OCR cache folder (default ~/.cache/prodfuse/ocr)")
    add_column_args(p, text_default=None, split=False)


def config(args: argparse.Namespace) -> PredictConfig:
    return make_config(PredictConfig, args, progress=args.progress_ok)


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
        rej = ", ".join(f"{k} {v}" for k, v in sorted(s["rejected_by_reason"].items())) or "none"
        print(f"  rejected (not embeddable): {s['rejected']} ({rej}); see {s['rejects']}")
    if "accuracy_known_labels" in s:
        print(
            f"  top-1 accuracy on the {s['n_known_labels']} items with a known label: {s['accuracy_known_labels']:.4f}"
        )
    return 0
