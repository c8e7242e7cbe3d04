"""Extraction: catalog -> OCR + image backbone + text encoder -> parquet embedding shards.

Two stages, both resumable:
  A. image embeddings, chunk by chunk (one chunk = one future shard), saved to `.work/` in the output folder,
     while OCR runs over the same images in worker processes (OCR is the slowest stage, so it overlaps);
  B. once every OCR text is known: fit the text encoder and vocabulary (or load them: resume, `--like`), then
     encode each chunk's text and write its shard atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

import numpy as np

from . import shards
from .catalog import Columns, add_column_args, columns_from_args, file_sha256, present_text_columns, read_catalog, \
    resolve_image_paths

DEMO_OUT = Path("embeddings") / "demo"
DEFAULTS = {"backbone": "resnet50", "weights": "imagenet", "image_size": 224, "precision": "float32",
            "text_encoder": "tfidf", "text_model": None, "ocr": "rapidocr", "ocr_lang": None, "shard_rows": 10_000,
            "text_cols": "title,description", "views": "auto"}
# Settings that `--like` copies from another shard folder (everything that changes the numbers).
LIKE_KEYS = ("backbone", "weights", "image_size", "precision", "text_encoder", "text_model", "ocr", "ocr_lang",
             "text_cols", "views")
# --views auto: augmented views for catalogs up to this many rows. Small catalogs are where augmentation pays
# (grocery, 2,640 photos: +7 points) and where 6x the backbone time is minutes; big ones have data enough.
AUTO_VIEWS_MAX_ROWS = 5000


def add_extract_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--catalog", help="CSV, parquet or JSON Lines catalog; omitted: the built-in demo catalog")
    p.add_argument("--out", help="shard folder (default embeddings/demo for the demo; required otherwise)")
    p.add_argument("--backbone", choices=["resnet50", "mobilenet_v2", "efficientnet_b0"],
                   help="ImageNet image backbone (default resnet50)")
    p.add_argument("--weights", help="imagenet | none | PATH to a local no-top .h5/.weights.h5 (default imagenet)")
    p.add_argument("--image-size", type=int, help="square input size of the backbone (default 224)")
    p.add_argument("--precision", choices=["float32", "mixed_float16"], help="mixed_float16 on a GPU")
    p.add_argument("--batch-size", type=int, default=None, help="images per backbone batch (default 64 CPU, 256 GPU)")
    p.add_argument("--views", help=f"image views embedded per photo, 1..6: the whole photo, then crops of 80%% of "
                                   f"it (training draws one per epoch, prediction averages them). auto (default): "
                                   f"6 for catalogs of up to {AUTO_VIEWS_MAX_ROWS:,} rows, else 1")
    p.add_argument("--text-encoder", choices=["minilm", "tfidf", "none"], help="default tfidf (offline)")
    p.add_argument("--text-model", help="sentence-transformers name or local folder (minilm only)")
    p.add_argument("--ocr", choices=["rapidocr", "tesseract", "easyocr", "none"], help="default rapidocr")
    p.add_argument("--ocr-lang", help="comma list of OCR languages (engine default when omitted)")
    p.add_argument("--ocr-workers", type=int, default=None, help="OCR processes (default: number of cores)")
    p.add_argument("--ocr-cache", default=None, help="OCR cache folder (default ~/.cache/prodfuse/ocr)")
    p.add_argument("--shard-rows", type=int, help="rows per parquet shard (default 10000)")
    p.add_argument("--like", help="copy every setting and the fitted text encoder from this shard folder")
    p.add_argument("--overwrite", action="store_true", help="replace shards made with other settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_column_args(p)
    # text-cols takes its default from DEFAULTS/--like, so an explicit value can be told apart.
    p.set_defaults(text_cols=None)


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("prodfuse", "tensorflow", "keras", "numpy", "pyarrow", "scikit-learn", "sentence-transformers",
                "rapidocr_onnxruntime", "pytesseract"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def resolve_settings(args: argparse.Namespace) -> dict:
    """Explicit flags, else the --like folder's settings, else defaults; a flag that contradicts --like is an error."""
    like = shards.read_manifest(args.like)["settings"] if args.like else {}
    out = {}
    for key, default in DEFAULTS.items():
        given = getattr(args, key, None)
        if key in LIKE_KEYS and like:
            if given is not None and given != like.get(key):
                raise ValueError(f"--{key.replace('_', '-')} {given!r} contradicts --like {args.like!r}, which was "
                                 f"made with {like.get(key)!r}. Drop the flag to embed exactly like that folder.")
            out[key] = like.get(key, 1 if key == "views" else None)  # shards from before --views had one
        else:
            out[key] = given if given is not None else default
    if out["weights"] not in ("imagenet", "none"):
        out["weights"] = str(Path(out["weights"]).expanduser().resolve())  # the same file from any working dir
    if out["shard_rows"] < 1:
        raise ValueError(f"--shard-rows must be >= 1; got {out['shard_rows']}")
    if out["image_size"] < 32:
        raise ValueError(f"--image-size must be >= 32; got {out['image_size']}")
    out["views"] = parse_views(out["views"])
    return out


