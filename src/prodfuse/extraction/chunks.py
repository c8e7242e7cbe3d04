"""Stage A's hand-over: the `.work/` image chunks an interrupted extraction resumes from, the Job both engines
(local and ray) work on, and the StageA result they return to stage B."""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from prodfuse.extraction.config import ExtractionStopped


def chunk_file(folder: Path, k: int) -> Path:
    return folder / ".work" / f"images-{k:05d}.npz"


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
        raise ExtractionStopped("extraction stopped on request; complete shards are kept, run it again to resume")


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

    def reject(self, i: int, reason: str, detail: str = "") -> dict:
        return {"id": self.ids[i], "path": self.paths[i], "reason": reason, "detail": detail}

    def driver_rejects(self, start: int, end: int) -> list[dict]:
        return [self.reject(i, self.path_rejects[i]) for i in range(start, end) if self.path_rejects[i] is not None]


@dataclass
class StageA:
    """What stage A hands to stage B: OCR text per catalog row, OCR counts and errors, images embedded."""

    ocr_texts: dict[int, str] = field(default_factory=dict)
    ocr_stats: Counter = field(default_factory=Counter)
    ocr_errors: dict[int, str] = field(default_factory=dict)
    embedded_images: int = 0
    resumed_chunks: int = 0  # chunks whose images an interrupted run had embedded
