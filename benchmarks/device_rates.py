"""Rates for the capacity plan: the image backbone's photos/s on the accelerator, and the CPU's photos/s per core
for decode + resize and for RapidOCR, over 1..N worker processes.

    python benchmarks/device_rates.py [--csv ../shared/data/grocery/train.csv] [--weights MOBILENET_V2.h5]
        [--photos 150] [--batches 64,256,1024] [--procs 1,2,4,8,16] [--ocr-per-proc 30] [--quick]

On `--photos` grocery photos spread evenly over the csv (it is sorted by class, so fruit, vegetables and packages
all come in):

- backbone: keras.applications MobileNetV2 (the `--weights` file) and ResNet50 (RANDOM weights: a throughput
            figure only) @ 224, include_top=False, pooling='avg', built as `build_backbone` builds them (raw RGB
            in, `preprocess_input` inside in float32, float32 embeddings out), in float32 and in mixed bfloat16.
            A uint8 batch of the photos (tiled to the batch size) is put on the device once; the compiled
            forward pass (jax.jit of `stateless_call`, or tf.function) is called back to back, 3 timed rounds
            of about `--seconds` each after its first call (the compile, reported apart); photos/s is the
            median round; also with the uint8 batch copied from host memory before each call. It runs on whatever Keras backend is set (KERAS_BACKEND) and prints the device.
            float32 runs at the backend's default precision (JAX on a GPU lets convolutions use TF32).
- decode:   `load_image(path, 224)` (PIL decode with JPEG draft, whole photo resized bilinearly) in 1 and N
            spawn processes; the pixels stay in the worker (extraction decodes in threads beside the model).
- OCR:      prodfuse's own OCR worker (`ocr._worker_init`: BLAS/OpenMP pools at 1 thread, RapidOCR with one
            onnxruntime thread, no angle classifier) in 1, 2, 4, ... spawn processes, NO cache: every photo is
            read. Each process builds its engine and reads one photo before the clock starts (a barrier); each
            process count reads whole passes over the photos, at least `--ocr-per-proc` per process, taken
            from a shared queue one photo at a time.

Progress goes to stderr; the figures to stdout, the last line one JSON object.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DEFAULT_CSV = SHARED / "data" / "grocery" / "train.csv"
DEFAULT_WEIGHTS = SHARED / "models" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
IMAGE_SIZE = 224
# The same variables the OCR workers pin to 1 (prodfuse.encoders.ocr._THREAD_ENV), for the decode workers.
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")

sys.path.insert(0, str(ROOT / "src"))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def read_photos(csv_path: Path, n: int) -> list[str]:
    """`n` image paths spread evenly over the csv, made absolute."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    step = len(rows) / min(n, len(rows))
    return [str((csv_path.parent / rows[int(i * step)]["image_path"]).resolve()) for i in range(min(n, len(rows)))]


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ------------------------------------------------------------------------------------------------ backbone


def build_model(name: str, weights, precision: str):
    """As prodfuse's build_backbone, with the mixed policy given by name (it offers float32 / mixed_float16)."""
    import keras

    from prodfuse.encoders.image import BACKBONES, ImagenetPreprocess

    previous = keras.config.dtype_policy()
    if precision != "float32":
        keras.config.set_dtype_policy(precision)
    try:
        backbone = getattr(keras.applications, BACKBONES[name][1])(
            include_top=False, weights=weights, input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3), pooling="avg"
        )
    finally:
        keras.config.set_dtype_policy(previous)
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3), name="image")
    x = backbone(ImagenetPreprocess(name, dtype="float32", name="preprocess")(inputs))
    x = keras.layers.Activation("linear", dtype="float32", name="to_float32")(x)
    return keras.Model(inputs, x)


