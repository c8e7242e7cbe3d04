"""`--engine ray`: stage A of extraction (OCR + image backbone) on a Ray cluster, with Ray Data.

The catalog's rows stream through two actor pools: OCR on CPU actors (one engine, one thread each), then the image
backbone on actors that load the model once (on a GPU when `gpus_per_image_actor` > 0). Results come back to the
driver in catalog order and are saved chunk by chunk to the same `.work/` files the local engine writes, with each
chunk's OCR texts beside its embeddings, so a killed driver resumes after the last saved chunk. Stage B (fitting the
text encoder on the driver, writing shards) is the local engine's own code: the shard folder is the same.

Fault tolerance is Ray Data's default for actor pools: a dead actor is restarted and its task retried, so a killed
OCR actor costs time, never rows.

Ray is an optional extra (`pip install -e .[ray]`); nothing here imports it at module level.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass, field

import numpy as np

from prodfuse.encoders.views import recorded_crop_scale

# A row whose photo the driver can open but a worker cannot: the storage is not mounted the same on every node.
UNREADABLE_ON_WORKER = "unreadable_on_worker"
CONNECT_TIMEOUT_S = 10.0
OCR_BATCH = 8  # rows per OCR call
BLOCK_ROWS = 16  # rows per Ray block (one task): small, so a killed actor loses little work and the pools balance
MAX_BLOCKS = 20_000
# Measured here (MobileNetV2 @ 224, RapidOCR): one TensorFlow thread embeds a view in ~30 ms, a core OCRs a photo in
# ~320 ms, so a CPU backbone needs about 1/11 of a core per view for each core doing OCR.
BACKBONE_SHARE_PER_VIEW = 1 / 11


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "--engine ray needs Ray: `pip install -e .[ray]` (or `pip install 'ray[data]>=2.40'`); "
            "--engine local (the default) needs nothing more."
        ) from e
    return ray


def _check_reachable(address: str) -> None:
    """Fail within ~2 x CONNECT_TIMEOUT_S when nothing, or something that is not Ray, answers at `address`:
    ray.init itself retries for a minute or more."""
    if address in ("auto", "local"):
        return  # found through this machine's running cluster, or started: nothing to dial
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"ray_address {address!r} is not HOST:PORT, ray://HOST:PORT or auto")
    fix = "check the address and the firewall, start the cluster (`ray start --head`), or leave --ray-address unset"
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise ValueError(
            f"cannot reach the Ray cluster at {address!r} ({e or 'timed out'}; waited up to {CONNECT_TIMEOUT_S:.0f} s); {fix}"
        ) from None
    if address.startswith("ray://"):
        return
    try:
        from ray._raylet import GcsClient  # not public API: without it, ray.init's own (slow) failure stands
    except ImportError:
        return
    try:
        GcsClient(address=f"{host}:{port}").internal_kv_get(b"prodfuse-probe", None, timeout=CONNECT_TIMEOUT_S)
    except Exception as e:
        raise ValueError(
            f"cannot reach the Ray cluster at {address!r}: no Ray GCS answers there ({e}); {fix}"
        ) from None


@dataclass
class Cluster:
    """A Ray connection for one extraction: `owned` when this call started it (and so shuts it down)."""

    owned: bool
    resources: dict = field(default_factory=dict)

    def close(self) -> None:
        if self.owned:
            import ray

            ray.shutdown()


def connect(address: str | None) -> Cluster:
    """Use the caller's `ray.init` if there is one; else join `address`, or start a local cluster when None."""
    ray = import_ray()
    if ray.is_initialized():
        if address:
            raise ValueError(
                f"ray_address {address!r} given, but this process is connected to a Ray cluster already; "
                f"leave ray_address unset to use that one"
            )
        return Cluster(False, ray.cluster_resources())
    if address:
        _check_reachable(address)
    try:
        ray.init(address=address, log_to_driver=False, logging_level="WARNING", include_dashboard=False)
    except ConnectionError as e:
        raise ValueError(
            f"cannot connect to a Ray cluster at {address!r}: {e}. With auto, start one first (`ray start --head`)."
        ) from None
    return Cluster(True, ray.cluster_resources())


