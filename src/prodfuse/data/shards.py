"""Parquet embedding shards: a folder of `part-NNNNN.parquet` files plus `manifest.json`.

Writes are atomic (temporary name, fsync, rename, then the manifest), so a killed run never leaves a half shard
and a re-run resumes after the last shard the manifest lists. Each shard covers a contiguous range of catalog
rows (`input_start`..`input_stop`); rows that could not be embedded are listed in that shard's `rejects`.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.lib
import pyarrow.parquet as pq

from prodfuse.data.catalog import cached_file_sha256, file_sha256

MANIFEST = "manifest.json"
REJECTS = "rejects.csv"
FORMAT_VERSION = 1
# image_views: the augmented views of extraction's --views, flattened to [rows, (views - 1) * dim].
EMBEDDING_COLUMNS = ("image_embedding", "text_embedding", "image_views")
READ_BATCH_ROWS = 1000
NON_NULL_COLUMNS = EMBEDDING_COLUMNS + ("tokens", "has_text")
EMPTY_CELLS = ("", "nan", "None")  # how an empty catalog cell reads once carried into a shard column as text
# Keys of the manifest that must match for a re-run to resume instead of starting over.
RESUME_KEYS = ("catalog_sha256", "columns", "settings", "encoders")


def empty_cells(values) -> np.ndarray:
    """Per value, True where it is an empty cell: None, NaN, blank, or text in EMPTY_CELLS (a label column's empty
    cells, read back from a shard: a row that has no label, not a class)."""
    return np.array(
        [v is None or (isinstance(v, float) and v != v) or str(v).strip() in EMPTY_CELLS for v in values], dtype=bool
    )


def label_strings(values) -> np.ndarray:
    """Labels as str (an object array), an empty cell (`empty_cells`) as "": `labels == ""` is then the unlabelled
    rows."""
    return np.where(empty_cells(values), "", np.array([str(v) for v in values], dtype=object)).astype(object)


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening a directory
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_manifest(folder: str | os.PathLike, manifest: dict) -> None:
    _atomic_write_bytes(Path(folder) / MANIFEST, json.dumps(manifest, indent=1, sort_keys=False).encode())


def read_manifest(folder: str | os.PathLike) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ValueError(
            f"{str(folder)!r} is not an embedding shard folder: it has no {MANIFEST}. "
            f"Create one with `prodfuse extract --catalog CATALOG --out {folder}`."
        )
    with open(path) as f:
        return json.load(f)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def settings_difference(old: dict, new: dict) -> list[str]:
    """Human-readable list of the resume-relevant settings that differ between two manifests."""
    a = _flatten({k: old.get(k) for k in RESUME_KEYS})
    b = _flatten({k: new.get(k) for k in RESUME_KEYS})
    digest = "settings.image.weights_sha256"
    if a.get(digest) is not None and a.get(digest) == b.get(digest):
        # The same weights file seen at another path (a clone elsewhere, ../shared mounted at another place): the
        # embeddings are the same, so a cache made there stays valid here.
        for k in ("settings.weights", "settings.image.weights"):
            a.pop(k, None)
            b.pop(k, None)
    return [
        f"{k}: existing {a.get(k)!r}, requested {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
    ]


def _clear(folder: Path) -> None:
    for p in folder.iterdir():
        if p.name.startswith("part-") or p.name in (MANIFEST, REJECTS) or p.name.endswith(".tmp"):
            p.unlink()
        elif p.is_dir() and p.name in ("text_encoder", ".work"):
            shutil.rmtree(p)


def open_shards(folder: str | os.PathLike, header: dict, overwrite: bool = False) -> dict:
    """Start or resume writing a shard folder; returns the manifest to pass to `write_shard`.

    `header` holds catalog_path, catalog_sha256, columns, settings, encoders and versions. If the folder already
    has a manifest with the same settings, its complete shards are kept (resume); with different settings this
    stops with the differences unless `overwrite`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / MANIFEST).is_file():
        old = read_manifest(folder)
        diff = settings_difference(old, header)
        if diff and not any(s["rows"] for s in old["shards"]):
            # No complete shard holding a row: nothing made with the old settings is worth keeping (an interrupted
            # first run, or one that rejected every row), so the corrected rerun starts over instead of being
            # refused.
            overwrite = True
        if diff and not overwrite:
            rows = sum(s["rows"] for s in old["shards"])
            state = "complete" if old.get("complete") else "interrupted, resumable"
            raise ValueError(
                f"{str(folder)!r} already holds {len(old['shards'])} shard(s) ({rows} rows, "
                f"{state}) made with other settings:\n  "
                + "\n  ".join(diff)
                + "\nPass --overwrite to replace them, or choose another --out folder."
            )
        if diff:  # and overwrite: start over; same settings resume even with --overwrite
            _clear(folder)
        else:
            listed = {s["file"] for s in old["shards"]}
            for s in old["shards"]:
                p = folder / s["file"]
                if not p.is_file() or p.stat().st_size != s["bytes"]:
                    raise ValueError(
                        f"Shard {str(p)!r} listed in the manifest is missing or has the wrong size; "
                        f"the folder was changed by hand. Re-run with --overwrite."
                    )
            # Shards written after the last manifest update (a kill between rename and manifest) are orphans.
            for p in folder.glob("part-*"):
                if p.name not in listed:
                    p.unlink()
            for p in folder.glob("*.tmp"):
                p.unlink()
            old.update({k: header[k] for k in header if k not in RESUME_KEYS})
            # Equal settings, except perhaps where the same weights file lies now: record today's path, which
            # `--like` this folder and predictors read.
            old["settings"] = header["settings"]
            return old
    elif overwrite:
        _clear(folder)
    else:
        for p in list(folder.glob("part-*")) + list(folder.glob("*.tmp")):
            p.unlink()
    manifest = {"format_version": FORMAT_VERSION, **header, "complete": False, "shards": []}
    save_manifest(folder, manifest)
    return manifest