def compiled_forward(model):
    """(put: numpy -> device array, forward: device batch -> embeddings, wait: block on a list of outputs)."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]
        step = jax.jit(lambda t, nt, x: model.stateless_call(t, nt, x, training=False)[0])
        return jax.device_put, lambda x: step(trainable, non_trainable, x), jax.block_until_ready
    if backend == "tensorflow":
        import tensorflow as tf

        step = tf.function(lambda x: model(x, training=False))
        # One stream: the last output is ready after the others.
        return lambda a: tf.identity(tf.constant(a)), step, lambda outs: outs[-1].numpy()
    raise SystemExit(f"backend {backend!r} is not supported here: use KERAS_BACKEND=jax or tensorflow")


def device_name() -> str:
    import keras

    if keras.backend.backend() == "jax":
        import jax

        d = jax.devices()[0]
        return f"jax {jax.__version__}: {d.platform} {getattr(d, 'device_kind', d)} (x{jax.device_count()})"
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return f"tensorflow {tf.__version__}: GPU {details.get('device_name', gpus[0].name)} (x{len(gpus)})"
    return f"tensorflow {tf.__version__}: CPU ({os.cpu_count()} cores)"


def time_backbone(fns, pixels: np.ndarray, batch: int, seconds: float, rounds: int = 3) -> dict:
    """photos/s of back-to-back forward passes on one batch already on the device (`img_s`, median of `rounds`
    rounds of about `seconds`), and with the uint8 batch copied from host memory before each pass (`h2d_img_s`)."""
    put, forward, wait = fns
    host = np.resize(pixels, (batch, *pixels.shape[1:]))  # the photos tiled to `batch`
    x = put(host)
    t = time.perf_counter()
    wait([forward(x)])
    first = time.perf_counter() - t
    t = time.perf_counter()
    wait([forward(x)])
    reps = max(3, math.ceil(seconds / max(time.perf_counter() - t, 1e-6)))
    rates = {"img_s": [], "h2d_img_s": []}
    for _ in range(rounds):
        for key, call in (("img_s", lambda: forward(x)), ("h2d_img_s", lambda: forward(put(host)))):
            t = time.perf_counter()
            wait([call() for _ in range(reps)])
            rates[key].append(batch * reps / (time.perf_counter() - t))
    out = {key: statistics.median(v) for key, v in rates.items()}
    return {**out, "min": min(rates["img_s"]), "max": max(rates["img_s"]), "calls": reps, "first_s": first}


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)))


# ------------------------------------------------------------------------------------------------ CPU workers
# Spawned processes import this file as __mp_main__: its top level stays light (no Keras, no TensorFlow).

_WORK = None


def _init_decode(barrier, warm_path: str) -> None:
    global _WORK
    try:
        for name in THREAD_ENV:
            os.environ[name] = "1"
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # load_image's module imports Keras: keep its backend off the GPU
        os.environ["JAX_PLATFORMS"] = "cpu"
        from prodfuse.encoders.image import load_image

        _WORK = lambda path: load_image(path, IMAGE_SIZE).shape[0]  # noqa: E731  (pixels stay here)
        _WORK(warm_path)
        barrier.wait()
    except BaseException:
        barrier.abort()
        raise


def _init_ocr(barrier, warm_path: str) -> None:
    global _WORK
    try:
        from prodfuse.encoders import ocr

        ocr._worker_init("rapidocr", ocr.resolve_langs("rapidocr", None))  # 1 thread, as extraction's workers
        _WORK = lambda path: ocr._worker_task((0, path))[1:]  # noqa: E731  (text, error)
        text, error = _WORK(warm_path)
        if error:
            raise RuntimeError(error)
        barrier.wait()
    except BaseException:
        barrier.abort()
        raise


def _task(path: str):
    return _WORK(path)


def time_pool(init, procs: int, jobs: list[str]) -> tuple[float, list]:
    """Wall seconds for `procs` spawned, warmed workers to run every job (one at a time from a shared queue)."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(procs + 1)
    pool = ctx.Pool(procs, initializer=init, initargs=(barrier, jobs[0]))
    try:
        barrier.wait(timeout=300)  # every worker built and warmed
        t = time.perf_counter()
        out = list(pool.imap_unordered(_task, jobs, chunksize=1))
        return time.perf_counter() - t, out
    finally:
        pool.terminate()
        pool.join()