@dataclass(frozen=True)
class Pools:
    """Actor counts and GPUs: explicit values win; else one image actor per GPU (or one on CPUs) and OCR on the
    CPUs left."""

    image_actors: int
    ocr_actors: int
    gpus_per_image_actor: float

    @staticmethod
    def plan(resources: dict, image_actors=None, ocr_actors=None, gpus_per_image_actor=None) -> Pools:
        """OCR is the slow stage (a core reads ~4 photos/s; the backbone embeds ~50/s on one), so by default it gets
        every CPU, and CPU image actors reserve none: they share the cores as the local engine's backbone does."""
        gpus, cpus = float(resources.get("GPU", 0)), int(resources.get("CPU", 1))
        if gpus_per_image_actor is None:
            gpus_per_image_actor = 1.0 if gpus >= 1 else 0.0
        if gpus_per_image_actor > gpus:
            raise ValueError(
                f"--gpus-per-image-actor {gpus_per_image_actor} but the cluster has {gpus:g} GPUs; "
                f"use 0 to run the backbone on CPUs"
            )
        if image_actors is None:
            image_actors = max(1, int(gpus // gpus_per_image_actor)) if gpus_per_image_actor else 1
        image_cpus = image_actors if gpus_per_image_actor else 0
        if ocr_actors is None:
            ocr_actors = max(1, cpus - image_cpus)
        if ocr_actors + image_cpus > cpus:
            # Ray would wait for CPUs that never come: say so instead of hanging.
            raise ValueError(
                f"--ocr-actors {ocr_actors} (one CPU each) and {image_cpus} CPUs for GPU image actors need "
                f"{ocr_actors + image_cpus} CPUs, but the cluster has {cpus}; ask for at most {cpus - image_cpus}"
            )
        return Pools(int(image_actors), int(ocr_actors), float(gpus_per_image_actor))

    def image_threads(self, cpus: int, views: int, ocr: bool) -> int | None:
        """TensorFlow threads per CPU image actor (None on GPUs: TensorFlow's defaults). CPU image actors reserve no
        core and share them with the OCR actors, which keep every core busy: TensorFlow's default (a thread per core,
        per pool) would only contend with them, so each gets the backbone's measured share of the OCR cores. Without
        OCR the backbone is the work, and the actors split every core."""
        if self.gpus_per_image_actor:
            return None
        if not ocr:
            return max(1, int(cpus) // self.image_actors)
        return max(1, round(self.ocr_actors * views * BACKBONE_SHARE_PER_VIEW / self.image_actors))

    def record(self) -> dict:
        return {
            "image_actors": self.image_actors,
            "ocr_actors": self.ocr_actors,
            "gpus_per_image_actor": self.gpus_per_image_actor,
        }


def _readable(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            f.read(1)
        return True
    except OSError:
        return False


class OcrActor:
    """One OCR engine per actor, one thread: parallelism is the pool's size. Results go to the shared OCR cache."""

    def __init__(self, engine: str, langs, cache_dir):
        self.engine, self.langs, self.cache_dir = engine, langs, cache_dir

    def __call__(self, batch: dict) -> dict:
        from prodfuse.encoders import ocr

        paths = [str(p) for p in batch["path"]]
        results = ocr.ocr_images(paths, self.engine, self.langs, workers=1, cache_dir=self.cache_dir, progress=False)
        batch["ocr_text"] = np.array([r.text for r in results], dtype=object)
        batch["ocr_cached"] = np.array([bool(r.cached) for r in results])
        batch["ocr_error"] = np.array([r.error or "" for r in results], dtype=object)
        return batch


class ImageActor:
    """Loads the backbone once; embeds its batches exactly as the local engine does (the same decode and views)."""

    def __init__(self, settings: dict, views: int, batch_size, threads: int | None = None):
        from prodfuse.encoders import image

        self.settings, self.views, self.batch_size = settings, views, batch_size
        if threads:
            import tensorflow as tf

            # A CPU image actor reserves no core: it shares them with the OCR actors, which keep every core busy.
            # TensorFlow's default pools (one thread per core, each) would only contend with them.
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        self.model = image.backbone_from_settings(settings)
        self.dim = int(self.model.output.shape[-1])

    def __call__(self, batch: dict) -> dict:
        from prodfuse.encoders import image

        paths = [str(p) for p in batch["path"]]
        n = len(paths)
        reason = np.array([""] * n, dtype=object)
        detail = np.array([""] * n, dtype=object)
        emb = np.zeros((n, self.views * self.dim), np.float32)
        ok = []
        for j, (path, seen) in enumerate(zip(paths, batch["driver_sees"])):
            if seen and not _readable(path):
                reason[j], detail[j] = UNREADABLE_ON_WORKER, f"{path} on {socket.gethostname()}"
            else:
                ok.append(j)
        for local_idx, e, bad in image.iter_image_embeddings(
            self.model,
            [paths[j] for j in ok],
            int(self.settings["image_size"]),
            batch_size=self.batch_size,
            progress=False,
            views=self.views,
            crop_scale=recorded_crop_scale(self.settings),
        ):
            for k, row in enumerate(local_idx):
                emb[ok[row]] = e[k].reshape(-1)
            for row, why, more in bad:
                reason[ok[row]], detail[ok[row]] = why, more
        batch["emb"] = emb
        batch["reason"] = reason
        batch["detail"] = detail
        return batch


@contextlib.contextmanager
def _in_order_quietly():
    """Ray Data's (driver-wide) context switched, for one run only, to rows in catalog order and no Ray progress
    bars (ours stand instead); restored after."""
    import ray

    ctx = ray.data.DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
    ctx.execution_options.preserve_order, ctx.enable_progress_bars = True, False
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved


class TextActor:
    """The shard folder's fitted text encoder (MiniLM), loaded once per actor."""

    def __init__(self, folder: str):
        from prodfuse.encoders.text import load_text_encoder

        self.encoder = load_text_encoder(folder)

    def __call__(self, batch: dict) -> dict:
        return {"emb": self.encoder.encode([str(t) for t in batch["text"]])}


def iter_text_embeddings(folder, chunk_texts: list[list[str]], pools: Pools, dim: int):
    """Yield each chunk's text embeddings [n, dim], in order, from one TextActor pool (on the image actors' GPUs)
    that loads the shard folder's fitted encoder once for the whole run."""
    import ray

    texts = [{"text": t} for chunk in chunk_texts for t in chunk]
    if not texts:
        yield from (np.zeros((0, dim), np.float32) for _ in chunk_texts)
        return
    with _in_order_quietly():
        ds = ray.data.from_items(texts, override_num_blocks=min(max(1, len(texts) // 256), MAX_BLOCKS))
        ds = ds.map_batches(
            TextActor,
            fn_constructor_args=(str(folder),),
            batch_size=256,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=pools.image_actors),
            num_cpus=1 if pools.gpus_per_image_actor else 0,
            num_gpus=pools.gpus_per_image_actor,
        )
        batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
        pending = np.zeros((0, dim), np.float32)
        for chunk in chunk_texts:
            while len(pending) < len(chunk):
                pending = np.concatenate([pending, next(batches)["emb"]])
            yield pending[: len(chunk)]
            pending = pending[len(chunk) :]


def run_stage_a(job, pools: Pools, cpus: int, batch_size, ocr_cache, progress: bool, stop=None):
    """Embed and OCR every chunk of `job` without a saved `.work/` file; read the OCR of those already saved.
    `cpus`: the cluster's CPU count (its image actors' thread budget). Returns the extraction's StageA, as the local
    engine does."""
    import ray

    from prodfuse.extraction.chunks import StageA, check_stop, chunk_ocr
    from prodfuse.progress import progress_bar

    out = StageA()
    todo: list[int] = []  # chunk numbers still to compute
    for k, (s, _) in enumerate(job.chunks):
        path = job.chunk_file(s)
        saved = chunk_ocr(path) if path.is_file() else None
        if saved is not None:  # a chunk saved by this engine: its OCR is inside
            _collect_ocr(out, saved)
            out.resumed_chunks += 1
            continue
        if path.is_file():  # saved by the local engine (no OCR inside): redo it here
            path.unlink()
        todo.append(k)
    items = [
        {"row": i, "path": job.paths[i], "driver_sees": os.path.exists(job.paths[i])}
        for k in todo
        for i in range(*job.chunks[k])
        if job.path_rejects[i] is None
    ]
    expected = {k: sum(job.path_rejects[i] is None for i in range(*job.chunks[k])) for k in todo}
    order = iter(todo)
    k = next(order, None)
    if items:
        settings, views = job.settings, job.views
        threads = pools.image_threads(cpus, views, settings["ocr"] != "none")
        # Rows come back in catalog order, so chunks complete one after another.
        bar = progress_bar(len(items), "ray OCR+images", "img", enabled=progress)
        with _in_order_quietly(), contextlib.closing(bar):
            blocks = min(max(1, len(items) // BLOCK_ROWS), MAX_BLOCKS)
            ds = ray.data.from_items(items, override_num_blocks=blocks)
            if settings["ocr"] != "none":
                ds = ds.map_batches(
                    OcrActor,
                    fn_constructor_args=(settings["ocr"], settings["ocr_lang"], ocr_cache),
                    batch_size=OCR_BATCH,
                    batch_format="numpy",
                    compute=ray.data.ActorPoolStrategy(size=pools.ocr_actors),
                    num_cpus=1,
                )
            ds = ds.map_batches(
                ImageActor,
                fn_constructor_args=(settings, views, batch_size, threads),
                batch_size=max(1, int(batch_size or 64) // views),
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=pools.image_actors),
                num_cpus=1 if pools.gpus_per_image_actor else 0,
                num_gpus=pools.gpus_per_image_actor,
            )
            pending: list[dict] = []
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                check_stop(stop)
                n = len(batch["row"])
                pending += [_row(batch, j) for j in range(n)]
                bar.update(n)
                while k is not None and len(pending) >= expected[k]:
                    rows, pending = pending[: expected[k]], pending[expected[k] :]
                    _finish_chunk(out, job, job.chunks[k], rows)
                    k = next(order, None)
    while k is not None:  # chunks whose every row was rejected on the driver
        _finish_chunk(out, job, job.chunks[k], [])
        k = next(order, None)
    return out


def _row(batch: dict, j: int) -> dict:
    ocr = "ocr_text" in batch  # absent with --ocr none
    return {
        "row": int(batch["row"][j]),
        "emb": batch["emb"][j],
        "reason": str(batch["reason"][j]),
        "detail": str(batch["detail"][j]),
        "ocr_text": str(batch["ocr_text"][j]) if ocr else "",
        "ocr_cached": bool(batch["ocr_cached"][j]) if ocr else False,
        "ocr_error": str(batch["ocr_error"][j]) if ocr else "",
    }


def _finish_chunk(out, job, chunk: tuple[int, int], rows: list[dict]) -> None:
    """Save one `.work/` chunk as the local engine does, plus its OCR results, so a resumed run need not ask the
    cluster again."""
    from prodfuse.extraction.chunks import save_chunk

    s, e = chunk
    got = [r["row"] for r in rows]
    if got != sorted(got) or any(not s <= i < e for i in got):
        raise RuntimeError(f"rows of chunk {s}..{e} came back out of order: {got[:5]}...")
    ok = [r for r in rows if not r["reason"]]
    shape = (len(ok), job.image_dim) if job.views == 1 else (len(ok), job.views, job.image_dim)
    emb = np.stack([r["emb"] for r in ok]).reshape(shape) if ok else np.zeros(shape, np.float32)
    rejects = job.driver_rejects(s, e) + [job.reject(r["row"], r["reason"], r["detail"]) for r in rows if r["reason"]]
    ocr = {key: [r[f"ocr_{key}"] for r in rows] for key in ("text", "cached", "error")}
    save_chunk(job.chunk_file(s), np.asarray([r["row"] for r in ok], np.int64), emb, rejects, ocr={"rows": got, **ocr})
    out.embedded_images += len(ok) * job.views
    _collect_ocr(out, {"rows": got, **ocr})


def _collect_ocr(out, ocr: dict) -> None:
    for i, text, cached, error in zip(ocr["rows"], ocr["text"], ocr["cached"], ocr["error"]):
        out.ocr_texts[i] = text
        out.ocr_stats["cache_hits"] += bool(cached)
        out.ocr_stats["with_words"] += bool(text)
        if error:
            out.ocr_errors[i] = error
