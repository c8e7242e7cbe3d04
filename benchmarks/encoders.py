"""The text encoders and the OCR engines side by side: speed, and what the OCR keeps.

    python benchmarks/encoders.py [--titles 5000] [--photos 200] [--extract-photos 200]

On this machine, in one run:

- text:    sentences/s of each text encoder (`tfidf`, `minilm`, `minilm,tfidf`) encoding the first `--titles`
           fashion titles (../shared/data/fashion), after fitting on them (TF-IDF's fit is timed on its own);
- OCR:     photos/s of one single-threaded worker (cold cache: a fresh cache folder) on the first `--photos`
           grocery val.csv + train.csv Packages photos, for PP-OCRv6 (rapidocr 3.x, prodfuse's engine) and, when
           `rapidocr_onnxruntime` 1.4 is installed (`pip install 'rapidocr_onnxruntime>=1.4,<1.5'`), PP-OCRv4 as
           prodfuse read it before; words kept per photo after prodfuse's filter, and the share of photos with
           any word;
- extract: images/s of `prodfuse extract` with the default settings (OCR, MobileNetV2 from ../shared/models at
           224 px, one view) on `--extract-photos` grocery photos, cold OCR cache, with the text encoder of before
           (`tfidf`) and the default now (`minilm,tfidf`).

The ratios compare figures measured in this run. The last line printed is one JSON object with the figures.
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
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FASHION = SHARED / "data" / "fashion" / "catalog.csv"
GROCERY = SHARED / "data" / "grocery"
WEIGHTS = SHARED / "models" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
sys.path.insert(0, str(ROOT / "src"))


def text_rates(n: int) -> dict:
    from prodfuse.encoders.text import make_text_encoder

    titles = pd.read_csv(FASHION)["title"].fillna("").astype(str).head(n).tolist()
    out = {}
    for kind in ("tfidf", "minilm", "minilm,tfidf"):
        enc = make_text_encoder(kind)
        t0 = time.perf_counter()
        enc.fit(titles)
        fit = time.perf_counter() - t0
        enc.encode(titles[:64])  # warm (first batch allocations, threads)
        t0 = time.perf_counter()
        enc.encode(titles)
        seconds = time.perf_counter() - t0
        out[kind] = {"sentences_per_s": round(n / seconds, 1), "fit_s": round(fit, 2), "dim": enc.dim}
        print(f"text {kind:13s} {n / seconds:9.1f} sentences/s  (fit {fit:.2f} s, {enc.dim}-d)", flush=True)
    return out


def package_photos(n: int) -> list[str]:
    frames = [pd.read_csv(GROCERY / name) for name in ("val.csv", "train.csv")]
    df = pd.concat(frames)
    df = df[df["group"] == "Packages"].head(n)
    return [str(GROCERY / p) for p in df["image_path"]]


def v4_reader():
    """PP-OCRv4 as prodfuse ran it before (rapidocr_onnxruntime 1.4, one thread, no angle classifier)."""
    from rapidocr_onnxruntime import RapidOCR

    from prodfuse.encoders.ocr import _load_rgb, filter_words, parse_rapidocr

    reader = RapidOCR(intra_op_num_threads=1, inter_op_num_threads=1, use_cls=False)
    return lambda path: filter_words(parse_rapidocr(reader(_load_rgb(path))))


def ocr_rates(photos: list[str]) -> dict:
    import importlib.util

    from prodfuse.encoders.ocr import ocr_images

    out = {}
    engines = {"PP-OCRv6": None}
    if importlib.util.find_spec("rapidocr_onnxruntime") is not None:
        engines["PP-OCRv4"] = v4_reader
    for name, make in engines.items():
        with tempfile.TemporaryDirectory() as cache:
            if make is None:  # prodfuse's own path: one worker process, cold cache; start-up timed apart
                ocr_images(photos[:1], engine="rapidocr", workers=1, cache_dir=cache, progress=False)
                t0 = time.perf_counter()
                texts = [r.text for r in ocr_images(photos[1:], "rapidocr", workers=1, cache_dir=cache, progress=False)]
            else:  # in this process, on one thread (the worker's settings)
                read = make()
                read(photos[0])
                t0 = time.perf_counter()
                texts = [read(p) for p in photos[1:]]
            seconds = time.perf_counter() - t0
        words = [len(t.split()) for t in texts]
        out[name] = {
            "photos_per_s": round(len(texts) / seconds, 2),
            "words_per_photo": round(float(np.mean(words)), 2),
            "share_with_text": round(float(np.mean([w > 0 for w in words])), 3),
        }
        print(f"OCR {name}: {out[name]} ({len(texts)} photos, one worker)", flush=True)
    return out


def extract_rates(n: int) -> dict:
    import prodfuse

    df = pd.read_csv(GROCERY / "val.csv").head(n)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        catalog = Path(tmp) / "catalog.csv"
        df.assign(image_path=[str(GROCERY / p) for p in df["image_path"]]).to_csv(catalog, index=False)
        for kind in ("tfidf", "minilm,tfidf"):
            os.environ["PRODFUSE_CACHE"] = str(Path(tmp) / f"cache-{kind}")  # cold OCR cache for each
            cfg = prodfuse.ExtractConfig(
                catalog=str(catalog),
                out=str(Path(tmp) / kind),
                backbone="mobilenet_v2",
                weights=str(WEIGHTS),
                views=1,
                text_encoder=kind,
                text_cols="",
                progress=False,
            )
            t0 = time.perf_counter()
            prodfuse.extract(cfg)
            seconds = time.perf_counter() - t0
            out[kind] = {"images_per_s": round(n / seconds, 2), "seconds": round(seconds, 1)}
            print(f"extract, text encoder {kind}: {out[kind]}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--titles", type=int, default=5000)
    ap.add_argument("--photos", type=int, default=200)
    ap.add_argument("--extract-photos", type=int, default=200)
    args = ap.parse_args()
    text = text_rates(args.titles)
    ocr = ocr_rates(package_photos(args.photos))
    extract = extract_rates(args.extract_photos)
    ratios = {
        "minilm_over_tfidf_sentences": round(text["minilm"]["sentences_per_s"] / text["tfidf"]["sentences_per_s"], 3),
        "both_over_tfidf_sentences": round(
            text["minilm,tfidf"]["sentences_per_s"] / text["tfidf"]["sentences_per_s"], 3
        ),
        "extract_default_over_tfidf": round(
            extract["minilm,tfidf"]["images_per_s"] / extract["tfidf"]["images_per_s"], 3
        ),
    }
    if "PP-OCRv4" in ocr:
        ratios["ocr_v6_over_v4_photos"] = round(ocr["PP-OCRv6"]["photos_per_s"] / ocr["PP-OCRv4"]["photos_per_s"], 3)
        ratios["ocr_v6_over_v4_words"] = round(
            ocr["PP-OCRv6"]["words_per_photo"] / max(ocr["PP-OCRv4"]["words_per_photo"], 1e-9), 3
        )
    print(json.dumps({"benchmark": "encoders", "text": text, "ocr": ocr, "extract": extract, "ratios": ratios}))


if __name__ == "__main__":
    main()
