"""Read speed of our parquet shards vs the common "embeddings as strings in a CSV" format, side by side.

    python benchmarks/shard_read.py [--rows 100000] [--csv-rows 5000]

Prints rows/s of each and their ratio, and the first read of the folder in a process, which also checks every
shard's sha256 against the manifest (later reads reuse the hashes); the last line is one JSON object with the
figures.
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from prodfuse.data import catalog, shards  # noqa: E402


def write_our_shards(folder: Path, img: np.ndarray, txt: np.ndarray, shard_rows: int) -> None:
    header = {
        "catalog_path": "synthetic",
        "catalog_sha256": "-",
        "columns": {},
        "settings": {},
        "encoders": {},
        "versions": {},
    }
    m = shards.open_shards(folder, header, overwrite=True)
    for start in range(0, len(img), shard_rows):
        stop = min(start + shard_rows, len(img))
        shards.write_shard(
            folder,
            m,
            {
                "product_id": [str(i) for i in range(start, stop)],
                "label": [str(i % 16) for i in range(start, stop)],
                "image_embedding": img[start:stop],
                "text_embedding": txt[start:stop],
            },
            start,
            stop,
        )
    shards.finish(folder, m)


def write_csv(path: Path, img: np.ndarray, txt: np.ndarray) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["product_id", "label", "image_embedding", "text_embedding"])
        for i in range(len(img)):
            w.writerow([i, i % 16, str(img[i].tolist()), str(txt[i].tolist())])


def read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    imgs, txts = [], []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            imgs.append(ast.literal_eval(row["image_embedding"]))
            txts.append(ast.literal_eval(row["text_embedding"]))
    return np.asarray(imgs, np.float32), np.asarray(txts, np.float32)


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--csv-rows", type=int, default=5_000)
    ap.add_argument("--shard-rows", type=int, default=10_000)
    ap.add_argument("--image-dim", type=int, default=2048)
    ap.add_argument("--text-dim", type=int, default=384)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    img = rng.standard_normal((args.rows, args.image_dim), dtype=np.float32)
    txt = rng.standard_normal((args.rows, args.text_dim), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_our_shards(tmp / "shards", img, txt, args.shard_rows)
        cols = ["image_embedding", "text_embedding"]
        shards.read_shards(tmp / "shards", cols)  # warm the page cache, as a second epoch or run would see it

        def first_read():
            catalog._HASHED.clear()  # as a new process finds it: every shard hashed before it is read
            shards.read_shards(tmp / "shards", cols)

        t_first = best_of(first_read, 3)
        t_ours = best_of(lambda: shards.read_shards(tmp / "shards", cols), 3)
        got = shards.read_shards(tmp / "shards", cols)
        assert np.array_equal(got["image_embedding"], img) and np.array_equal(got["text_embedding"], txt)
        write_csv(tmp / "emb.csv", img[: args.csv_rows], txt[: args.csv_rows])
        t_csv = best_of(lambda: read_csv(tmp / "emb.csv"), 1)
    ours = args.rows / t_ours
    csv_rate = args.csv_rows / t_csv
    print(f"parquet shards : {args.rows:>7} rows in {t_ours:7.3f} s = {ours:12,.0f} rows/s")
    print(
        f"CSV + literal_eval: {args.csv_rows:>4} rows in {t_csv:7.3f} s = {csv_rate:12,.0f} rows/s "
        f"(scaled to {args.rows} rows: {args.rows / csv_rate:,.0f} s)"
    )
    print(f"ratio: {ours / csv_rate:,.0f}x")
    first = args.rows / t_first
    print(f"first read in a process (sha256 of every shard checked): {first:12,.0f} rows/s ({first / ours:.2f}x)")
    print(
        json.dumps(
            {
                "benchmark": "shard_read",
                "rows": args.rows,
                "dims": [args.image_dim, args.text_dim],
                "shard_rows_per_s": round(ours),
                "csv_rows_per_s": round(csv_rate),
                "ratio": round(ours / csv_rate, 1),
                "first_read_rows_per_s": round(first),
                "first_read_vs_later": round(first / ours, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
