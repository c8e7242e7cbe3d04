"""The library calls behind `prodfuse index` and `prodfuse search`."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from prodfuse.retrieval.config import IndexConfig, SearchConfig
from prodfuse.retrieval.index import MANIFEST_FILE, Index
from prodfuse.retrieval.spaces import QueryEmbedder, space_vectors


def build_index(cfg: IndexConfig) -> dict:
    """Build the index at cfg.out from cfg.embeddings (replacing any index there), then append the cfg.add
    folders; without cfg.embeddings, append them to the index already at cfg.out. Returns its manifest plus
    "added_now"."""
    if cfg.embeddings:
        vectors, items, info = space_vectors(cfg.embeddings, cfg.space, cfg.run, cfg.batch_size)
        index = Index.build(vectors, items, info, cfg.index_type)
        added = len(index)
    else:
        if not (Path(cfg.out) / MANIFEST_FILE).exists():
            raise ValueError(f"no index at {cfg.out!r} to add to; build it first with --embeddings")
        index, added = Index.load(cfg.out), 0
    for folder in cfg.add:
        space, run = index.manifest["space"], index.manifest.get("run")
        vectors, items, info = space_vectors(folder, space, run, cfg.batch_size)
        if info["extraction"]["encoders"] != index.manifest["extraction"]["encoders"]:
            raise ValueError(
                f"shards {folder!r} were made with other encoders than the index's: "
                f"{info['extraction']['encoders']} vs {index.manifest['extraction']['encoders']}"
            )
        source = {k: info[k] for k in ("embeddings", "shards_manifest_sha256")} | {"count": len(items)}
        added += index.add(vectors, items, source) if len(items) else 0
    index.save(cfg.out)
    return {**index.manifest, "added_now": added, "out": str(cfg.out)}


def search(cfg: SearchConfig, index: Index | None = None, embedder: QueryEmbedder | None = None) -> pd.DataFrame:
    """The k nearest items to the query: rank, score, id, label, text, image_path (written to cfg.out too)."""
    index = index or Index.load(cfg.index)
    if cfg.id is not None:
        table = index.search(index.vector(cfg.id), cfg.k, exclude=[cfg.id])[0]
    else:
        embedder = embedder or QueryEmbedder(index.manifest, cfg.ocr_workers, cfg.trust_pickle)
        vector = embedder.embed(image=cfg.image, text=cfg.text)
        table = index.search(vector, cfg.k)[0]
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(cfg.out, index=False)
    return table
