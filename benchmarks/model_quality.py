"""Model quality against the baselines a reviewer tries first, on the shared fashion and grocery data.

    python benchmarks/model_quality.py [--seeds 3] [--datasets grocery,fashion,fashion_columns] [--models ...] [--out DIR]

For each data set it extracts the shards once (cached like the accuracy tests' shards, under
~/.cache/prodfuse/test-embeddings or $PRODFUSE_CACHE), then runs `prodfuse compare --seeds N`: the default fused
model (the product of image, text and linear-probe experts), the previous one (the two streams' product), each
stream's own model inside the product run, and the linear probes (logistic regression on image, text and both),
every one on the same splits, as mean ± std over the seeds; `--models` adds any other `compare` row (stack, joint,
gated, ...).
- fashion: `article_type` (135 classes), MobileNetV2 @ 128 px, titles, no OCR; the catalog's split column
  (test: 1,484 items). Seeds vary the models' initialisation; the probes are deterministic (std 0).
- fashion_columns: the same products with the title and four other catalog columns (gender, base colour, season,
  usage) joined into the text: a stand-in for a longer listing.
- grocery: fine `label` (81 classes), MobileNetV2 @ 224 px with its default views, RapidOCR text; trained on
  train.csv (90/10 train/val by seed, so seeds also vary the split), scored on val.csv (296 photos), which
  training never sees.

Prints each table, then as its last line one JSON object with every row's mean and std.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402

import prodfuse  # noqa: E402
from prodfuse.modeling.config import TrainConfig  # noqa: E402

# the default fusion, the previous one, and the probes (each stream's own model comes with the product's run)
DEFAULT_MODELS = "product,product_no_probe,lr_image,lr_text,lr_concat"


def product_streams(summary: dict) -> dict[str, list[float]]:
    """Accuracy of each product run's own single-stream models (trained alone inside it), per repetition, as its
    metrics.json records them: {"product.image": [...], "product.text": [...]} on the scored split."""
    out: dict[str, list[float]] = {}
    for rep in summary["per_repetition"]:
        for row in rep["rows"]:
            if row["model"] != "product":
                continue
            metrics = json.loads((Path(row["run"]) / "metrics.json").read_text())
            for stream, by_split in metrics.get("streams", {}).items():
                if isinstance(by_split, dict) and summary["split"] in by_split:
                    out.setdefault(f"product.{stream}", []).append(round(by_split[summary["split"]]["accuracy"], 4))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--datasets", default="grocery,fashion")
    ap.add_argument("--models", default=DEFAULT_MODELS)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay, help="as train's --weight-decay")
    ap.add_argument("--monitor", default=TrainConfig.monitor, help="as train's --monitor")
    ap.add_argument("--out", default=None, help="compare folders (default: a temporary folder)")
    args = ap.parse_args()

    import logging
    import tempfile

    prodfuse.keep_freed_heap_mapped()  # before TensorFlow starts its threads
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()  # repeatable per seed, as the CLI runs it
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # compare's progress lines

    from test_accuracy import fashion_columns_shards, fashion_shards, grocery_shards

    out = Path(args.out or tempfile.mkdtemp(prefix="model-quality-"))
    figures = {}
    for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        t0 = time.perf_counter()
        if name == "fashion":
            data = {"embeddings": str(fashion_shards()), "label_col": "article_type", "batch_size": 128}
        elif name == "fashion_columns":
            data = {"embeddings": str(fashion_columns_shards()), "label_col": "article_type", "batch_size": 128}
        elif name == "grocery":
            train_emb, val_emb = grocery_shards()
            data = {"embeddings": str(train_emb), "test_embeddings": str(val_emb)}
        else:
            raise SystemExit(f"unknown data set {name!r}; choose from fashion, fashion_columns, grocery")
        config = prodfuse.CompareConfig(
            **data,
            seeds=args.seeds,
            models=args.models,
            epochs=args.epochs,
            patience=args.patience,
            weight_decay=args.weight_decay,
            monitor=args.monitor,
            out=str(out / name),
            overwrite=True,
        )
        summary = prodfuse.compare(config)
        print(summary["markdown"], flush=True)
        streams = product_streams(summary)
        for row, values in streams.items():
            print(f"{row}: {np.mean(values):.4f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.4f} {values}")
        figures[name] = {
            "split": summary["split"],
            "n": summary["rows"][0]["n"],
            "repeated_over": summary["repeated_over"],
            "seconds": round(time.perf_counter() - t0),
            "rows": {
                r["model"]: {
                    "accuracy": round(r["accuracy"], 4),
                    "accuracy_std": round(r.get("accuracy_std", 0.0), 4),
                    "macro_f1": round(r["macro_f1"], 4),
                }
                for r in summary["rows"]
            }
            | {
                row: {"accuracy": round(float(np.mean(v)), 4), "accuracy_std": round(float(np.std(v, ddof=1)), 4)}
                for row, v in streams.items()
                if len(v) > 1
            },
        }
        print(flush=True)
    print(json.dumps({"benchmark": "model_quality", "cpu_count": os.cpu_count(), "datasets": figures}))


if __name__ == "__main__":
    main()
