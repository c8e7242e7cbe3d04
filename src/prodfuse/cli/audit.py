"""`prodfuse audit`: near-duplicate listings within a catalog or between two (train/test leakage)."""

from __future__ import annotations

import argparse

from prodfuse.cli.common import default, make_config
from prodfuse.retrieval.config import AuditConfig

HELP = "near-duplicate pairs and groups within shards, or between two shard folders"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embeddings", required=True, help="shard folder to audit")
    p.add_argument("--against", default=None, help="a second shard folder (e.g. train, when --embeddings is test)")
    p.add_argument(
        "--threshold",
        type=float,
        default=default(AuditConfig, "threshold"),
        help="image cosine at or above which two items pair (default 0.95)",
    )
    p.add_argument("--text-threshold", type=float, default=None, help="also require this text cosine")
    p.add_argument("--out", required=True, help="folder for pairs.csv, groups.csv, summary.json")


def config(args: argparse.Namespace) -> AuditConfig:
    return make_config(AuditConfig, args)


def run(cfg: AuditConfig, stop=None) -> int:
    from prodfuse.retrieval.duplicates import audit

    s = audit(cfg)
    where = f"{s['items']} items against {s['against_items']}" if s["against"] else f"{s['items']} items"
    print(
        f"\naudited {where}: {s['pairs']} near-duplicate pairs (image cosine >= {s['threshold']}"
        + (f", text >= {s['text_threshold']}" if s["text_threshold"] is not None else "")
        + f") in {s['groups']} groups"
    )
    if s.get("pairs_with_different_labels") is not None:
        print(f"  pairs whose labels differ: {s['pairs_with_different_labels']}")
    if s["against"]:
        print(f"  items with a near duplicate in {s['against']}: {s['items_with_a_duplicate_in_against']}")
    print(f"  {s['out']}/pairs.csv, groups.csv, summary.json")
    return 0