def next_input_row(manifest: dict) -> int:
    """The first catalog row that no complete shard covers yet."""
    return manifest["shards"][-1]["input_stop"] if manifest["shards"] else 0


def _column(name: str, values) -> pa.Array:
    if name in EMBEDDING_COLUMNS:
        arr = np.ascontiguousarray(values, dtype=np.float32)
        if arr.ndim != 2:
            raise ValueError(f"{name} must be a 2-d array [rows, dim]; got shape {arr.shape}")
        _check_finite(arr, name, "writing a shard")
        # Declared non-null (list and element): parquet then stores no per-value definition levels, which
        # makes reading these columns about 1.6x faster.
        return pa.FixedSizeListArray.from_arrays(
            pa.array(arr.reshape(-1)), type=pa.list_(pa.field("element", pa.float32(), nullable=False), arr.shape[1])
        )
    if name == "tokens":
        arr = np.ascontiguousarray(values, dtype=np.int32)
        offsets = np.arange(0, arr.size + 1, max(arr.shape[1], 1) if arr.ndim == 2 else 1, dtype=np.int32)
        if arr.ndim == 2 and arr.shape[1] == 0:
            offsets = np.zeros(arr.shape[0] + 1, dtype=np.int32)
        return pa.ListArray.from_arrays(
            pa.array(offsets), pa.array(arr.reshape(-1)), type=pa.list_(pa.field("element", pa.int32(), nullable=False))
        )
    if name == "has_text":
        return pa.array(np.asarray(values, dtype=bool))
    return pa.array([None if v is None else str(v) for v in values], type=pa.string())


def write_shard(
    folder: str | os.PathLike, manifest: dict, data: dict, input_start: int, input_stop: int, rejects: list[dict] = ()
) -> dict:
    """Atomically write the next shard and record it (with its rejects) in the manifest."""
    folder = Path(folder)
    arrays = {name: _column(name, values) for name, values in data.items()}
    table = pa.table(
        list(arrays.values()),
        schema=pa.schema([pa.field(name, a.type, nullable=name not in NON_NULL_COLUMNS) for name, a in arrays.items()]),
    )
    name = shard_name(len(manifest["shards"]))
    tmp = folder / (name + ".tmp")
    # Embeddings are dense floats: compression buys little and costs read speed, so none; no dictionaries or
    # statistics for them either (they only slow writing and reading).
    pq.write_table(
        table, tmp, compression="none", use_dictionary=False, write_statistics=False, row_group_size=max(len(table), 1)
    )
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, folder / name)
    _fsync_dir(folder)
    entry = {
        "file": name,
        "rows": len(table),
        "bytes": (folder / name).stat().st_size,
        "sha256": file_sha256(folder / name),
        "input_start": int(input_start),
        "input_stop": int(input_stop),
        "rejects": list(rejects),
    }
    manifest["shards"].append(entry)
    save_manifest(folder, manifest)
    return entry


