"""Images/s of `extract --engine local` vs `--engine ray` on one machine, and of the ray engine with 1 vs 2 OCR actors.

    python benchmarks/extraction_engines.py [--images 600] [--repeats 1]

The same `--images` photos (the first rows of grocery train.csv in ../shared/data/grocery), OCR on (RapidOCR), the
MobileNetV2 shared weights at 224 px, one view, TF-IDF text, each run into a fresh folder with a fresh (cold) OCR
cache, so every run reads every photo. Figures are end to end (`extract`'s `seconds`: catalog, OCR, backbone, text,
shards), per run:

- local:     `--engine local`, OCR in 2 worker processes beside the backbone (the default on 2 cores);
- ray 2 OCR: `--engine ray` on a local Ray cluster of 2 CPUs (started once, before any timing, as a user's running
             cluster would be), 2 OCR actors + 1 image actor; actor start-up is inside the figure;
- ray 1 OCR: the same with `--ocr-actors 1`.

Each variant also extracts the first `--small` photos (150), so the marginal rate, (images - small) / (seconds -
seconds_small), is the throughput with every fixed cost taken out (Ray and TensorFlow start-up in the actors and the
driver, the TF-IDF fit, the manifest): what a run of millions sees. Both figures are printed.

Goals (issue 14): ray >= 0.8x local (the engine costs little where it cannot help); ray 2 OCR actors >= 1.7x 1.
Variants are interleaved `--repeats` times, their order rotating; each figure is the median. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DEFAULT_CSV = SHARED / "data" / "grocery" / "train.csv"
DEFAULT_WEIGHTS = SHARED / "models" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"

sys.path.insert(0, str(ROOT / "src"))


def write_catalog(src: Path, n: int, folder: Path, name: str = "catalog.csv") -> Path:
    with open(src, newline="") as f:
        rows = list(csv.DictReader(f))[:n]
    for r in rows:
        r["image_path"] = str((src.parent / r["image_path"]).resolve())
    path = folder / name
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv", default=str(DEFAULT_CSV))
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--small", type=int, default=150, help="photos of the short run behind the marginal rate")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    args = ap.parse_args()

    import ray

    from prodfuse.extraction.config import ExtractConfig
    from prodfuse.extraction.extract import extract

    tmp = Path(tempfile.mkdtemp(prefix="engines-"))
    catalogs = {
        "large": write_catalog(Path(args.csv), args.images, tmp),
        "small": write_catalog(Path(args.csv), args.small, tmp, "small.csv"),
    }
    base = dict(
        backbone="mobilenet_v2",
        weights=args.weights,
        image_size=224,
        views=1,
        ocr="rapidocr",
        text_cols="",
        progress=False,
    )
    variants = {
        "local": dict(engine="local", ocr_workers=2),
        "ray_2_ocr": dict(engine="ray", ocr_actors=2),
        "ray_1_ocr": dict(engine="ray", ocr_actors=1),
    }
    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    ray_start_s = time.perf_counter() - t0
    runs: dict[str, list[float]] = {k: [] for k in variants}
    marginal_runs: dict[str, list[float]] = {k: [] for k in variants}
    try:
        for r in range(args.repeats):
            # The order rotates each repeat: this machine's speed drifts over minutes, and a fixed order would
            # give one variant the same part of every drift.
            names = list(variants)[r % len(variants) :] + list(variants)[: r % len(variants)]
            for name in names:
                extra = variants[name]
                seconds = {}
                for size, n in (("small", args.small), ("large", args.images)):
                    cfg = ExtractConfig(
                        catalog=str(catalogs[size]),
                        out=str(tmp / f"{name}-{size}-{r}"),
                        ocr_cache=str(tmp / f"ocr-{name}-{size}-{r}"),
                        **base,
                        **extra,
                    )
                    summary = extract(cfg)
                    assert summary["embedded_rows"] + summary["rejected_rows"] == n
                    assert summary["ocr"].get("cache_hits", 0) == 0  # every photo read
                    seconds[size] = summary["seconds"]
                rate = args.images / seconds["large"]
                marginal = (args.images - args.small) / (seconds["large"] - seconds["small"])
                runs[name].append(round(rate, 2))
                marginal_runs[name].append(round(marginal, 2))
                print(
                    f"{name:10s} run {r}: {args.images} photos {seconds['large']:7.1f} s  {rate:6.2f} images/s;  "
                    f"{args.small} photos {seconds['small']:6.1f} s;  marginal {marginal:6.2f} images/s",
                    flush=True,
                )
    finally:
        ray.shutdown()
    med = {k: statistics.median(v) for k, v in runs.items()}
    med_marginal = {k: statistics.median(v) for k, v in marginal_runs.items()}
    ratio_engine = med["ray_2_ocr"] / med["local"]
    ratio_actors = med["ray_2_ocr"] / med["ray_1_ocr"]
    marginal_engine = med_marginal["ray_2_ocr"] / med_marginal["local"]
    marginal_actors = med_marginal["ray_2_ocr"] / med_marginal["ray_1_ocr"]
    print(
        f"\nend to end: ray / local {ratio_engine:.2f}x, ray 2 / 1 OCR actors {ratio_actors:.2f}x\n"
        f"marginal:   ray / local {marginal_engine:.2f}x (goal >= 0.8), ray 2 / 1 OCR actors {marginal_actors:.2f}x "
        f"(goal >= 1.7)"
    )
    print(
        json.dumps(
            {
                "benchmark": "extraction_engines",
                "images": args.images,
                "repeats": args.repeats,
                "cpu_cores": os.cpu_count(),
                "small": args.small,
                "images_per_s": med,
                "marginal_images_per_s": med_marginal,
                "runs": runs,
                "marginal_runs": marginal_runs,
                "ratio_ray_vs_local": round(ratio_engine, 3),
                "ratio_ray_2_vs_1_ocr_actors": round(ratio_actors, 3),
                "marginal_ratio_ray_vs_local": round(marginal_engine, 3),
                "marginal_ratio_ray_2_vs_1_ocr_actors": round(marginal_actors, 3),
                "ray_cluster_start_s": round(ray_start_s, 1),
                "goals": {"marginal_ratio_ray_vs_local": ">= 0.8", "marginal_ratio_ray_2_vs_1_ocr_actors": ">= 1.7"},
                "ray": ray.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
