"""Accuracy floors on real data (../shared/data): the pipeline end to end, thresholds cleared with margin.

Shards are cached outside the clone (~/.cache/prodfuse/test-embeddings, or $PRODFUSE_CACHE), like the OCR cache,
so a second run only trains: extraction resumes to a no-op when settings and catalog are unchanged.
"""

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import prodfuse
from conftest import MOBILENET_WEIGHTS, SHARED
from prodfuse.cli import main
from prodfuse.data import shards

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not MOBILENET_WEIGHTS.is_file(), reason="../shared data and models not present"),
]
CACHE = Path(os.environ.get("PRODFUSE_CACHE", Path.home() / ".cache" / "prodfuse")) / "test-embeddings"
MOBILENET = {"backbone": "mobilenet_v2", "weights": str(MOBILENET_WEIGHTS)}
# Fashion: 25 epochs (the benchmark's 60 cost the suite minutes; at seed 42 its models read as well at 25).
# Grocery: the benchmark's 60 epochs, patience 10: its image model is still learning at 25 (seed 42: 0.804 at 25
# epochs, below its linear probe's 0.811; 0.838 at 60), and its 2,640 rows train in ~2 minutes.
TRAIN = {"epochs": 25, "patience": 8}
TRAIN_GROCERY = {"epochs": 60, "patience": 10}


@pytest.fixture(autouse=True, scope="module")
def op_determinism():
    """Repeatable training for a seed, as the CLI has it: the floors below are for seed 42 (without this switch the
    grocery fused model's seed-42 run read 0.706 once, against 0.747 with it)."""
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()


def extract_cached(name: str, catalog: Path, **settings) -> Path:
    """The cached shards, extracted under a file lock: pytest-xdist workers (tests/test_ray_extract.py reads these
    too) take turns, and the second one's extraction resumes to a no-op."""
    import fcntl

    out = CACHE / name
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        summary = prodfuse.extract(
            prodfuse.ExtractConfig(catalog=str(catalog), out=str(out), overwrite=True, progress=False, **settings)
        )
    assert summary["embedded_rows"] + summary["rejected_rows"] == summary["input_rows"]
    return out


def _fashion(name: str, text_cols: str) -> Path:
    return extract_cached(
        name,
        SHARED / "data" / "fashion" / "catalog.csv",
        **MOBILENET,
        image_size=128,
        ocr="none",
        text_cols=text_cols,
        label_col="article_type",
    )


def fashion_shards() -> Path:
    """Fashion, 135 article types: titles (the default text encoder: MiniLM and TF-IDF side by side) + MobileNetV2
    @ 128 px (the photos are 60x80), no OCR."""
    return _fashion("fashion-mnv2-128-minilm-tfidf", "title")


def fashion_columns_shards() -> Path:
    """Fashion as fashion_shards, with the title and four other catalog columns joined into the text: a stand-in for
    a longer listing (the benchmarks' "fashion titles + columns")."""
    return _fashion("fashion-mnv2-128-minilm-tfidf-columns", "title,gender,base_colour,season,usage")


def grocery_shards() -> tuple[Path, Path]:
    """Grocery train.csv and val.csv (embedded --like train): MobileNetV2 @ 224 px, default views, PP-OCRv6 text
    through the default text encoder."""
    grocery = SHARED / "data" / "grocery"
    train_emb = extract_cached(
        "grocery-train-mnv2-ppocrv6-minilm-tfidf", grocery / "train.csv", **MOBILENET, ocr="rapidocr", text_cols=""
    )
    return train_emb, extract_cached("grocery-val-mnv2-ppocrv6-minilm-tfidf", grocery / "val.csv", like=str(train_emb))


def compare(out: Path, train=TRAIN, **settings) -> dict:
    """`prodfuse compare` on the default models and the linear probes; {model: row of the table}."""
    # The probes are deterministic: their results are kept beside the cached shards, so warm runs skip the fits.
    config = prodfuse.CompareConfig(**settings, **train, out=str(out), probe_cache=str(CACHE / "probes"))
    summary = prodfuse.compare(config)
    return {r["model"]: r for r in summary["rows"]}


def sub_model_accuracy(run: str, stream: str, emb: Path, split: str | None, per_item: bool = False):
    """Accuracy of a product run's own single-stream model (the same training as `--image-branch none` or
    `--text-branch none`) on `emb` (only its `split` rows when given), views averaged as prediction does."""
    from prodfuse.data.sequence import read_items
    from prodfuse.modeling.probabilities import STREAMS, predict_arrays, product_parts

    loaded = prodfuse.Run.load(run)
    image_model, text_model, _ = product_parts(loaded.model)
    model = image_model if stream == "image" else text_model
    label_col = loaded.config["label_col"]
    columns = [label_col] + (["split"] if split else [])
    data = read_items(emb, [k for k in loaded.inputs if k in STREAMS[stream]], columns)
    keep = np.ones(len(data[label_col]), bool) if split is None else data["split"].astype(str) == split
    labels = {c: i for i, c in enumerate(loaded.classes)}
    y = np.array([labels.get(str(v), -1) for v in data[label_col]])[keep]
    probs = predict_arrays(model, {k: data[k][keep] for k in loaded.inputs if k in STREAMS[stream]})
    hits = probs.argmax(1) == y
    return (float(hits.mean()), hits) if per_item else float(hits.mean())


