"""Images/s of our extraction vs the bare backbone and vs the common Keras recipe, plus OCR images/s, at steady state.

    python benchmarks/extraction.py [--images 2000] [--ocr-images 120] [--repeats 3]

On the same grocery photos (the first `--images` of train.csv in ../shared/data/grocery) and mobilenet_v2 weights:

- backbone: the ceiling. Every image decoded + resized (`load_image`) into one uint8 array first, then the same
            compiled forward pass extraction uses, batch by batch (64).
- extract:  `extract` (`--ocr none --text-encoder tfidf`) into a temp folder, end to end (decode, backbone, TF-IDF
            fit + encode, tokens, parquet shard), with the backbone already built and traced (`build_backbone`
            hands extract the warmed model), so it is timed as the ceiling is.
- keras:    what a Keras user commonly writes: `keras.utils.image_dataset_from_directory(folder, labels=None,
            image_size=(S, S), batch_size=64, shuffle=False)` over a temp folder of symlinks, then
            `model.predict(ds)`, its predict function warmed on one batch first.
- OCR:      `ocr_images` (RapidOCR) on `--ocr-images` photos with 1 and 2 workers, each on a fresh (cold) cache
            dir; worker start-up is measured on its own (a call on 2 photos per worker) and taken out, so the rate
            is the steady one; then the 1-worker call again on its now warm cache (hashing + cache reads only).

Steady state: every variant is warmed before it is timed, so a first call's tracing is in no figure; the
first-call costs (model build, the forward pass's trace, a whole cold `extract` on 64 photos) are printed on a
line of their own. Variants are interleaved (backbone, extract, keras, backbone, ...) `--repeats` times; each
figure is the median, with the spread (min-max) beside it; the table also gives this process's CPU seconds.
`PRODFUSE_CACHE` points at a temp dir, so the user's OCR cache is untouched. The last line printed is one JSON
object with the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DEFAULT_CSV = SHARED / "data" / "grocery" / "train.csv"
DEFAULT_WEIGHTS = SHARED / "models" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
BATCH_SIZE = 64

sys.path.insert(0, str(ROOT / "src"))


def read_photos(csv_path: Path, n: int | None) -> list[dict]:
    """The first `n` rows of a grocery csv, image paths made absolute."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))[:n]
    for r in rows:
        r["image_path"] = str((csv_path.parent / r["image_path"]).resolve())
    return rows


def write_catalog(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["product_id", "image_path", "label", "title"])
        for r in rows:
            title = f"{r['label'].replace('-', ' ')} {r['coarse_label']} {r['group']}"
            w.writerow([r["product_id"], r["image_path"], r["label"], title])
    return path


def link_folder(folder: Path, rows: list[dict]) -> Path:
    """A flat folder of symlinks, named so that sorted order = catalog order (image_dataset_from_directory sorts)."""
    folder.mkdir()
    for i, r in enumerate(rows):
        os.symlink(r["image_path"], folder / f"{i:06d}{Path(r['image_path']).suffix.lower()}")
    return folder


@contextlib.contextmanager
def patched(owner, name: str, make_wrapper):
    """Temporarily replace `owner.name` by `make_wrapper(original)` (extract looks these up at call time)."""
    original = getattr(owner, name)
    setattr(owner, name, make_wrapper(original))
    try:
        yield
    finally:
        setattr(owner, name, original)