def jobs_for(paths: list[str], procs: int, per_proc: int) -> list[str]:
    """Whole passes over the photos, at least `per_proc` photos per process."""
    return paths * max(1, math.ceil(procs * per_proc / len(paths)))


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv", default=str(DEFAULT_CSV), help="grocery csv (image_path relative to it)")
    ap.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="MobileNetV2 no-top .h5 weights")
    ap.add_argument("--photos", type=int, default=150)
    ap.add_argument("--batches", default="64,256,1024", help="backbone batch sizes")
    ap.add_argument("--precisions", default="float32,mixed_bfloat16")
    ap.add_argument("--models", default="mobilenet_v2,resnet50")
    ap.add_argument("--seconds", type=float, default=0.5, help="backbone: length of one timed round")
    ap.add_argument("--procs", default="1,2,4,8,16", help="OCR process counts")
    ap.add_argument("--decode-procs", default=None, help="decode process counts (default 1 and the CPU count)")
    ap.add_argument("--decode-per-proc", type=int, default=600)
    ap.add_argument("--ocr-per-proc", type=int, default=30)
    ap.add_argument("--skip", default="", help="comma list of stages to skip: backbone, decode, ocr")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 20 photos, batches 2,4, 1-2 processes")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if args.quick:
        args.photos, args.batches, args.seconds, args.procs = 20, "2,4", 0.2, "1,2"
        args.decode_per_proc, args.ocr_per_proc = 40, 5
    decode_procs = [int(p) for p in (args.decode_procs or f"1,{cores}").split(",")]
    if args.quick:
        decode_procs = [1, min(2, cores)]
    skip = {s for s in args.skip.split(",") if s}
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    paths = read_photos(Path(args.csv), args.photos)
    result = {
        "benchmark": "device_rates",
        "photos": len(paths),
        "host": platform.node(),
        "cpu": cpu_model(),
        "cores": cores,
    }
    log(f"{len(paths)} photos; CPU {result['cpu']}, {cores} cores")

    if "backbone" not in skip:
        import keras

        from prodfuse.encoders.image import load_image

        pixels = np.stack([load_image(p, IMAGE_SIZE) for p in paths])
        result["backend"] = keras.backend.backend()
        result["device"] = device_name()
        if result["backend"] == "jax":
            import jax

            result["jax_default_matmul_precision"] = str(jax.config.jax_default_matmul_precision)
        log(f"backbone on {result['device']}")
        figures, with_h2d, firsts, embeddings = {}, {}, {}, {}
        for name in args.models.split(","):
            for precision in args.precisions.split(","):
                weights = args.weights if name == "mobilenet_v2" else None
                model = build_model(name, weights, precision)
                fns = compiled_forward(model)
                for batch in (int(b) for b in args.batches.split(",")):
                    r = time_backbone(fns, pixels, batch, args.seconds)
                    key = f"{name}/{precision}/{batch}"
                    figures.setdefault(name, {}).setdefault(precision, {})[str(batch)] = round(r["img_s"], 1)
                    with_h2d[key] = round(r["h2d_img_s"], 1)
                    firsts[key] = round(r["first_s"], 2)
                    log(
                        f"  {name:<13}{precision:<16}batch {batch:>5}: {r['img_s']:9.1f} photos/s "
                        f"({r['min']:.1f}-{r['max']:.1f}, {r['calls']} calls a round; first call {r['first_s']:.1f} s); "
                        f"with the host-to-device copy {r['h2d_img_s']:.1f}"
                    )
                put, forward, _ = fns  # after the timings, so the first call of the first batch size is the compile
                embeddings[(name, precision)] = np.asarray(forward(put(pixels[:64])), dtype=np.float32)
                del model, fns
        result["backbone_img_s"] = figures
        result["backbone_img_s_with_h2d_copy"] = with_h2d
        result["backbone_first_call_s"] = firsts
        weights = {"mobilenet_v2": Path(args.weights).name, "resnet50": "random (throughput only)"}
        result["backbone_weights"] = {name: weights.get(name, "random") for name in args.models.split(",")}
        mixed = [p for p in args.precisions.split(",") if p != "float32"]
        if "float32" in args.precisions.split(",") and mixed and "mobilenet_v2" in args.models.split(","):
            # Only the loaded weights compare: each random ResNet50 is a different network.
            result["mixed_vs_f32_min_cosine_mobilenet_v2"] = round(
                min_cosine(embeddings[("mobilenet_v2", mixed[0])], embeddings[("mobilenet_v2", "float32")]), 4
            )

    if "decode" not in skip:
        rates = {}
        for procs in decode_procs:
            jobs = jobs_for(paths, procs, args.decode_per_proc)
            seconds, _ = time_pool(_init_decode, procs, jobs)
            rates[str(procs)] = round(len(jobs) / seconds, 1)
            log(f"  decode+resize, {procs:>2} processes: {rates[str(procs)]:8.1f} photos/s ({len(jobs)} photos)")
        result["decode_img_s"] = rates

    if "ocr" not in skip:
        ocr, base = {}, None
        for procs in (int(p) for p in args.procs.split(",")):
            if procs > cores:
                log(f"  OCR, {procs} processes: skipped, only {cores} cores")
                continue
            jobs = jobs_for(paths, procs, args.ocr_per_proc)
            seconds, out = time_pool(_init_ocr, procs, jobs)
            errors = [e for _, e in out if e]
            if errors:
                raise RuntimeError(f"OCR failed on {len(errors)} photos, e.g. {errors[0]}")
            rate = len(jobs) / seconds
            base = base or rate / procs  # per-process rate of the first count (1 process by default)
            ocr[str(procs)] = {
                "img_s": round(rate, 2),
                "per_proc_img_s": round(rate / procs, 2),
                "scaling_vs_1": round(rate / base, 2),
                "efficiency": round(rate / base / procs, 3),
                "photos": len(jobs),
                "seconds": round(seconds, 1),
                "with_text": sum(1 for text, _ in out if text),
            }
            log(
                f"  OCR, {procs:>2} processes: {rate:7.2f} photos/s, {rate / procs:.2f} per process ({len(jobs)} photos)"
            )
        result["ocr"] = ocr

    print(f"\n{result['photos']} photos; CPU {result['cpu']}, {cores} cores")
    if "backbone_img_s" in result:
        print(f"backbone photos/s on {result['device']} (median of 3 rounds, first call excluded):")
        for name, by_precision in result["backbone_img_s"].items():
            for precision, by_batch in by_precision.items():
                cells = "  ".join(f"batch {b:>4}: {v:>9.1f}" for b, v in by_batch.items())
                print(f"  {name:<13}{precision:<16}{cells}")
        if "resnet50" in result["backbone_img_s"]:
            print("  (resnet50 has random weights: a throughput figure only)")
    if "decode_img_s" in result:
        print("decode+resize photos/s: " + ", ".join(f"{p} proc {v}" for p, v in result["decode_img_s"].items()))
    if result.get("ocr"):
        print(f"{'OCR (rapidocr)':<16}{'photos/s':>10}{'per proc':>10}{'vs 1 proc':>11}{'efficiency':>12}")
        for procs, r in result["ocr"].items():
            print(
                f"  {procs:>2} processes{r['img_s']:>12.2f}{r['per_proc_img_s']:>10.2f}{r['scaling_vs_1']:>11.2f}"
                f"{r['efficiency']:>12.3f}"
            )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
