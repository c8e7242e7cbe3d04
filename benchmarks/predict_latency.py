"""Latency and throughput of prediction through `prodfuse.Predictor`, against a whole `prodfuse predict` process.

    python benchmarks/predict_latency.py [--items 200] [--batch 256]

On grocery val photos (../shared/data/grocery/val.csv) with the shared MobileNetV2 weights, a run trained on the
accuracy tests' cached grocery shards (extracted first if the cache is cold, as the tests do):
  (a) Predictor.predict on one item at a time: p50 / p95 latency over --items items, with OCR off (a second
      Predictor over a run trained without OCR text), OCR on with a cold cache, OCR on with a warm cache;
  (b) `prodfuse predict` on a one-row catalog, the whole process (start, TensorFlow import, model load);
  (c) Predictor.predict on batches of --batch items: items/s, against `prodfuse extract` images/s on the same photos.
Goals (issue 11): (b) / (a, OCR off) >= 50; (c) >= 0.9 x extraction's images/s. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))


def _pcts(seconds: list[float]) -> dict:
    import numpy as np

    ms = np.asarray(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 1), "p95_ms": round(float(np.percentile(ms, 95)), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--parts", default="a,b,c", help="which measurements: a, b and/or c (b needs a)")
    args = ap.parse_args()

    import pandas as pd

    import prodfuse
    from test_accuracy import SHARED, grocery_shards

    prodfuse.keep_freed_heap_mapped()
    work = Path(tempfile.mkdtemp(prefix="predict-latency-"))
    train_emb, val_emb = grocery_shards()
    run = prodfuse.train(
        prodfuse.TrainConfig(embeddings=str(train_emb), out=str(work / "run"), epochs=15, patience=5, verbose=0)
    )
    val = pd.read_csv(SHARED / "data" / "grocery" / "val.csv")
    photos = [str((SHARED / "data" / "grocery" / p).resolve()) for p in val["image_path"]]
    parts = set(args.parts.split(","))
    figures = {"items": min(args.items, len(photos)), "photos": len(photos)}
    cache = work / "ocr-cache"
    if "a" in parts:
        _latency(run, [{"image": p} for p in photos[: args.items]], photos, cache, work, figures, "b" in parts)
    if "c" in parts:
        _throughput(run, photos, train_emb, cache, work, args.batch, figures)
    print(json.dumps({"benchmark": "predict_latency", "cpu_count": os.cpu_count(), **figures}))


def _one_at_a_time(predictor, items) -> list[float]:
    times = []
    for it in items:
        t0 = time.perf_counter()
        res = predictor.predict([it], top_k=5)
        times.append(time.perf_counter() - t0)
        assert res[0]["error"] is None, res[0]["error"]
    return times


def _latency(run, items, photos, cache, work, figures, whole_process: bool) -> None:
    """(a) one item at a time: OCR off, OCR on with a cold cache, then warm; (b) a whole `prodfuse predict`."""
    import pandas as pd

    import prodfuse

    p = prodfuse.Predictor.from_run(run.path)
    p.ocr_engine = "none"  # the same run's model path alone
    _one_at_a_time(p, items[:3])  # warm-up: backbone build, first traces
    figures["a_ocr_off"] = _pcts(_one_at_a_time(p, items))
    p_ocr = prodfuse.Predictor.from_run(run.path, ocr_cache=str(cache))
    _one_at_a_time(p_ocr, [{"image": photos[-1]}])
    figures["a_ocr_cold"] = _pcts(_one_at_a_time(p_ocr, items))
    figures["a_ocr_warm"] = _pcts(_one_at_a_time(p_ocr, items))
    print(
        f"(a) one item at a time, p50/p95 ms: OCR off {figures['a_ocr_off']}, OCR cold {figures['a_ocr_cold']}, "
        f"OCR warm {figures['a_ocr_warm']}"
    )
    if not whole_process:
        return
    one = work / "one.csv"
    pd.DataFrame({"product_id": ["x"], "image_path": [photos[0]]}).to_csv(one, index=False)
    t0 = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "prodfuse.cli",
            "predict",
            "--run",
            str(run.path),
            "--catalog",
            str(one),
            "--out",
            str(work / "one-pred.csv"),
            "--label-col",
            "",
            "--ocr-cache",
            str(cache),
            "--quiet",
        ],
        check=True,
        capture_output=True,
    )
    figures["b_process_s"] = round(time.perf_counter() - t0, 2)
    figures["b_over_a_ocr_off"] = round(figures["b_process_s"] * 1000 / figures["a_ocr_off"]["p50_ms"], 1)
    print(
        f"(b) `prodfuse predict` on one row: {figures['b_process_s']} s = {figures['b_over_a_ocr_off']}x (a, OCR off)"
    )


def _throughput(run, photos, train_emb, cache, work, batch_size, figures) -> None:
    """(c) extraction first (its first pass also fills the OCR cache for these photos), then the Predictor on the
    same photos: both pay decoding, the backbone on every view and the text encoder; neither pays OCR."""
    import pandas as pd

    import prodfuse

    batch = [{"image": ph} for ph in photos[:batch_size]]
    cat = work / "batch.csv"
    pd.DataFrame({"product_id": [f"x{i}" for i in range(len(batch))], "image_path": photos[:batch_size]}).to_csv(
        cat, index=False
    )
    for name in ("warm-up", "emb"):  # the second pass is the one measured
        summary = prodfuse.extract(
            prodfuse.ExtractConfig(
                catalog=str(cat),
                out=str(work / name),
                like=str(train_emb),
                label_col="",  # no label column ("": none; None would take the like folder's)
                progress=False,
                ocr_cache=str(cache),
            )
        )
    figures["c_extract_items_s"] = round(summary["input_rows"] / summary["seconds"], 1)
    p = prodfuse.Predictor.from_run(run.path, ocr_cache=str(cache))
    p.predict(batch)  # a whole warm-up pass (backbone built, every chunk shape traced), as extraction gets one
    t0 = time.perf_counter()
    p.predict(batch, top_k=5)
    figures["c_predictor_items_s"] = round(len(batch) / (time.perf_counter() - t0), 1)
    figures["c_ratio"] = round(figures["c_predictor_items_s"] / figures["c_extract_items_s"], 2)
    print(
        f"(c) Predictor {figures['c_predictor_items_s']} items/s vs extract {figures['c_extract_items_s']} "
        f"items/s ({len(batch)} photos, every view, warm OCR cache): {figures['c_ratio']}x"
    )


if __name__ == "__main__":
    main()
