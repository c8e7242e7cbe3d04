"""A FAISS inner-product index over L2-normalised product vectors, kept in a folder with a manifest.

The folder holds `index.faiss`, `items.parquet` (row i of the index is row i here: id, label, text, image path)
and `manifest.json` (space, run, source shards and their manifest's sha256, count, dimension, index type and
parameters, and the sha256 of index.faiss, checked on load). A save writes a new folder beside the old one and
swaps the two, so a reader never sees half an index.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from prodfuse.data.catalog import file_sha256
from prodfuse.retrieval.config import INDEX_TYPES
from prodfuse.version import __version__

INDEX_FILE, ITEMS_FILE, MANIFEST_FILE = "index.faiss", "items.parquet", "manifest.json"
FORMAT_VERSION = 1
# Chosen by size (benchmarks/retrieval.py, 1M clustered 256-d vectors): exact search answers a query over 50,000
# vectors in a few ms, and it is the only type whose results are exact. Above that, IVF-Flat (~4 sqrt(n) k-means
# lists, `nprobe` of them scanned per query, full vectors) measured recall@10 0.9999 at 28x the exact index's
# batched and ~200x its single-query speed, built in ~40 s at 1,036 bytes/vector; HNSW (M 32, efConstruction 200)
# reached recall 0.989 at 9x batched, built in 865 s at 1,296 bytes/vector, so it is there on request only. Above
# ~5 million the raw vectors outgrow a machine's memory, so IVF-PQ stores compressed codes (recall is then lower:
# measure it with the benchmark's --also ivfpq).
FLAT_MAX = 50_000
IVF_MAX = 5_000_000
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 200, 64
PQ_MIN_TRAIN = 256 * 39
IVF_MIN_TRAIN = 16 * 39  # 16 lists, each trained on at least 39 vectors (faiss warns below that)


# What an index of each space can be searched with (QueryEmbedder.embed): an id always, then a photo and/or words.
QUERIES = {
    "image": ("id", "image"),
    "text": ("id", "text"),
    "fused": ("id", "image", "text"),
    "joint": ("id", "image", "text"),
}
QUERY_FLAGS = {"id": "--id ID", "image": "--image PATH", "text": "--text WORDS"}


def describe(manifest: dict) -> str:
    """ "flat (exact)" or "ivfflat nlist=256, nprobe=8": an index's type and parameters, for a summary line."""
    params = manifest.get("params") or {}
    detail = ", ".join(f"{k}={v}" for k, v in params.items()) if params else "exact"
    return f"{manifest['index_type']} ({detail})"


def query_hint(manifest: dict) -> str:
    """The search flags an index answers: `--id ID | --image PATH` for an image index."""
    return " | ".join(QUERY_FLAGS[q] for q in QUERIES.get(manifest.get("space"), ("id",)))


def choose_index_type(n: int) -> str:
    return "flat" if n < FLAT_MAX else "ivfflat" if n < IVF_MAX else "ivfpq"