def all_rejects(manifest: dict) -> list[dict]:
    return [r for s in manifest["shards"] for r in s["rejects"]]


def finish(folder: str | os.PathLike, manifest: dict, summary: dict | None = None) -> None:
    """Mark the folder complete and write `rejects.csv` (id, path, reason, detail) from the manifest."""
    folder = Path(folder)
    rejects = all_rejects(manifest)
    tmp = folder / (REJECTS + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "path", "reason", "detail"])
        w.writeheader()
        for r in rejects:
            w.writerow({k: r.get(k, "") for k in w.fieldnames})
    os.replace(tmp, folder / REJECTS)
    manifest["complete"] = True
    manifest["rows"] = sum(s["rows"] for s in manifest["shards"])
    manifest["rejected"] = len(rejects)
    if summary:
        manifest["summary"] = summary
    save_manifest(folder, manifest)


def _to_numpy(col: pa.ChunkedArray | pa.Array, name: str) -> np.ndarray:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    t = col.type
    if pa.types.is_fixed_size_list(t):
        values = col.values.to_numpy(zero_copy_only=False)
        return values.reshape(len(col), t.list_size)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        offsets = col.offsets.to_numpy()
        values = col.values.to_numpy(zero_copy_only=False)
        width = int(offsets[1] - offsets[0]) if len(col) else 0
        if len(col) and not np.all(np.diff(offsets) == width):
            raise ValueError(f"column {name!r} has rows of different lengths; cannot make a 2-d array")
        return values[offsets[0] : offsets[0] + width * len(col)].reshape(len(col), width)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return np.asarray(col.to_pylist(), dtype=object)
    return col.to_numpy(zero_copy_only=False)


def _check_finite(arr: np.ndarray, name: str, where: str) -> None:
    if arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
        bad = np.flatnonzero(~np.isfinite(arr).all(axis=tuple(range(1, arr.ndim))))
        raise ValueError(
            f"{name} holds non-finite values (NaN or inf) in {len(bad)} row(s), first at row {int(bad[0])}, while "
            f"{where}; an encoder produced them or the file was altered. Re-extract the catalog."
        )


def verify_shards(folder: str | os.PathLike, manifest: dict | None = None) -> None:
    """Check each shard against the manifest's size and sha256; a ValueError names the file.

    Catches a shard changed in place, truncated, swapped with another or rewritten, which parquet would read
    without complaint. Hashes are remembered per file identity (`cached_file_sha256`), so re-reads are free.
    """
    manifest = manifest or read_manifest(folder)
    paths = shard_paths(folder, manifest)
    for entry, path in zip(manifest["shards"], paths):  # the cheap checks first, from the file system
        try:
            st = path.stat()
        except OSError:
            raise ValueError(
                f"shard {str(path)!r} listed in the manifest is missing; re-run the extract command to rebuild it."
            ) from None
        if st.st_size != entry["bytes"]:
            raise ValueError(
                f"shard {str(path)!r} has {st.st_size} bytes but the manifest says {entry['bytes']} (truncated or "
                "changed after extraction); re-extract the catalog into a fresh --out folder."
            )
        if not entry.get("sha256"):  # manifests have always recorded it; a hand-made one without it cannot be verified
            raise ValueError(f"manifest entry for {str(path)!r} has no sha256; re-extract the catalog.")
    # One thread per core: hashlib releases the GIL on large blocks, so shards hash side by side (a first read of
    # 1 GB of shards spends most of its time here).
    with ThreadPoolExecutor(max(1, min(len(paths), os.cpu_count() or 1))) as pool:
        hashes = list(pool.map(cached_file_sha256, paths))
    for entry, path, actual in zip(manifest["shards"], paths, hashes):
        if actual != entry["sha256"]:
            raise ValueError(
                f"shard {str(path)!r} does not match its manifest: sha256 {actual}, manifest {entry['sha256']}. The "
                "file was changed, swapped or corrupted after extraction; re-extract the catalog into a fresh --out "
                "folder."
            )


def shard_paths(folder: str | os.PathLike, manifest: dict | None = None) -> list[Path]:
    manifest = manifest or read_manifest(folder)
    return [Path(folder) / s["file"] for s in manifest["shards"]]


