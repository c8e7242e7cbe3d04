"""`prodfuse index`: a FAISS index of a shard folder's items in one space."""

from __future__ import annotations

import argparse

from prodfuse.cli.common import check_shard_folders, make_config
from prodfuse.retrieval.config import INDEX_TYPES, SPACES, IndexConfig

HELP = "build a similarity index (image, text, fused or joint space) over extracted shards"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embeddings", default=None, help="shard folder to index")
    p.add_argument("--space", default="image", choices=SPACES, help="vectors to index (default image)")
    p.add_argument("--run", default=None, help="training run (space fused) or align run (space joint)")
    p.add_argument("--out", required=True, help="index folder (e.g. indexes/NAME); replaced atomically")
    p.add_argument(
        "--index-type",
        default="auto",
        choices=INDEX_TYPES,
        help="auto: exact below 50,000 items, IVF-Flat below 5 million, IVF-PQ above (hnsw on request)",
    )
    p.add_argument(
        "--add",
        action="append",
        default=[],
        metavar="DIR",
        help="append these shards (repeatable): to the index at --out, or with --embeddings to the index built from it",
    )


def config(args: argparse.Namespace) -> IndexConfig:
    return make_config(IndexConfig, args, add=tuple(args.add))


def check(cfg: IndexConfig) -> None:
    """The shard folders, before TensorFlow loads."""
    check_shard_folders(embeddings=cfg.embeddings)
    for folder in cfg.add:
        check_shard_folders(add=folder)


def run(cfg: IndexConfig, stop=None) -> int:
    from prodfuse.retrieval.index import describe, query_hint
    from prodfuse.retrieval.search import build_index

    m = build_index(cfg)
    left = m.get("left_out") or {}
    extra = f"; left out {left}" if any(left.values()) else ""
    print(
        f"\nindexed {m['added_now']} items ({m['count']} in all) in the {m['space']} space: {m['dim']}-d, "
        f"{describe(m)}{extra}"
    )
    print(f"  index: {m['out']}  (query it: prodfuse search --index {m['out']} {query_hint(m)})")
    return 0
