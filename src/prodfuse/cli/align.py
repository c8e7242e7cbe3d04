"""`prodfuse align`: the joint image-text space (two projection towers, contrastive loss)."""

from __future__ import annotations

import argparse

from prodfuse.cli.common import check_shard_folders, default, make_config
from prodfuse.retrieval.config import AlignConfig

HELP = "train the joint space where a product's text and photo lie close (for text -> photo search)"


def add_args(p: argparse.ArgumentParser) -> None:
    d = lambda name: default(AlignConfig, name)  # noqa: E731
    p.add_argument("--embeddings", required=True, help="shard folder with image and text embeddings")
    p.add_argument("--out", required=True, help="align run folder to write (e.g. runs/NAME-align)")
    p.add_argument(
        "--val-embeddings", default=None, help="validation shards (default: the split column, or a seeded 10%%)"
    )
    p.add_argument("--split-col", default=None, help="split column (default: the one recorded at extraction)")
    p.add_argument("--dim", type=int, default=d("dim"), help=f"joint space width (default {d('dim')})")
    p.add_argument(
        "--hidden", type=int, default=d("hidden"), help=f"hidden units per tower, 0 for linear (default {d('hidden')})"
    )
    p.add_argument("--epochs", type=int, default=d("epochs"), help=f"at most this many epochs (default {d('epochs')})")
    p.add_argument("--patience", type=int, default=d("patience"), help="early stopping on validation loss")
    p.add_argument(
        "--batch-size", type=int, default=d("batch_size"), help="pairs per batch: each item's negatives are the rest"
    )
    p.add_argument("--lr", type=float, default=d("lr"))
    p.add_argument("--seed", type=int, default=d("seed"))
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def config(args: argparse.Namespace) -> AlignConfig:
    return make_config(AlignConfig, args, verbose=0 if args.quiet else 2)


def check(cfg: AlignConfig) -> None:
    """The shard folders, before TensorFlow loads."""
    check_shard_folders(embeddings=cfg.embeddings, val_embeddings=cfg.val_embeddings)


def run(cfg: AlignConfig, stop=None) -> int:
    from prodfuse.retrieval.align import align

    r = align(cfg)
    m = r["metrics"]
    print(
        f"\naligned {r['rows']['train']} pairs ({r['rows']['source']}) in {r['train_seconds']} s, {r['epochs_run']} epochs; temperature {r['temperature']:.4f}"
    )
    print(f"  validation ({m['val_items']} items, each query against all of them):")
    for name in ("text_to_image", "image_to_text", "chance"):
        v = m[name]
        print(
            f"    {name:14s} R@1 {v['recall@1']:.3f}  R@5 {v['recall@5']:.3f}  R@10 {v['recall@10']:.3f}  MRR {v['mrr']:.3f}"
        )
    print(f"  run: {r['out']}  (index it: prodfuse index --space joint --run {r['out']} --embeddings ...)")
    return 0