def read_shards(folder: str | os.PathLike, columns: list[str] | None = None, rows=None) -> dict[str, np.ndarray]:
    """Read chosen columns of every shard (in catalog order) into numpy arrays.

    `rows`: optional global row positions (ints or a boolean mask) to keep; only shards holding them are read.
    Embedding columns come back as float32 [n, dim], `tokens` as int32 [n, 60], strings as object arrays.
    Each column is filled into one preallocated array, so peak memory stays near the result's size.
    """
    manifest = read_manifest(folder)
    if not manifest.get("complete"):
        raise ValueError(
            f"Shard folder {str(folder)!r} is incomplete (extraction was interrupted). "
            f"Re-run the same extract command to resume it."
        )
    paths = shard_paths(folder, manifest)
    verify_shards(folder, manifest)
    counts = np.array([s["rows"] for s in manifest["shards"]], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    total = int(starts[-1])
    if rows is None:
        keep = None
    else:
        rows = np.asarray(rows)
        keep = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.int64)
        order = None
        if keep.size > 1 and np.any(np.diff(keep) < 0):
            order = np.argsort(keep, kind="stable")
            keep = keep[order]
        if keep.size and (keep.min() < 0 or keep.max() >= total):
            raise ValueError(f"row positions must lie in [0, {total}); got min {keep.min()}, max {keep.max()}")
    schema = pq.read_schema(paths[0]) if paths else None
    if columns is None:
        columns = list(schema.names) if schema else []
    missing = [c for c in columns if schema is not None and c not in schema.names]
    if missing:
        raise ValueError(f"columns {missing} are not in the shards of {str(folder)!r}; they have {schema.names}")
    out: dict[str, np.ndarray] = {}
    n_out = total if keep is None else len(keep)
    plan = []  # (path, local row positions or None, first output row)
    pos = 0
    for i, path in enumerate(paths):
        local = None
        if keep is not None:
            sel = keep[(keep >= starts[i]) & (keep < starts[i + 1])]
            local = sel - starts[i]
        n = int(counts[i]) if local is None else len(local)
        if n:
            plan.append((path, local, pos))
            pos += n

    lock = threading.Lock()

    def read_into(step) -> None:
        path, local, start = step
        first = 0  # row of this shard where the current batch begins
        for batch in _batches(path, columns):
            n = batch.num_rows
            arrays = {name: _to_numpy(batch.column(name), name) for name in columns}
            for name in EMBEDDING_COLUMNS:
                if name in arrays:
                    _check_finite(arrays[name], name, f"reading {str(path)!r}")
            taken = n
            if local is not None:
                sel = local[(local >= first) & (local < first + n)] - first
                arrays = {name: arr[sel] for name, arr in arrays.items()}
                taken = len(sel)
            first += n
            with lock:  # whichever batch is read first fixes each column's dtype and width
                for name, arr in arrays.items():
                    if name not in out:
                        out[name] = np.empty((n_out,) + arr.shape[1:], dtype=arr.dtype)
            for name, arr in arrays.items():
                out[name][start : start + taken] = arr
            start += taken

    # One thread per shard rather than pyarrow's one per column: the image column is most of the work, so only
    # shards read side by side keep every core busy (1.6x faster on 2 cores).
    with ThreadPoolExecutor(max(1, min(len(plan), os.cpu_count() or 1))) as pool:
        list(pool.map(read_into, plan))
    if keep is not None and order is not None:
        # Rows were asked for out of catalog order: read in shard order, then restore the caller's order.
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        out = {k: v[inverse] for k, v in out.items()}
    for name in columns:
        if name not in out:
            dtype = {
                "image_embedding": np.float32,
                "text_embedding": np.float32,
                "image_views": np.float32,
                "tokens": np.int32,
                "has_text": bool,
            }.get(name, object)
            out[name] = np.empty((0,), dtype=dtype)
    return out


def _batches(path: Path, columns: list[str]):
    """The shard's record batches; a parquet decoding error names the shard it came from."""
    try:
        # Decoded in batches of READ_BATCH_ROWS rows that are copied into place at once: the reader then holds
        # ~20 MB of decoded rows at a time instead of a whole shard (peak memory stays near the result's size).
        yield from pq.ParquetFile(path, memory_map=True).iter_batches(
            batch_size=READ_BATCH_ROWS, columns=columns, use_threads=False
        )
    except (OSError, pyarrow.lib.ArrowException) as err:
        raise ValueError(f"shard {str(path)!r} cannot be read ({err}); re-extract the catalog.") from err


def shard_columns(folder: str | os.PathLike) -> list[str]:
    """Column names of a shard folder (empty when every row was rejected and no shard holds rows)."""
    paths = shard_paths(folder)
    return list(pq.read_schema(paths[0]).names) if paths else []