def parse_views(value) -> int | str:
    """"auto" or an int in 1..MAX_VIEWS (flags arrive as text)."""
    from .image_encoders import MAX_VIEWS
    if value == "auto":
        return value
    try:
        views = int(value)
    except (TypeError, ValueError):
        views = None
    if views is None or str(views) != str(value).strip() or not 1 <= views <= MAX_VIEWS:
        raise ValueError(f"--views must be auto or an int in 1..{MAX_VIEWS}; got {value!r}")
    return views


def resolve_views(views: int | str, rows: int) -> int:
    from .image_encoders import MAX_VIEWS
    if views != "auto":
        return int(views)
    return MAX_VIEWS if rows <= AUTO_VIEWS_MAX_ROWS else 1


def _chunk_file(folder: Path, k: int) -> Path:
    return folder / ".work" / f"images-{k:05d}.npz"


def _save_chunk(path: Path, index: np.ndarray, emb: np.ndarray, rejects: list[dict]) -> None:
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, index=index, emb=emb, rejects=np.array(json.dumps(rejects)))
    os.replace(tmp, path)


def _load_chunk(path: Path) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    with np.load(path) as z:
        return z["index"], z["emb"], json.loads(str(z["rejects"]))


def _save_text_state(folder: Path, encoder, vocab: list[str]) -> None:
    from .text_encoders import save_vocabulary
    encoder.save(folder)
    save_vocabulary(folder, vocab)


def _load_text_state(folder: Path):
    from .text_encoders import load_text_encoder, load_vocabulary
    return load_text_encoder(folder), load_vocabulary(folder)


def _has_text_state(folder: Path) -> bool:
    from .text_encoders import ENCODER_SUBDIR, VOCAB_FILE
    return (folder / ENCODER_SUBDIR).is_dir() and (folder / VOCAB_FILE).is_file()


def _reject(ids, paths, i, reason, detail="") -> dict:
    return {"id": ids[i], "path": paths[i], "reason": reason, "detail": detail}