def time_extract(catalog: Path, out: Path, args, model=None, rows: int | None = None) -> tuple[dict, np.ndarray]:
    """Seconds of one `extract` and of its parts, and the image embeddings it wrote. With `model`, extract gets
    that (already built and traced) backbone instead of building its own.

    Parts: `build` (build_backbone), `images` (first to last batch of iter_image_embeddings: decode + forward
    passes), `forward` (the compiled forward passes alone), `text_fit` (fitting the text encoder) and `total` (the
    whole call); `build_cpu`, `total_cpu`: CPU seconds of this process."""
    from prodfuse.data import shards
    from prodfuse.encoders import image as image_encoders
    from prodfuse.encoders import text as text_encoders
    from prodfuse.extraction.config import ExtractConfig
    from prodfuse.extraction.extract import extract

    config = ExtractConfig(
        catalog=str(catalog),
        out=str(out),
        backbone=args.backbone,
        weights=args.weights,
        image_size=args.image_size,
        batch_size=BATCH_SIZE,
        ocr="none",
        text_encoder="tfidf",
        text_cols="title",
        views=1,
        progress=False,
    )
    parts = {"build": 0.0, "images": 0.0, "forward": 0.0, "text_fit": 0.0}

    def timed(key):
        def wrap(fn):
            def call(*a, **kw):
                t, c = time.perf_counter(), time.process_time()
                try:
                    return fn(*a, **kw)
                finally:
                    parts[key] += time.perf_counter() - t
                    parts[key + "_cpu"] = parts.get(key + "_cpu", 0.0) + time.process_time() - c

            return call

        return wrap

    def timed_iter(fn):
        def gen(*a, **kw):
            t = time.perf_counter()
            yield from fn(*a, **kw)
            parts["images"] += time.perf_counter() - t

        return gen

    def timed_predict_fn(fn):
        def make(model):
            predict = fn(model)

            def call(batch):
                t = time.perf_counter()
                out = predict(batch)
                parts["forward"] += time.perf_counter() - t
                return out

            return call

        return make

    given = (lambda build: lambda *a, **kw: model) if model is not None else (lambda build: build)
    with (
        patched(image_encoders, "build_backbone", lambda build: timed("build")(given(build))),
        patched(image_encoders, "iter_image_embeddings", timed_iter),
        patched(image_encoders, "_predict_fn", timed_predict_fn),
        patched(text_encoders.TfidfTextEncoder, "fit", timed("text_fit")),
    ):
        t, c = time.perf_counter(), time.process_time()
        summary = extract(config)
        parts["total"], parts["total_cpu"] = time.perf_counter() - t, time.process_time() - c
    rows = args.images if rows is None else rows
    if summary["embedded_rows"] != rows:
        raise RuntimeError(f"extract embedded {summary['embedded_rows']} of {rows} images: {summary}")
    return parts, shards.read_shards(out, ["image_embedding"])["image_embedding"]


