"""The `prodfuse` command: one subcommand per step; the top-level scripts call into it."""

from __future__ import annotations

import argparse
import os
import sys


def _extract(args):
    from .extract import print_extract_summary, run_extract
    summary = run_extract(args)
    print_extract_summary(args.out, summary)


def _train(args):
    from .train import print_train_summary, run_train
    print_train_summary(run_train(args))


def _evaluate(args):
    from .evaluate import run_evaluate
    run_evaluate(args)


def _predict(args):
    from .predict import run_predict
    run_predict(args)


def _compare(args):
    from .compare import run_compare
    run_compare(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prodfuse", description="Multimodal product classification.")
    sub = parser.add_subparsers(dest="command", required=True)
    from .extract import add_extract_args
    p = sub.add_parser("extract", help="catalog -> OCR + image/text embeddings -> parquet shards")
    add_extract_args(p)
    p.set_defaults(func=_extract)
    for name, module, func, help_ in (
            ("train", "train", _train, "shards -> fusion MLP run folder"),
            ("evaluate", "evaluate", _evaluate, "metrics, ablation and calibration of a run"),
            ("predict", "predict", _predict, "top-k labels for a new catalog or shards"),
            ("compare", "compare", _compare, "unimodal vs fusion models on the same splits")):
        try:
            mod = __import__(f"prodfuse.{module}", fromlist=["add_args"])
        except ImportError:  # a step that is not built yet
            continue
        p = sub.add_parser(name, help=help_)
        mod.add_args(p)
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ValueError as e:
        # Our errors say what was wrong and how to fix it; a traceback would only bury that.
        if os.environ.get("PRODFUSE_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