def run_extract(args: argparse.Namespace) -> dict:
    from . import image_encoders, ocr, text_encoders

    demo = args.catalog is None
    if demo:
        from .demo import write_demo_catalog
        args.catalog = str(write_demo_catalog())
        args.out = args.out or str(DEMO_OUT)
        # The demo's random-weight backbone gains nothing from augmented views; one view keeps it about a minute.
        args.views = args.views or "1"
        print(f"demo mode: catalog {args.catalog} -> {args.out}", file=sys.stderr)
    if not args.out:
        raise ValueError("--out is required with --catalog (e.g. --out embeddings/NAME)")
    settings = resolve_settings(args)
    args.text_cols = settings["text_cols"]
    cols: Columns = columns_from_args(args)
    progress = not args.no_progress
    out = Path(args.out)

    df = read_catalog(args.catalog, cols, require_label=cols.label is not None)
    text_cols = present_text_columns(df, cols)
    if not text_cols and settings["ocr"] == "none" and settings["text_encoder"] != "none" and not args.like:
        raise ValueError(f"The catalog has none of the text columns {list(cols.text)} and OCR is off, so there is no "
                         f"text to encode. Pass --text-cols with existing columns, turn OCR on, or use "
                         f"--text-encoder none.")
    paths, path_rejects = resolve_image_paths(df, args.catalog, cols.image)
    ids = df[cols.id].tolist()
    n = len(df)
    settings["views"] = views = resolve_views(settings["views"], n)

    # Random weights (--weights none, or the demo's fallback) must be the same random weights on every run, or a
    # resumed extraction would mix embeddings from two different networks.
    import keras
    keras.utils.set_random_seed(0)
    model = image_encoders.build_backbone(settings["backbone"], settings["weights"], settings["image_size"],
                                          settings["precision"], allow_random_fallback=demo)
    image_dim = int(model.output.shape[-1])
    like_folder = Path(args.like) if args.like else None
    encoder_source = like_folder if like_folder else None
    if encoder_source is not None and not _has_text_state(encoder_source):
        raise ValueError(f"--like {args.like!r} holds no fitted text encoder/vocabulary; re-extract it first.")
    text_kind = settings["text_encoder"]
    # Built (not fitted) before the header so its width is known; --like brings the fitted one.
    if encoder_source is not None:
        encoder, vocab = _load_text_state(encoder_source)
    else:
        encoder, vocab = text_encoders.make_text_encoder(text_kind, model=settings["text_model"]), None
    header = {
        "catalog_path": str(Path(args.catalog).resolve()),
        "catalog_sha256": file_sha256(args.catalog),
        "columns": {"id": cols.id, "image": cols.image, "text": list(text_cols), "label": cols.label,
                    "split": cols.split if cols.split in df.columns else None},
        "settings": {**{k: v for k, v in settings.items() if k != "shard_rows"},
                     "shard_rows": settings["shard_rows"],
                     "image": image_encoders.image_settings(settings["backbone"], settings["weights"],
                                                            settings["image_size"], settings["precision"]),
                     "ocr_filter": ocr.ocr_settings(settings["ocr"], settings["ocr_lang"]) if settings["ocr"] != "none"
                     else None,
                     "like": str(like_folder.resolve()) if like_folder else None},
        "encoders": {"image": {"backbone": settings["backbone"], "dim": image_dim, "views": views},
                     "text": {"kind": text_kind, "model": settings["text_model"], "dim": encoder.dim},
                     "tokens": {"length": text_encoders.SEQUENCE_LENGTH, "vocab_size": text_encoders.VOCAB_SIZE}},
        "versions": _versions(),
    }
    manifest = shards.open_shards(out, header, overwrite=args.overwrite)
    start = shards.next_input_row(manifest)
    shard_rows = settings["shard_rows"]
    chunks = [(s, min(s + shard_rows, n)) for s in range(start, n, shard_rows)]
    t0 = time.perf_counter()

    # Text state already fitted (resume, or --like): only the rows still to write need OCR.
    state_ready = encoder_source is not None or _has_text_state(out)
    ocr_from = start if state_ready else 0
    ocr_rows = [i for i in range(ocr_from, n) if path_rejects[i] is None]
    ocr_texts = [""] * n
    ocr_stats = Counter()
    pool = ThreadPoolExecutor(max_workers=1)
    ocr_future = None
    if settings["ocr"] != "none" and ocr_rows:
        ocr_future = pool.submit(ocr.ocr_images, [paths[i] for i in ocr_rows], engine=settings["ocr"],
                                 langs=settings["ocr_lang"], workers=args.ocr_workers, cache_dir=args.ocr_cache,
                                 progress=progress)

    # Stage A: image embeddings per chunk (skipped for chunks already saved by an interrupted run).
    embedded_images = 0
    try:
        for k, (s, e) in enumerate(chunks):
            path = _chunk_file(out, s // shard_rows)
            if path.is_file():
                continue
            ok_rows = [i for i in range(s, e) if path_rejects[i] is None]
            rejects = [_reject(ids, paths, i, path_rejects[i]) for i in range(s, e) if path_rejects[i] is not None]
            idx_parts, emb_parts = [], []
            for local_idx, emb, bad in image_encoders.iter_image_embeddings(
                    model, [paths[i] for i in ok_rows], settings["image_size"], batch_size=args.batch_size,
                    progress=progress, views=views):
                idx_parts.append(np.asarray([ok_rows[j] for j in local_idx], dtype=np.int64))
                emb_parts.append(emb)
                rejects += [_reject(ids, paths, ok_rows[j], reason, detail) for j, reason, detail in bad]
            index = np.concatenate(idx_parts) if idx_parts else np.zeros(0, np.int64)
            emb = np.concatenate(emb_parts) if emb_parts else \
                np.zeros((0, image_dim) if views == 1 else (0, views, image_dim), np.float32)
            embedded_images += len(index) * views
            _save_chunk(path, index, emb, rejects)
        if ocr_future is not None:
            results = ocr_future.result()
            for i, r in zip(ocr_rows, results):
                ocr_texts[i] = r.text
                ocr_stats["cache_hits"] += bool(r.cached)
                ocr_stats["with_words"] += bool(r.text)
                ocr_stats["errors"] += r.error is not None
    finally:
        pool.shutdown(wait=True)
    image_seconds = time.perf_counter() - t0

    texts = [text_encoders.join_text([df[c].iat[i] for c in text_cols] + [ocr_texts[i]]) for i in range(n)]

    # Stage B: text encoder + vocabulary, then one shard per chunk.
    if encoder_source is not None:
        if not _has_text_state(out):
            _save_text_state(out, encoder, vocab)
    elif _has_text_state(out):
        encoder, vocab = _load_text_state(out)
    else:
        encoder.fit([t for t in texts if t])
        vocab = text_encoders.fit_vocabulary([t for t in texts if t])
        _save_text_state(out, encoder, vocab)

    carried = [c for c in df.columns if c not in text_cols]
    rows_written = 0
    for s, e in chunks:
        path = _chunk_file(out, s // shard_rows)
        index, emb, rejects = _load_chunk(path)
        rows = index.tolist()
        chunk_texts = [texts[i] for i in rows]
        data = {c: [str(df[c].iat[i]) if df[c].iat[i] is not None else None for i in rows] for c in carried}
        if views > 1:  # view 0 (the whole photo) is the image embedding; the augmented views sit beside it
            data["image_embedding"] = emb[:, 0]
            data["image_views"] = emb[:, 1:].reshape(len(emb), (views - 1) * image_dim)
        else:
            data["image_embedding"] = emb
        text_emb = encoder.encode(chunk_texts)
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

    rejects = shards.all_rejects(manifest)
    total_rows = sum(sh["rows"] for sh in manifest["shards"])
    seconds = time.perf_counter() - t0
    summary = {
        "input_rows": n, "embedded_rows": total_rows, "rejected_rows": len(rejects),
        "rejected_by_reason": dict(Counter(r["reason"] for r in rejects)),
        "embedded_this_run": rows_written,
        "with_text_this_run": int(sum(bool(texts[i]) for s, e in chunks for i in range(s, e))),
        "ocr": {"engine": settings["ocr"], "images": len(ocr_rows), **ocr_stats},
        "images_per_s": round(embedded_images / image_seconds, 1) if embedded_images else None,
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


def print_extract_summary(out: str, summary: dict) -> None:
    rej = ", ".join(f"{k} {v}" for k, v in sorted(summary["rejected_by_reason"].items())) or "none"
    o = summary["ocr"]
    print(f"\nextracted {summary['embedded_rows']} of {summary['input_rows']} rows into {out} "
          f"({summary['embedded_this_run']} this run, {summary['seconds']} s)")
    print(f"  rejected: {summary['rejected_rows']} ({rej}); see {Path(out) / shards.REJECTS}")
    print(f"  with text: {summary['with_text_this_run']} of {summary['embedded_this_run']} written this run")
    if o["engine"] != "none":
        print(f"  OCR ({o['engine']}): {o['images']} images, {o.get('with_words', 0)} with words, "
              f"{o.get('cache_hits', 0)} from cache, {o.get('errors', 0)} errors")
    if summary["images_per_s"]:
        print(f"  images/s (backbone stage incl. decode): {summary['images_per_s']}")
