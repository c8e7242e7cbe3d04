"""What every command shares: flags -> config objects, the column flags, flag names in error messages."""

from __future__ import annotations

import argparse
import dataclasses


class ConfigError(ValueError):
    """A flag value that a config refused; main() exits 2 with it before any work starts."""


def default(cls, name: str):
    return {f.name: f.default for f in dataclasses.fields(cls)}[name]


def flag_message(cls, message: str) -> str:
    """Config errors name the field ("epochs must be ..."); on the command line, name the flag (--epochs)."""
    first = message.split(" ", 1)[0]
    if first in {f.name for f in dataclasses.fields(cls)}:
        return "--" + first.replace("_", "-") + message[len(first) :]
    return message


def make_config(cls, args: argparse.Namespace, **overrides):
    """cls(**the flags that are fields of cls, **overrides); a refused value becomes a ConfigError naming the flag."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values.update(overrides)
    try:
        return cls(**values)
    except ValueError as e:
        raise ConfigError(flag_message(cls, str(e))) from None


def add_column_args(
    parser: argparse.ArgumentParser,
    text_default: str | None = "title,description",
    label_default: str | None = "label",
    split: bool = True,
) -> None:
    """The catalog column flags of extract and predict."""
    g = parser.add_argument_group("catalog columns")
    g.add_argument("--id-col", default="product_id", help="unique product id column (default: product_id)")
    g.add_argument(
        "--image-col",
        default="image_path",
        help="image path column; relative paths are relative to the catalog file (default: image_path)",
    )
    g.add_argument(
        "--text-cols",
        default=text_default,
        help="comma list of text columns, any may be absent; '' for none (default: title,description; "
        "with --like, or for predict, the shards' / run's)",
    )
    g.add_argument(
        "--label-col", default=label_default, help="label column; '' for an unlabelled catalog (default: label)"
    )
    if split:
        g.add_argument("--split-col", default="split", help="optional train/val/test column (default: split)")
    g.add_argument("--encoding", default="utf-8", help="text encoding of a CSV/TSV/JSONL catalog (default utf-8)")
