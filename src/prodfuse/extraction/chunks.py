"""Stage A's hand-over: the `.work/` image chunks an interrupted extraction resumes from, the Job both engines
(local and ray) work on, and the StageA result they return to stage B.

A chunk is one future shard (--shard-rows, 10,000 by default). The local engine also checkpoints a long chunk in
pieces of CHECKPOINT_ROWS rows (`.work/rows-START-STOP.npz`), merged into the chunk file when the chunk is done: a
Ctrl-C keeps the photos embedded up to the last piece, whatever the shard size.
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from prodfuse.data.catalog import PATH_REJECT_DETAILS
from prodfuse.extraction.config import ExtractionStopped

# Rows per image checkpoint within a chunk: a few seconds of backbone work on a CPU, a small file each.
CHECKPOINT_ROWS = 256


def chunk_file(folder: Path, k: int) -> Path:
    return folder / ".work" / f"images-{k:05d}.npz"


def piece_file(folder: Path, start: int, stop: int) -> Path:
    return folder / ".work" / f"rows-{start:09d}-{stop:09d}.npz"


def _rows_in(path: Path) -> int:
    """Catalog rows a saved chunk or piece covers: its embedded rows and its rejects."""
    with np.load(path) as z:
        return len(z["index"]) + len(json.loads(str(z["rejects"])))


def merge_pieces(path: Path, pieces: list[Path]) -> None:
    """Save the chunk file `path` from its pieces, in order, then delete them (a kill in between leaves pieces
    beside a saved chunk: the chunk wins and they are deleted on resume)."""
    parts = []
    for piece in pieces:
        with np.load(piece) as z:
            parts.append((z["index"], z["emb"], json.loads(str(z["rejects"]))))
    save_chunk(
        path,
        np.concatenate([p[0] for p in parts]),
        np.concatenate([p[1] for p in parts]),
        [r for p in parts for r in p[2]],
    )
    for piece in pieces:
        piece.unlink(missing_ok=True)


def kept_work(folder: str | os.PathLike) -> dict:
    """What an interrupted extraction left in `folder` for its resume: complete shards and their rows, and the
    catalog rows whose photos are checkpointed in `.work/` (embedded or rejected)."""
    folder = Path(folder)
    shards, shard_rows = 0, 0
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        shards = len(manifest.get("shards", []))
        shard_rows = sum(s["input_stop"] - s["input_start"] for s in manifest.get("shards", []))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    rows = 0
    for path in sorted((folder / ".work").glob("*.npz")) if (folder / ".work").is_dir() else []:
        try:
            rows += _rows_in(path)
        except (OSError, ValueError, KeyError):
            continue  # a file cut short by a kill: its rows are embedded again
    return {"shards": shards, "shard_rows": shard_rows, "checkpoint_rows": rows}


def save_chunk(path: Path, index: np.ndarray, emb: np.ndarray, rejects: list[dict], ocr: dict | None = None) -> None:
    """`ocr` (the ray engine's): the chunk's OCR results, so a resumed run need not ask the cluster again."""
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    extra = {"ocr": np.array(json.dumps(ocr))} if ocr is not None else {}
    np.savez(tmp, index=index, emb=emb, rejects=np.array(json.dumps(rejects)), **extra)
    os.replace(tmp, path)


def load_chunk(path: Path) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """A chunk's embedded rows, their embeddings and its rejects (its OCR, if any: chunk_ocr)."""
    with np.load(path) as z:
        return z["index"], z["emb"], json.loads(str(z["rejects"]))


def chunk_index(path: Path) -> list[int]:
    with np.load(path) as z:  # an .npz reads only the arrays asked for: not the embeddings here
        return z["index"].tolist()


def chunk_ocr(path: Path) -> dict | None:
    """The OCR results saved with a chunk (the ray engine's chunks), or None."""
    with np.load(path) as z:
        return json.loads(str(z["ocr"])) if "ocr" in z.files else None


def check_stop(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise ExtractionStopped(
            "extraction stopped on request; complete shards and the image checkpoints in .work/ are kept, run it "
            "again to resume"
        )


@dataclass(frozen=True)
class Job:
    """What either engine's stage A works on: the catalog's chunks still to write, and how to record a row."""

    out: Path
    chunks: list[tuple[int, int]]  # catalog row ranges, one per future shard
    shard_rows: int
    ids: list
    paths: list[str]
    path_rejects: list[str | None]  # the driver's reason per row (None: the image is for the engine to read)
    settings: dict
    image_dim: int
    views: int

    def chunk_file(self, start: int) -> Path:
        return chunk_file(self.out, start // self.shard_rows)

    def pieces(self, start: int, end: int) -> list[tuple[int, int]]:
        """The checkpoint pieces of chunk start..end: the chunk itself when it is no longer than CHECKPOINT_ROWS."""
        return [(s, min(s + CHECKPOINT_ROWS, end)) for s in range(start, end, CHECKPOINT_ROWS)]

    def piece_file(self, start: int, end: int) -> Path:
        return piece_file(self.out, start, end)

    def checkpointed_rows(self, pieces: bool = True) -> int:
        """Catalog rows of the chunks still to write whose photos a previous run saved in `.work/`."""
        rows = 0
        for s, e in self.chunks:
            if self.chunk_file(s).is_file():
                rows += e - s
            elif pieces:
                rows += sum(pe - ps for ps, pe in self.pieces(s, e) if self.piece_file(ps, pe).is_file())
        return rows

    def reject(self, i: int, reason: str, detail: str = "") -> dict:
        return {"id": self.ids[i], "path": self.paths[i], "reason": reason, "detail": detail}

    def driver_rejects(self, start: int, end: int) -> list[dict]:
        return [
            self.reject(i, self.path_rejects[i], PATH_REJECT_DETAILS.get(self.path_rejects[i], ""))
            for i in range(start, end)
            if self.path_rejects[i] is not None
        ]


@dataclass
class StageA:
    """What stage A hands to stage B: OCR text per catalog row, OCR counts and errors, images embedded."""

    ocr_texts: dict[int, str] = field(default_factory=dict)
    ocr_stats: Counter = field(default_factory=Counter)
    ocr_errors: dict[int, str] = field(default_factory=dict)
    embedded_images: int = 0
    resumed_chunks: int = 0  # chunks whose images an interrupted run had embedded
