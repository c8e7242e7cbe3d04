"""Retrieval quality on the shared data: similar-item precision@10 (the label as relevance) in the image, text and
fused spaces, and text<->image Recall@1/5/10 and MRR of the joint space next to scikit-learn CCA and chance.

Fashion (`article_type`): queries are the test split, the neighbours come from the train split. Grocery (fine
`label`): queries are val.csv, neighbours train.csv. The fused space is the default (product) model trained on the
train rows (`--fashion-run` / `--grocery-run` reuse existing runs); the joint space an align run trained on the
fashion train split (validation: its val split), scored on the test split, which it never saw.

    python benchmarks/retrieval_quality.py            # ~8 minutes on 2 cores (two trainings, align, CCA)

Needs the cached shards of the accuracy tests (~/.cache/prodfuse/test-embeddings; `pytest tests/test_accuracy.py`
makes them). The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CACHE = Path(os.environ.get("PRODFUSE_CACHE", Path.home() / ".cache" / "prodfuse")) / "test-embeddings"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train_run(emb: Path, out: Path, test_emb: Path | None = None) -> str:
    import prodfuse

    cfg = prodfuse.TrainConfig(
        embeddings=str(emb),
        test_embeddings=str(test_emb) if test_emb else None,
        out=str(out),
        epochs=40,
        patience=8,
        verbose=0,
        overwrite=True,
    )
    return str(prodfuse.train(cfg).path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--fashion-run",
        default=None,
        help="a run trained on the fashion shards (else the default model is trained here)",
    )
    ap.add_argument(
        "--grocery-run",
        default=None,
        help="a run trained on grocery train.csv (else the default model is trained here)",
    )
    ap.add_argument("--out", default=None, help="folder for the runs (default: a temporary folder)")
    args = ap.parse_args()

    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    from prodfuse.data import shards
    from prodfuse.retrieval.align import align, chance_metrics, embed_side, retrieval_metrics
    from prodfuse.retrieval.config import AlignConfig
    from prodfuse.retrieval.quality import cca_projections, precision_by_space

    fashion = CACHE / "fashion-mnv2-128-minilm-tfidf"
    g_train, g_val = CACHE / "grocery-train-mnv2-ppocrv6-minilm-tfidf", CACHE / "grocery-val-mnv2-ppocrv6-minilm-tfidf"
    for f in (fashion, g_train, g_val):
        shards.read_manifest(f)  # a clear error when the accuracy tests' shards are missing
    tmp = Path(args.out or tempfile.mkdtemp(prefix="retrieval-quality-"))
    result = {}

    t = time.perf_counter()
    fashion_run = args.fashion_run or train_run(fashion, tmp / "fashion-product")
    grocery_run = args.grocery_run or train_run(g_train, tmp / "grocery-product", g_val)
    result["train_seconds"] = round(time.perf_counter() - t, 1)

    split = shards.read_shards(fashion, ["split"])["split"].astype(str)
    f_train, f_test = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    result["fashion_precision@10"] = precision_by_space(fashion, f_train, fashion, f_test, fashion_run, "article_type")
    log(f"fashion precision@10: {result['fashion_precision@10']}")
    result["grocery_precision@10"] = precision_by_space(g_train, None, g_val, None, grocery_run, "label")
    log(f"grocery precision@10: {result['grocery_precision@10']}")

    # joint space: align on the train split (early stopping on val), scored on test
    t = time.perf_counter()
    a = align(AlignConfig(embeddings=str(fashion), out=str(tmp / "fashion-align"), overwrite=True, verbose=0))
    align_s = time.perf_counter() - t
    import keras

    towers = keras.models.load_model(tmp / "fashion-align" / "model.keras", compile=False)
    d = shards.read_shards(fashion, ["image_embedding", "text_embedding", "has_text", "split"])
    ok = np.asarray(d["has_text"], bool)
    test = ok & (d["split"].astype(str) == "test")
    train = ok & (d["split"].astype(str) == "train")
    zi = embed_side(towers, "image", d["image_embedding"][test])
    zt = embed_side(towers, "text", d["text_embedding"][test])
    t = time.perf_counter()
    cca_image, cca_text = cca_projections(d["image_embedding"][train], d["text_embedding"][train])
    cca_s = time.perf_counter() - t
    ci, ct = cca_image(d["image_embedding"][test]), cca_text(d["text_embedding"][test])
    result["fashion_joint_test"] = {
        "items": int(test.sum()),
        "joint": {"text_to_image": retrieval_metrics(zt, zi), "image_to_text": retrieval_metrics(zi, zt)},
        "cca": {"text_to_image": retrieval_metrics(ct, ci), "image_to_text": retrieval_metrics(ci, ct)},
        "chance": chance_metrics(int(test.sum())),
        "align_seconds": round(align_s, 1),
        "align_epochs": a["epochs_run"],
        "temperature": round(a["temperature"], 4),
        "cca_seconds": round(cca_s, 1),
    }
    log(f"fashion joint (test): {json.dumps(result['fashion_joint_test'])}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
