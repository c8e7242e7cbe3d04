"""Seconds per epoch of `model.fit` fed by our ShardSequence vs by in-memory numpy arrays, and the peak memory of each.

    python benchmarks/training_feed.py [--rows 100000] [--epochs 2] [--batch-size 32] [--rounds 1]

Synthetic rows (2048-d image + 384-d text float32, 16 classes) are written as parquet shards in a temporary folder.
Each variant then runs in its own subprocess (so its peak RSS is its own) and reads the same shards:

- sequence: `load_inputs` -> `ShardSequence(..., training=True)` with balanced class weights, as train.py feeds it;
- numpy:    `load_inputs` -> `model.fit(x_dict, one_hot, sample_weight=<the same balanced class weights>,
            batch_size, shuffle=True)`: the same training, fed by Keras from in-memory arrays.

Both train `build_model(16, 2048, 384, fusion="gated")` compiled as train.py does (Adam clipnorm 1.0, categorical
cross-entropy with label smoothing 0.1, accuracy). The last epoch is timed (the first one warms up tf.function
tracing and the input pipeline). Peak memory is ru_maxrss minus the RSS just before the data is loaded, as a
multiple of the image+text array bytes. Variants run alternately (A, B, then B, A, ...) because the machine is
shared and noisy; every run is printed, and the ratios use the best (lowest) epoch time of each variant.
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from prodfuse import keep_freed_heap_mapped  # noqa: E402
from prodfuse.data import shards  # noqa: E402

keep_freed_heap_mapped()  # as the CLI does, before TensorFlow starts its threads

VARIANTS = ("sequence", "numpy")
NUM_CLASSES = 16


def write_synthetic_shards(
    folder: Path, rows: int, image_dim: int, text_dim: int, shard_rows: int, seed: int = 0
) -> None:
    """Shards shaped like extract's output; generated one shard at a time so the parent never holds all rows."""
    rng = np.random.default_rng(seed)
    header = {
        "catalog_path": "synthetic",
        "catalog_sha256": "-",
        "columns": {"id": "product_id"},
        "settings": {},
        "encoders": {},
        "versions": {},
    }
    m = shards.open_shards(folder, header, overwrite=True)
    for start in range(0, rows, shard_rows):
        stop = min(start + shard_rows, rows)
        n = stop - start
        shards.write_shard(
            folder,
            m,
            {
                "product_id": [str(i) for i in range(start, stop)],
                "label": [f"class_{c:02d}" for c in rng.integers(0, NUM_CLASSES, size=n)],
                "image_embedding": rng.standard_normal((n, image_dim), dtype=np.float32),
                "text_embedding": rng.standard_normal((n, text_dim), dtype=np.float32),
            },
            start,
            stop,
        )
    shards.finish(folder, m)


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def run_variant(args: argparse.Namespace) -> dict:
    """One variant in this (child) process: build + compile, load the shards, fit, and measure."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    from prodfuse.data.sequence import ShardSequence, load_inputs
    from prodfuse.modeling.model import build_model
    from prodfuse.modeling.training import balanced_class_weights

    keras.utils.set_random_seed(0)
    model = build_model(NUM_CLASSES, args.image_dim, args.text_dim, fusion="gated")
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=1e-3, clipnorm=1.0),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=0.1),
        metrics=["accuracy"],
    )

    rss_before = current_rss_bytes()
    t0 = time.perf_counter()
    data = load_inputs(args.shards, ["image", "text"], ["label"])
    classes, y = np.unique(data.pop("label"), return_inverse=True)
    if len(classes) != NUM_CLASSES:
        raise ValueError(f"expected {NUM_CLASSES} classes in the synthetic shards; got {len(classes)}")
    load_s = time.perf_counter() - t0
    array_bytes = data["image"].nbytes + data["text"].nbytes

    rss_loaded = current_rss_bytes()
    times: list[float] = []
    cpu_times: list[float] = []

    class EpochTimer(keras.callbacks.Callback):
        # CPU seconds (all threads of this process) beside wall seconds: on a shared machine they show the work an
        # epoch costs, which other people's jobs disturb much less than the wall time.
        def on_epoch_begin(self, epoch, logs=None):
            self.t, self.cpu = time.perf_counter(), time.process_time()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.t)
            cpu_times.append(time.process_time() - self.cpu)

    fit_kw = dict(epochs=args.epochs, verbose=0, callbacks=[EpochTimer()])
    if args.variant == "sequence":
        feed_kw = {"workers": args.workers, "use_multiprocessing": args.use_multiprocessing}
        seq = ShardSequence(
            data,
            y,
            NUM_CLASSES,
            batch_size=args.batch_size,
            training=True,
            class_weight=balanced_class_weights(y, NUM_CLASSES),
            seed=0,
            **feed_kw,
        )
        steps = len(seq)
        history = model.fit(seq, **fit_kw)
    else:
        one_hot = np.eye(NUM_CLASSES, dtype=np.float32)[y]
        weights = balanced_class_weights(y, NUM_CLASSES)
        sample_weight = np.array([weights[c] for c in range(NUM_CLASSES)], np.float32)[y]
        steps = -(-len(y) // args.batch_size)
        history = model.fit(
            data, one_hot, sample_weight=sample_weight, batch_size=args.batch_size, shuffle=True, **fit_kw
        )
    peak = peak_rss_bytes()
    return {
        "variant": args.variant,
        "load_s": round(load_s, 3),
        "epoch_s": [round(t, 3) for t in times],
        "epoch_cpu_s": [round(t, 3) for t in cpu_times],
        "steps_per_epoch": steps,
        "final_loss": round(float(history.history["loss"][-1]), 4),
        "array_mb": round(array_bytes / 2**20, 1),
        "rss_before_mb": round(rss_before / 2**20, 1),
        "rss_loaded_mb": round(rss_loaded / 2**20, 1),
        "peak_rss_mb": round(peak / 2**20, 1),
        "peak_mem_ratio": round((peak - rss_before) / array_bytes, 3),
    }


def spawn(variant: str, folder: Path, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--variant",
        variant,
        "--shards",
        str(folder),
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(args.batch_size),
        "--image-dim",
        str(args.image_dim),
        "--text-dim",
        str(args.text_dim),
        "--workers",
        str(args.workers),
    ] + (["--use-multiprocessing"] if args.use_multiprocessing else [])
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"variant {variant!r} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--epochs", type=int, default=2, help="epochs per run; the last one is timed (default 2)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="alternating rounds of both variants (default 1: sequence, numpy; 2 adds numpy, sequence)",
    )
    ap.add_argument("--shard-rows", type=int, default=10_000)
    ap.add_argument("--image-dim", type=int, default=2048)
    ap.add_argument("--text-dim", type=int, default=384)
    ap.add_argument("--workers", type=int, default=1, help="PyDataset workers of the sequence variant (default 1)")
    ap.add_argument("--use-multiprocessing", action="store_true", help="PyDataset use_multiprocessing (sequence)")
    # Internal: run one variant in this process (the parent spawns these).
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--shards", help=argparse.SUPPRESS)
    args = ap.parse_args()
    for name in ("rows", "epochs", "batch_size", "rounds", "shard_rows", "workers"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="training_feed_") as tmp:
        folder = Path(tmp) / "shards"
        t0 = time.perf_counter()
        write_synthetic_shards(folder, args.rows, args.image_dim, args.text_dim, args.shard_rows)
        print(
            f"wrote {args.rows} rows as shards of {args.shard_rows} in {time.perf_counter() - t0:.1f} s",
            file=sys.stderr,
        )
        for r in range(args.rounds):
            order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
            for variant in order:
                res = spawn(variant, folder, args)
                res["round"] = r + 1
                runs.append(res)
                print(
                    f"round {r + 1} {variant:8s}: epoch times {res['epoch_s']} s, load {res['load_s']} s, "
                    f"peak +{res['peak_mem_ratio']}x arrays",
                    file=sys.stderr,
                )

    def best(key: str, pick=min) -> dict:
        return {
            v: pick(r[key] if not isinstance(r[key], list) else r[key][-1] for r in runs if r["variant"] == v)
            for v in VARIANTS
        }

    wall, cpu, mem, load = best("epoch_s"), best("epoch_cpu_s"), best("peak_mem_ratio", max), best("load_s")
    array_mb = runs[0]["array_mb"]
    print(
        f"\n{'round':>5} {'variant':8s} {'load s':>7} {'epoch s':>8} {'CPU s':>7} {'ms/step':>8} "
        f"{'RSS before':>10} {'loaded':>7} {'peak MB':>8} {'peak/arrays':>11}"
    )
    for r in runs:
        print(
            f"{r['round']:>5} {r['variant']:8s} {r['load_s']:7.2f} {r['epoch_s'][-1]:8.2f} "
            f"{r['epoch_cpu_s'][-1]:7.2f} {1000 * r['epoch_s'][-1] / r['steps_per_epoch']:8.2f} "
            f"{r['rss_before_mb']:10.0f} {r['rss_loaded_mb']:7.0f} {r['peak_rss_mb']:8.0f} "
            f"{r['peak_mem_ratio']:11.3f}"
        )
    ratio, cpu_ratio = wall["sequence"] / wall["numpy"], cpu["sequence"] / cpu["numpy"]
    print(
        f"arrays: {array_mb:.0f} MB for {args.rows} rows; epoch {args.epochs} (best of each), sequence/numpy: "
        f"wall {ratio:.3f}x, CPU {cpu_ratio:.3f}x (goal <= 1.1x); peak memory increase / arrays: "
        f"sequence {mem['sequence']:.3f}x, numpy {mem['numpy']:.3f}x (goal <= 1.5x)"
    )
    print(
        json.dumps(
            {
                "benchmark": "training_feed",
                "rows": args.rows,
                "dims": [args.image_dim, args.text_dim],
                "batch_size": args.batch_size,
                "epochs": args.epochs,
                "rounds": args.rounds,
                "workers": args.workers,
                "use_multiprocessing": args.use_multiprocessing,
                "sequence_epoch_s": round(wall["sequence"], 3),
                "numpy_epoch_s": round(wall["numpy"], 3),
                "time_ratio": round(ratio, 3),
                "sequence_epoch_cpu_s": round(cpu["sequence"], 3),
                "numpy_epoch_cpu_s": round(cpu["numpy"], 3),
                "cpu_time_ratio": round(cpu_ratio, 3),
                "sequence_peak_mem_ratio": mem["sequence"],
                "numpy_peak_mem_ratio": mem["numpy"],
                "sequence_load_s": load["sequence"],
                "numpy_load_s": load["numpy"],
                "array_mb": array_mb,
                "runs": [
                    {
                        k: r[k]
                        for k in (
                            "round",
                            "variant",
                            "epoch_s",
                            "epoch_cpu_s",
                            "load_s",
                            "rss_before_mb",
                            "rss_loaded_mb",
                            "peak_rss_mb",
                            "peak_mem_ratio",
                        )
                    }
                    for r in runs
                ],
            }
        )
    )


if __name__ == "__main__":
    main()