def _nlist(n: int) -> int:
    # ~4 sqrt(n) lists, each trained on at least 39 vectors
    return int(max(16, min(65536, 4 * np.sqrt(max(n, 1)), n // 39)))


def index_params(kind: str, n: int, dim: int) -> dict:
    """The parameters a new index of `kind` gets for `n` vectors of `dim` (written to the manifest)."""
    if kind == "flat":
        return {}
    if kind == "ivfflat":
        nlist = _nlist(n)
        # 8 lists of ~4,000 at 1M scan 0.2% of the vectors; more lists (larger catalogs) get proportionally more
        return {"nlist": nlist, "nprobe": min(nlist, max(8, nlist // 512))}
    if kind == "hnsw":
        return {"M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": HNSW_EF_SEARCH}
    if kind == "ivfpq":
        nlist = _nlist(n)
        # sub-quantizers: a divisor of dim with at least 4 dimensions each (one byte per sub-quantizer and vector)
        m = next((s for s in (64, 32, 16, 8, 4, 2) if dim % s == 0 and 4 * s <= dim), 1)
        return {"nlist": nlist, "m": m, "nbits": 8, "nprobe": max(1, nlist // 64)}
    raise ValueError(f"index type must be one of {list(INDEX_TYPES)}; got {kind!r}")


def normalise(vectors) -> np.ndarray:
    """Float32 C-contiguous copy with rows scaled to unit length (inner product = cosine). A zero row is refused:
    it has no direction (an item without text in the text space is left out before this)."""
    x = np.array(vectors, dtype=np.float32, order="C", copy=True)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise ValueError(f"vectors must be 2-d [n, dim]; got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1)
    bad = np.flatnonzero(~np.isfinite(norms) | (norms == 0))
    if len(bad):
        raise ValueError(f"{len(bad)} vectors are zero or not finite (first at row {int(bad[0])}); cannot index them")
    x /= norms[:, None]
    return x


def _new_faiss(kind: str, params: dict, dim: int, train: np.ndarray):
    import faiss

    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["ef_construction"]
        index.hnsw.efSearch = params["ef_search"]
        return index
    quantizer = faiss.IndexFlatIP(dim)
    if kind == "ivfflat":
        index = faiss.IndexIVFFlat(quantizer, dim, params["nlist"], faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = 10  # coarse lists only route queries: 10 k-means rounds recall as well as 25, in half the time
    else:
        index = faiss.IndexIVFPQ(
            quantizer, dim, params["nlist"], params["m"], params["nbits"], faiss.METRIC_INNER_PRODUCT
        )
    # k-means wants ~40 points per list; a seeded sample keeps training time bounded and repeatable.
    rng = np.random.default_rng(0)
    sample = train[rng.choice(len(train), min(len(train), 64 * params["nlist"]), replace=False)]
    index.train(sample)
    index.nprobe = params["nprobe"]
    return index


def _search_params(index, params: dict) -> None:
    """Search-time settings are not all stored by faiss.write_index (efSearch is); set them after loading."""
    if "nprobe" in params:
        index.nprobe = params["nprobe"]
    if "ef_search" in params:
        index.hnsw.efSearch = params["ef_search"]


@dataclass
class Index:
    """An index in memory: the faiss index, one row of `items` per vector, and the manifest."""

    faiss_index: object
    items: pd.DataFrame
    manifest: dict
    path: Path | None = None
    _row_of: dict = field(default_factory=dict, repr=False)

    # ----------------------------------------------------------------------------------------- build / load

    @classmethod
    def build(cls, vectors, items: pd.DataFrame, manifest: dict, index_type: str = "auto") -> "Index":
        """Index `vectors` (normalised here); `items` has an "id" column and one row per vector; `manifest` holds
        what describes them (space, run, sources), and gets count, dim, type and parameters."""
        if index_type not in INDEX_TYPES:
            raise ValueError(f"index type must be one of {list(INDEX_TYPES)}; got {index_type!r}")
        x = normalise(vectors)
        n, dim = x.shape
        if n == 0:
            raise ValueError("no vectors to index: the shards hold no item with a vector in this space")
        if len(items) != n or "id" not in items.columns:
            raise ValueError(f"items must have an 'id' column and {n} rows (one per vector); got {len(items)}")
        kind = choose_index_type(n) if index_type == "auto" else index_type
        params = index_params(kind, n, dim)
        if kind == "ivfpq" and n < PQ_MIN_TRAIN:
            raise ValueError(
                f"an ivfpq index needs at least {PQ_MIN_TRAIN} vectors to train its codebooks (256 codes x 39); "
                f"got {n}. Use --index-type flat or hnsw."
            )
        if kind == "ivfflat" and n < IVF_MIN_TRAIN:
            raise ValueError(
                f"an ivfflat index needs at least {IVF_MIN_TRAIN} vectors to train its lists (16 lists x 39); "
                f"got {n}. Use --index-type flat."
            )
        start = time.perf_counter()
        index = _new_faiss(kind, params, dim, x)
        index.add(x)
        full = {
            "format_version": FORMAT_VERSION,
            "versions": {"prodfuse": __version__},
            **manifest,
            "count": int(n),
            "dim": int(dim),
            "index_type": kind,
            "params": params,
            "metric": "inner product of L2-normalised vectors (cosine)",
            "build_seconds": round(time.perf_counter() - start, 2),
        }
        return cls(index, items.reset_index(drop=True), full)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Index":
        import faiss

        path = Path(path)
        mpath = path / MANIFEST_FILE
        if not mpath.is_file():
            raise ValueError(
                f"{str(path)!r} is not an index folder: it has no {MANIFEST_FILE}. Build one with `prodfuse index`."
            )
        try:
            manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{str(mpath)!r} is damaged ({e}); rebuild the index with `prodfuse index`") from None
        ipath = path / INDEX_FILE
        if not ipath.is_file() or not (path / ITEMS_FILE).is_file():
            raise ValueError(
                f"index folder {str(path)!r} lacks {INDEX_FILE} or {ITEMS_FILE}; rebuild it with `prodfuse index`"
            )
        digest = file_sha256(ipath)
        if digest != manifest.get("index_sha256"):
            raise ValueError(
                f"{str(ipath)!r} is damaged or was replaced: its sha256 {digest[:12]}... is not the manifest's "
                f"{str(manifest.get('index_sha256'))[:12]}...; rebuild the index with `prodfuse index`"
            )
        try:
            index = faiss.read_index(str(ipath))
        except RuntimeError as e:
            raise ValueError(f"{str(ipath)!r} cannot be read by faiss ({str(e).splitlines()[0]}); rebuild it") from None
        items = pd.read_parquet(path / ITEMS_FILE)
        if index.ntotal != manifest.get("count") or index.d != manifest.get("dim") or len(items) != index.ntotal:
            raise ValueError(
                f"index folder {str(path)!r} is inconsistent: index holds {index.ntotal} vectors of {index.d}-d, "
                f"items.parquet {len(items)} rows, manifest {manifest.get('count')} of {manifest.get('dim')}-d; rebuild it"
            )
        _search_params(index, manifest.get("params", {}))
        return cls(index, items, manifest, path)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the folder atomically: into a sibling temporary folder, then swapped in place of `path`."""
        import faiss

        path = Path(path)
        if path.exists() and not (path / MANIFEST_FILE).is_file() and any(path.iterdir()):
            raise ValueError(f"{str(path)!r} exists and is not an index folder; choose another --out")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()
        try:
            faiss.write_index(self.faiss_index, str(tmp / INDEX_FILE))
            self.items.to_parquet(tmp / ITEMS_FILE, index=False)
            self.manifest["index_sha256"] = file_sha256(tmp / INDEX_FILE)
            self.manifest["items_sha256"] = file_sha256(tmp / ITEMS_FILE)
            (tmp / MANIFEST_FILE).write_text(json.dumps(self.manifest, indent=1))
            old = None
            if path.exists():
                old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
                os.replace(path, old)
            os.replace(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.path = path
        return path

    # ----------------------------------------------------------------------------------------------- use

    @property
    def space(self) -> str:
        return self.manifest.get("space", "?")

    @property
    def dim(self) -> int:
        return int(self.faiss_index.d)

    def __len__(self) -> int:
        return int(self.faiss_index.ntotal)

    def add(self, vectors, items: pd.DataFrame, source: dict | None = None) -> int:
        """Append vectors and their items (ids already in the index are refused); returns how many were added."""
        x = normalise(vectors)
        if x.shape[1] != self.dim:
            raise ValueError(f"vectors to add have {x.shape[1]} dimensions; this {self.space} index holds {self.dim}-d")
        if len(items) != len(x):
            raise ValueError(f"items has {len(items)} rows for {len(x)} vectors")
        dupes = sorted(set(items["id"].astype(str)) & set(self.items["id"].astype(str)))
        if dupes:
            raise ValueError(f"{len(dupes)} ids are already in the index (first {dupes[:3]}); add only new items")
        self.faiss_index.add(x)
        self.items = pd.concat([self.items, items.reset_index(drop=True)], ignore_index=True)
        self._row_of = {}
        self.manifest["count"] = len(self)
        if source:
            self.manifest.setdefault("added", []).append(source)
        return len(x)

    def row_of(self, item_id) -> int:
        if not self._row_of:
            self._row_of = {str(v): i for i, v in enumerate(self.items["id"].astype(str))}
        key = str(item_id)
        if key not in self._row_of:
            raise ValueError(
                f"id {item_id!r} is not in this index ({len(self)} items, e.g. {self.items['id'].iloc[0]!r})"
            )
        return self._row_of[key]

    def vector(self, item_id) -> np.ndarray:
        """The stored vector of an indexed item (approximate for ivfpq, whose codes are compressed)."""
        row = self.row_of(item_id)
        if hasattr(self.faiss_index, "make_direct_map"):
            self.faiss_index.make_direct_map()
        return self.faiss_index.reconstruct(row)

    def search(self, queries, k: int = 10, space: str | None = None, exclude: list | None = None) -> list[pd.DataFrame]:
        """For each query vector ([dim] or [q, dim], normalised here), a table of its k nearest items: rank, score
        (cosine), and the items' columns. `space` names the space the queries were embedded in and must match the
        index's; `exclude[i]` is an id left out of query i's answers (the query item itself)."""
        from prodfuse.checks import check_range

        check_range("k", k, 1, 10_000, integer=True)
        if space is not None and space != self.space:
            raise ValueError(f"query vectors are in the {space!r} space but this index holds {self.space!r} vectors")
        q = normalise(queries)
        if q.shape[1] != self.dim:
            raise ValueError(
                f"query has {q.shape[1]} dimensions but this {self.space!r} index holds {self.dim}-d vectors; "
                f"embed the query in the index's space"
            )
        if len(self) == 0:
            raise ValueError("the index is empty")
        extra = 1 if exclude is not None else 0
        scores, rows = self.faiss_index.search(q, min(k + extra, len(self)))
        out = []
        for i in range(len(q)):
            keep = rows[i] >= 0
            r, s = rows[i][keep], scores[i][keep]
            table = self.items.iloc[r].reset_index(drop=True)
            table.insert(0, "score", np.round(s.astype(np.float64), 6))
            if exclude is not None and exclude[i] is not None:
                table = table[table["id"].astype(str) != str(exclude[i])].reset_index(drop=True)
            table = table.head(k)
            table.insert(0, "rank", np.arange(1, len(table) + 1))
            out.append(table)
        return out
