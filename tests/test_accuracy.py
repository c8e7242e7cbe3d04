"""Accuracy floors on real data (../shared/data): the pipeline end to end, thresholds cleared with margin.

Shards are cached outside the clone (~/.cache/prodfuse/test-embeddings, or $PRODFUSE_CACHE), like the OCR cache,
so a second run only trains: extraction resumes to a no-op when settings and catalog are unchanged.
"""
import json
import os
from pathlib import Path

import pandas as pd
import pytest

from prodfuse import shards
from prodfuse.cli import build_parser, main
from prodfuse.extract import run_extract
from prodfuse.train import run_train

from conftest import MOBILENET_WEIGHTS, SHARED

pytestmark = [pytest.mark.realdata,
              pytest.mark.skipif(not MOBILENET_WEIGHTS.is_file(), reason="../shared data and models not present")]
CACHE = Path(os.environ.get("PRODFUSE_CACHE", Path.home() / ".cache" / "prodfuse")) / "test-embeddings"
MOBILENET = ["--backbone", "mobilenet_v2", "--weights", str(MOBILENET_WEIGHTS)]
TRAIN = ["--epochs", "40", "--patience", "8", "--quiet"]


def extract_cached(name: str, catalog: Path, *flags: str) -> Path:
    out = CACHE / name
    args = build_parser().parse_args(["extract", "--catalog", str(catalog), "--out", str(out), "--overwrite",
                                      "--no-progress", *flags])
    summary = run_extract(args)
    assert summary["embedded_rows"] + summary["rejected_rows"] == summary["input_rows"]
    return out


def fashion_shards() -> Path:
    """Fashion, 135 article types: titles + MobileNetV2 @ 128 px (the photos are 60x80), no OCR."""
    return extract_cached("fashion-mnv2-128", SHARED / "data" / "fashion" / "catalog.csv", *MOBILENET,
                          "--image-size", "128", "--ocr", "none", "--text-cols", "title", "--label-col", "article_type")


def grocery_shards() -> tuple[Path, Path]:
    """Grocery train.csv and val.csv (embedded --like train): MobileNetV2 @ 224 px, default views, RapidOCR text."""
    grocery = SHARED / "data" / "grocery"
    train_emb = extract_cached("grocery-train-mnv2-rapidocr", grocery / "train.csv", *MOBILENET, "--ocr", "rapidocr",
                               "--text-cols", "")
    return train_emb, extract_cached("grocery-val-mnv2-rapidocr", grocery / "val.csv", "--like", str(train_emb))


def train(emb: Path, out: Path, *flags: str) -> dict:
    return run_train(build_parser().parse_args(["train", "--embeddings", str(emb), "--out", str(out), *TRAIN, *flags]))


def evaluate(run: str, emb: Path, out: Path) -> dict:
    assert main(["evaluate", "--run", run, "--embeddings", str(emb), "--group-col", "group", "--out", str(out)]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_fashion_article_type_fusion(tmp_path):
    """135 classes, title + image (no OCR: clothes carry little text). Test split of the catalog's split column."""
    emb = extract_cached("fashion-mnv2-128", SHARED / "data" / "fashion" / "catalog.csv", *MOBILENET,
                         "--image-size", "128", "--ocr", "none", "--text-cols", "title", "--label-col", "article_type")
    m = shards.read_manifest(emb)
    assert m["rows"] == 14999 and m["encoders"]["image"]["dim"] == 1280 and m["encoders"]["text"]["dim"] == 384
    common = ["--label-col", "article_type", "--batch-size", "128"]  # 12k rows: bigger batches, same result
    fused = train(emb, tmp_path / "gated", *common, "--fusion", "gated")["metrics"]["test"]["accuracy"]
    image = train(emb, tmp_path / "image", *common, "--text-branch", "none")["metrics"]["test"]["accuracy"]
    text = train(emb, tmp_path / "text", *common, "--image-branch", "none")["metrics"]["test"]["accuracy"]
    print(f"fashion article_type test accuracy: gated {fused:.4f}, image-only {image:.4f}, text-only {text:.4f}")
    assert fused >= 0.93
    assert fused >= max(image, text) - 0.005


def test_grocery_fine_label_fusion_with_ocr(tmp_path):
    """81 fine classes, image + RapidOCR text. Trained on train.csv (early-stopped on a stratified part of it),
    scored on val.csv, which training never sees."""
    grocery = SHARED / "data" / "grocery"
    train_emb = extract_cached("grocery-train-mnv2-rapidocr", grocery / "train.csv", *MOBILENET, "--ocr", "rapidocr",
                               "--text-cols", "")
    val_emb = extract_cached("grocery-val-mnv2-rapidocr", grocery / "val.csv", "--like", str(train_emb))
    # the extraction integration check: rows, dims, and OCR words on the packaged products' photos
    val = shards.read_shards(val_emb, ["product_id", "group", "ocr_text", "image_embedding", "text_embedding"])
    assert len(val["product_id"]) == len(pd.read_csv(grocery / "val.csv")) == 296
    assert val["image_embedding"].shape == (296, 1280) and val["text_embedding"].shape == (296, 384)
    packages = val["group"] == "Packages"
    with_words = (pd.Series(val["ocr_text"][packages]).str.len() > 0).mean()
    assert with_words >= 0.80, with_words

    # Staged: the image branch learns first, then the (noisy, often empty) OCR text is fused in at a lower rate;
    # on this data it is the steadiest of the fusions (README, "Results on real data").
    fused_run = train(train_emb, tmp_path / "gated", "--fusion", "gated", "--staged")["run"]
    image_run = train(train_emb, tmp_path / "image", "--text-branch", "none")["run"]
    fused = evaluate(fused_run, val_emb, tmp_path / "eval-gated")
    image = evaluate(image_run, val_emb, tmp_path / "eval-image")
    print(f"grocery val accuracy: gated {fused['accuracy']:.4f} (Packages {fused['per_group']['Packages']['accuracy']:.4f}),"
          f" image-only {image['accuracy']:.4f} (Packages {image['per_group']['Packages']['accuracy']:.4f}); "
          f"OCR words on {with_words:.0%} of Packages photos")
    assert fused["n"] == 296
    assert fused["accuracy"] >= 0.68
    assert fused["per_group"]["Packages"]["accuracy"] > image["per_group"]["Packages"]["accuracy"]
