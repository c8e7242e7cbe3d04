"""`prodfuse search`: the nearest products to an indexed item, a new photo or words."""

from __future__ import annotations

import argparse

from prodfuse.cli.common import add_trust_pickle, make_config
from prodfuse.retrieval.config import SearchConfig

HELP = "similar products: nearest items of an index to an id, a photo or a text"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", required=True, help="index folder written by `prodfuse index`")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--id", default=None, help="an indexed item's id")
    q.add_argument("--image", default=None, help="a photo (image, joint and fused indexes)")
    q.add_argument("--text", default=None, help="words (text, joint and fused indexes)")
    p.add_argument("--k", type=int, default=10, help="results (default 10)")
    p.add_argument("--out", default=None, help="also write the results to this CSV")
    add_trust_pickle(p)


def config(args: argparse.Namespace) -> SearchConfig:
    return make_config(SearchConfig, args)


def run(cfg: SearchConfig, stop=None) -> int:
    import pandas as pd

    from prodfuse.retrieval.search import search

    table = search(cfg)
    shown = table.copy()
    if "text" in shown:
        shown["text"] = shown["text"].astype(str).str.slice(0, 60)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 60):
        print(shown.to_string(index=False))
    if cfg.out:
        print(f"  results: {cfg.out}")
    return 0