def time_backbone(model, pixels: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(wall s, CPU s, embeddings) of the compiled forward passes over pre-decoded pixels (`model` warmed)."""
    from prodfuse.encoders import image as image_encoders

    predict = image_encoders._predict_fn(model)  # the compiled step iter_image_embeddings uses
    t, c = time.perf_counter(), time.process_time()
    emb = [predict(pixels[s : s + BATCH_SIZE]) for s in range(0, len(pixels), BATCH_SIZE)]
    return time.perf_counter() - t, time.process_time() - c, np.concatenate(emb)


def time_keras_common(folder: Path, model, args) -> tuple[float, float, np.ndarray]:
    """(wall s, CPU s, embeddings) of image_dataset_from_directory + model.predict (predict already warmed)."""
    import keras

    t, c = time.perf_counter(), time.process_time()
    ds = keras.utils.image_dataset_from_directory(
        folder, labels=None, image_size=(args.image_size,) * 2, batch_size=BATCH_SIZE, shuffle=False, verbose=False
    )
    emb = model.predict(ds, verbose=0)
    return time.perf_counter() - t, time.process_time() - c, emb


def time_ocr(paths: list[str], workers: int, cache_dir: Path) -> float:
    from prodfuse.encoders import ocr

    t = time.perf_counter()
    res = ocr.ocr_images(paths, engine="rapidocr", workers=workers, cache_dir=cache_dir, progress=False)
    seconds = time.perf_counter() - t
    errors = [r.error for r in res if r.error]
    if errors:
        raise RuntimeError(f"OCR failed on {len(errors)} images, e.g. {errors[0]}")
    return seconds


def spread(values: list[float]) -> str:
    return f"{min(values):.1f}-{max(values):.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv", default=str(DEFAULT_CSV), help="grocery csv (image_path relative to it)")
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--images", type=int, default=2000, help="photos to embed (default 2000)")
    ap.add_argument("--ocr-images", type=int, default=120, help="photos to OCR (0 skips OCR)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs per variant; figures are medians")
    args = ap.parse_args()
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1; got {args.repeats}")

    with tempfile.TemporaryDirectory(prefix="prodfuse-bench-") as tmp:
        tmp = Path(tmp)
        os.environ["PRODFUSE_CACHE"] = str(tmp / "cache")  # before prodfuse reads it: never the user's cache
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        from prodfuse.encoders import image as image_encoders
        from prodfuse.encoders import ocr

        rows = read_photos(Path(args.csv), args.images)
        args.images = len(rows)
        catalog = write_catalog(tmp / "catalog.csv", rows)
        small = write_catalog(tmp / "small.csv", rows[:BATCH_SIZE])
        folder = link_folder(tmp / "images", rows)
        paths = [r["image_path"] for r in rows]
        # Imports and first-use costs (sklearn, pyarrow, TF) that a one-shot CLI run also pays once; not timed.
        import pyarrow.parquet  # noqa: F401
        import sklearn.decomposition  # noqa: F401
        import sklearn.feature_extraction.text  # noqa: F401

        pixels = np.stack([image_encoders.load_image(p, args.image_size) for p in paths])

        # First-call costs, once, on their own: a cold extract of 64 photos (build + trace + everything), then the
        # model build and the first forward call (its trace) against a later call of the same batch.
        cold, _ = time_extract(small, tmp / "extract-cold", args, rows=len(rows[:BATCH_SIZE]))
        t = time.perf_counter()
        model = image_encoders.build_backbone(args.backbone, args.weights, args.image_size)
        build_s = time.perf_counter() - t
        predict = image_encoders._predict_fn(model)
        t = time.perf_counter()
        predict(pixels[:BATCH_SIZE])
        first_call_s = time.perf_counter() - t
        t = time.perf_counter()
        predict(pixels[:BATCH_SIZE])
        trace_s = first_call_s - (time.perf_counter() - t)
        keras_model = image_encoders.build_backbone(args.backbone, args.weights, args.image_size)
        keras_model.predict(pixels[:BATCH_SIZE], verbose=0)  # traces its predict function: steady from here

        runs = {"backbone": [], "extract": [], "keras": []}
        cpu = {k: [] for k in runs}
        extract_parts, checks = [], {}
        for r in range(args.repeats):
            s, c, emb_b = time_backbone(model, pixels)
            runs["backbone"].append(s)
            cpu["backbone"].append(c)
            parts, emb_a = time_extract(catalog, tmp / f"extract-{r}", args, model=model)
            runs["extract"].append(parts["total"])
            cpu["extract"].append(parts["total_cpu"])
            extract_parts.append(parts)
            s, c, emb_c = time_keras_common(folder, keras_model, args)
            runs["keras"].append(s)
            cpu["keras"].append(c)
            # Same photos, same weights: extract must equal the ceiling; keras decodes/resizes with TF, not PIL,
            # so it is only close (the cosine shows it embedded the same photos in the same order).
            checks = {
                "extract_vs_backbone": float(np.abs(emb_a - emb_b).max()),
                "keras_min_cosine": float(
                    np.min(
                        np.sum(emb_c * emb_b, 1)
                        / (np.linalg.norm(emb_c, axis=1) * np.linalg.norm(emb_b, axis=1) + 1e-12)
                    )
                ),
            }
            print(
                f"run {r + 1}: backbone {runs['backbone'][-1]:.2f} s, extract {runs['extract'][-1]:.2f} s "
                f"(text fit {parts['text_fit']:.2f} s), keras {runs['keras'][-1]:.2f} s",
                file=sys.stderr,
            )

        ocr_runs = {"1": [], "2": [], "warm": [], "start_1": [], "start_2": []}
        ocr_paths = paths[: args.ocr_images]
        for r in range(args.repeats if ocr_paths else 0):
            for workers in (1, 2):
                ocr._LOCAL_ENGINES.clear()  # cold means the engine is built too, as in a fresh process
                # Start-up: the same call on 2 photos per worker (distinct photos, cold cache), taken out below.
                start = paths[-2 * workers :]
                ocr_runs[f"start_{workers}"].append(time_ocr(start, workers, tmp / f"ocr-s-{r}-{workers}"))
                ocr._LOCAL_ENGINES.clear()
                cache = tmp / f"ocr-{r}-{workers}"
                ocr_runs[str(workers)].append(time_ocr(ocr_paths, workers, cache))
                if workers == 1:
                    ocr_runs["warm"].append(time_ocr(ocr_paths, workers, cache))
            print(
                f"OCR run {r + 1}: 1 worker {ocr_runs['1'][-1]:.1f} s (start-up + 2 photos "
                f"{ocr_runs['start_1'][-1]:.1f} s), 2 workers {ocr_runs['2'][-1]:.1f} s (start-up + 4 photos "
                f"{ocr_runs['start_2'][-1]:.1f} s), warm {ocr_runs['warm'][-1]:.3f} s",
                file=sys.stderr,
            )

    n, n_ocr = args.images, len(ocr_paths)
    rate = {k: n / statistics.median(v) for k, v in runs.items()}
    rates = {k: [n / x for x in v] for k, v in runs.items()}
    print(
        f"\n{n} photos, {args.backbone} @ {args.image_size}, batch {BATCH_SIZE}, steady state (every variant "
        f"warmed first), median of {args.repeats} interleaved runs, spread min-max"
    )
    print(f"{'variant':<46}{'seconds':>9}{'images/s':>10}{'spread':>13}{'CPU s':>8}")
    for key, label in (
        ("backbone", "(b) backbone on pre-decoded uint8 (ceiling)"),
        ("extract", "(a) extract, OCR off, model warmed"),
        ("keras", "(c) image_dataset_from_directory + predict"),
    ):
        print(
            f"{label:<46}{statistics.median(runs[key]):>9.2f}{rate[key]:>10.1f}{spread(rates[key]):>13}"
            f"{statistics.median(cpu[key]):>8.1f}"
        )
    med = {k: statistics.median(p[k] for p in extract_parts) for k in ("images", "forward", "text_fit", "total")}
    rest = med["total"] - med["images"] - med["text_fit"]
    print(
        f"(a) where the time goes (medians): image stage {med['images']:.2f} s, of which forward passes "
        f"{med['forward']:.2f} s (the rest: decoding not hidden behind them) | text encoder fit "
        f"{med['text_fit']:.2f} s | catalog, tokens, shard writing {rest:.2f} s"
    )
    print(
        f"first-call costs, not in the figures above: model build {build_s:.2f} s; first forward call "
        f"{first_call_s:.2f} s (its trace ~{trace_s:.2f} s); a cold extract of {BATCH_SIZE} photos "
        f"{cold['total']:.2f} s (of which build {cold['build']:.2f} s)"
    )
    print(
        f"checks: max |extract - backbone| {checks['extract_vs_backbone']:.1e}; min cosine keras vs backbone "
        f"{checks['keras_min_cosine']:.4f}"
    )
    ratio = rate["extract"] / rate["backbone"]
    print(f"ratios: extract/backbone {ratio:.3f} (goal >= 0.9), extract/keras {rate['extract'] / rate['keras']:.2f}")
    ocr_rate = {}
    if n_ocr:
        for w in ("1", "2"):
            total = statistics.median(ocr_runs[w])
            start = statistics.median(ocr_runs[f"start_{w}"])
            ocr_rate[w] = n_ocr / total
            # the start-up call read 2 photos per worker: count them at the steady pace, not as start-up
            ocr_rate[w + "_steady"] = (n_ocr - 2 * int(w)) / max(total - start, 1e-9)
        ocr_rate["warm"] = n_ocr / statistics.median(ocr_runs["warm"])
        print(
            f"OCR (rapidocr), {n_ocr} photos, cold cache: 1 worker {ocr_rate['1_steady']:.2f} img/s steady "
            f"({ocr_rate['1']:.2f} with start-up), 2 workers {ocr_rate['2_steady']:.2f} img/s steady "
            f"({ocr_rate['2']:.2f} with start-up): 2/1 = {ocr_rate['2_steady'] / ocr_rate['1_steady']:.2f} "
            f"(goal >= 1.8); warm cache {ocr_rate['warm']:.0f} img/s"
        )

    def rnd(x, d=1):
        return None if x is None else round(x, d)

    print(
        json.dumps(
            {
                "benchmark": "extraction",
                "images": n,
                "steady_state": True,
                "extract_img_s": rnd(rate["extract"]),
                "backbone_img_s": rnd(rate["backbone"]),
                "keras_common_img_s": rnd(rate["keras"]),
                "extract_img_s_runs": [rnd(x) for x in rates["extract"]],
                "backbone_img_s_runs": [rnd(x) for x in rates["backbone"]],
                "ratio_extract_vs_backbone": rnd(ratio, 3),
                "ratio_extract_vs_keras": rnd(rate["extract"] / rate["keras"], 3),
                "ocr_img_s_1_worker_steady": rnd(ocr_rate.get("1_steady"), 2),
                "ocr_img_s_2_workers_steady": rnd(ocr_rate.get("2_steady"), 2),
                "ocr_ratio_2_vs_1": rnd(ocr_rate["2_steady"] / ocr_rate["1_steady"], 3) if n_ocr else None,
                "ocr_img_s_1_worker": rnd(ocr_rate.get("1"), 2),
                "ocr_img_s_2_workers": rnd(ocr_rate.get("2"), 2),
                "ocr_img_s_warm_cache": rnd(ocr_rate.get("warm")),
                "first_call": {
                    "build_s": rnd(build_s, 2),
                    "first_forward_s": rnd(first_call_s, 2),
                    "trace_s": rnd(trace_s, 2),
                    "cold_extract_64_s": rnd(cold["total"], 2),
                },
                "extract_text_fit_s": rnd(med["text_fit"], 2),
                "ocr_images": n_ocr,
                "repeats": args.repeats,
                "backbone": args.backbone,
                "image_size": args.image_size,
            }
        )
    )


if __name__ == "__main__":
    main()