def evaluate(run: str, emb: Path, out: Path) -> dict:
    assert main(["evaluate", "--run", run, "--embeddings", str(emb), "--group-col", "group", "--out", str(out)]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_fashion_article_type_fusion(tmp_path):
    """135 classes, title + image (no OCR: clothes carry little text). Test split of the catalog's split column.
    Titles carry most of the signal: fusion must lose nothing against text alone, and each prodfuse model must
    match the logistic regression on the same features."""
    emb = fashion_shards()
    m = shards.read_manifest(emb)
    text = m["encoders"]["text"]
    assert m["rows"] == 14999 and m["encoders"]["image"]["dim"] == 1280 and text["dim"] == 768
    assert text["parts"] == [{"kind": "minilm", "dim": 384}, {"kind": "tfidf", "dim": 384}]
    assert text["minilm"]["source"] == "package" and text["minilm"]["sha256"].startswith("53aa5117")
    assert m["encoders"]["image"]["views"] == 1  # 15k rows: above the size where --views auto embeds crops
    r = compare(
        tmp_path,
        embeddings=str(emb),
        label_col="article_type",
        batch_size=128,
        models="product,lr_text,lr_concat",  # image alone (0.83) is far below text here; grocery checks it
    )
    acc = {k: v["accuracy"] for k, v in r.items()}
    acc["text"] = sub_model_accuracy(r["product"]["run"], "text", emb, "test")  # the product's own title model
    print("fashion article_type test accuracy: " + ", ".join(f"{k} {v:.4f}" for k, v in acc.items()))
    assert r["product"]["n"] == 1484
    # Seed 42 (25 epochs, batches of 128) reads product 0.9730 (image, title and linear-probe experts), its title
    # model 0.9677, LR on the title 0.9670, on both 0.9717 (MiniLM and TF-IDF side by side). Over 3 seeds: product
    # 0.9739 ± 0.0016, title model 0.9681 ± 0.0003 (docs/reports/model-quality.md); the floors sit below them by the
    # seeds' spread.
    assert acc["product"] >= 0.968
    assert acc["product"] >= acc["text"] + 0.002  # the photo and the probe add to the title
    assert acc["product"] >= acc["lr_concat"] - 0.001  # in the mean the product is 0.2 point ahead
    assert acc["text"] >= 0.964  # the title model with MiniLM + TF-IDF
    assert acc["text"] >= acc["lr_text"] - 0.003  # the stream alone at least matches its linear probe

    # Retrieval (issue 13) on the same run: similar items of the test split among the train split, by label.
    # Measured (benchmarks/retrieval_quality.py, product run of seed 42): image 0.691, text 0.794, fused 0.963.
    from prodfuse.retrieval.quality import precision_by_space

    split = shards.read_shards(emb, ["split"])["split"].astype(str)
    train, test = (split == "train").nonzero()[0], (split == "test").nonzero()[0]
    p10 = precision_by_space(emb, train, emb, test, r["product"]["run"], "article_type")
    print(f"fashion precision@10: {p10}")
    assert p10["fused"] >= 0.92 and p10["fused"] >= max(p10["image"], p10["text"]) + 0.1
    assert p10["image"] >= 0.62 and p10["text"] >= 0.72

    # Near duplicates of train in test: the figure without them stands beside the full one.
    ev = tmp_path / "eval-dup"
    args = ["evaluate", "--run", r["product"]["run"], "--exclude-duplicates-of", str(emb), "--out", str(ev)]
    assert main(args) == 0
    m = json.loads((ev / "metrics.json").read_text())
    wd = m["without_duplicates"]
    print(
        f"fashion test: {m['accuracy']:.4f} on {m['n']}; without {wd['duplicates']} near duplicates of train "
        f"{wd['accuracy']:.4f} on {wd['n']}"
    )
    assert m["n"] == 1484 and wd["n"] + wd["duplicates"] == 1484 and wd["n"] >= 1000
    assert wd["accuracy"] >= 0.94


def test_fashion_joint_space_finds_photos_from_titles(tmp_path):
    """The align towers on the train split (validation: val), scored on the test split they never saw. Measured:
    text->image R@1 0.226, R@10 0.711, MRR 0.378; scikit-learn CCA R@10 0.261; chance 0.0067 (README)."""
    import keras

    from prodfuse.retrieval.align import align, chance_metrics, embed_side, retrieval_metrics
    from prodfuse.retrieval.config import AlignConfig

    emb = fashion_shards()
    a = align(AlignConfig(embeddings=str(emb), out=str(tmp_path / "align"), verbose=0))
    towers = keras.models.load_model(tmp_path / "align" / "model.keras", compile=False)
    d = shards.read_shards(emb, ["image_embedding", "text_embedding", "has_text", "split"])
    test = d["has_text"] & (d["split"].astype(str) == "test")
    zi, zt = (
        embed_side(towers, "image", d["image_embedding"][test]),
        embed_side(towers, "text", d["text_embedding"][test]),
    )
    t2i, i2t, chance = retrieval_metrics(zt, zi), retrieval_metrics(zi, zt), chance_metrics(int(test.sum()))
    print(f"fashion joint space, test: text->image {t2i}, image->text {i2t}; {a['epochs_run']} epochs")
    assert t2i["recall@10"] >= 0.6 and i2t["recall@10"] >= 0.6 and t2i["recall@1"] >= 0.17
    assert t2i["mrr"] >= 40 * chance["mrr"]


def test_grocery_fine_label_fusion_with_ocr(tmp_path):
    """81 fine classes, image (6 views: --views auto on 2,640 photos) + RapidOCR text. Trained on train.csv
    (early-stopped on a stratified tenth of it), scored on val.csv, which training never sees."""
    train_emb, val_emb = grocery_shards()
    # the extraction integration check: rows, dims, views, and OCR words on the packaged products' photos
    val = shards.read_shards(
        val_emb, ["product_id", "group", "ocr_text", "image_embedding", "image_views", "text_embedding"]
    )
    assert len(val["product_id"]) == len(pd.read_csv(SHARED / "data" / "grocery" / "val.csv")) == 296
    assert val["image_embedding"].shape == (296, 1280) and val["text_embedding"].shape == (296, 768)
    assert val["image_views"].shape == (296, 5 * 1280)
    packages = val["group"] == "Packages"
    with_words = (pd.Series(val["ocr_text"][packages]).str.len() > 0).mean()
    assert with_words >= 0.80, with_words

    r = compare(
        tmp_path,
        TRAIN_GROCERY,
        embeddings=str(train_emb),
        test_embeddings=str(val_emb),
        models="product,lr_image,lr_text,lr_concat",
    )
    acc = {k: v["accuracy"] for k, v in r.items()}
    # the single-stream models are the product run's own (the same training as `--text-branch none` and
    # `--image-branch none`)
    acc["image"], hits = sub_model_accuracy(r["product"]["run"], "image", val_emb, None, per_item=True)
    acc["text"] = sub_model_accuracy(r["product"]["run"], "text", val_emb, None)
    image_packages = float(np.mean(hits[packages]))
    fused = evaluate(r["product"]["run"], val_emb, tmp_path / "eval-product")
    print(
        "grocery val accuracy: "
        + ", ".join(f"{k} {v:.4f}" for k, v in acc.items())
        + f"; Packages: product {fused['per_group']['Packages']['accuracy']:.4f}, image {image_packages:.4f}; "
        f"OCR words on {with_words:.0%} of Packages photos"
    )
    assert fused["n"] == 296 and fused["accuracy"] == pytest.approx(acc["product"])
    # This seed reads product 0.841 (image, OCR text and linear-probe experts), image 0.838, OCR text 0.196, LR on
    # the image 0.811, on the text 0.193, on both 0.767 (PP-OCRv6 text through MiniLM + TF-IDF). Over 3 seeds:
    # product 0.837 ± 0.008, image 0.829 ± 0.008 (docs/reports/model-quality.md); the floors are the spread below
    # the means, not this run's figures.
    assert acc["product"] >= 0.80
    assert acc["product"] >= acc["lr_concat"] + 0.04
    assert acc["product"] >= acc["image"] - 0.01  # at least its image model, within three photos
    assert acc["image"] >= acc["lr_image"] - 0.01
    assert acc["text"] >= acc["lr_text"] - 0.01  # the OCR text model at least its linear probe

    # Retrieval: val.csv photos' neighbours among train.csv. Measured: image 0.475, text 0.408 (the 105 photos
    # with OCR text), fused 0.731.
    from prodfuse.retrieval.quality import precision_by_space

    p10 = precision_by_space(train_emb, None, val_emb, None, r["product"]["run"], "label")
    print(f"grocery precision@10: {p10}")
    assert p10["fused"] >= 0.62 and p10["fused"] >= max(p10["image"], p10["text"]) + 0.1
    assert fused["per_group"]["Packages"]["accuracy"] >= image_packages - 0.05
