"""What every command shares: flags -> config objects, the column flags, flag names in error messages."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path


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


def check_shard_folders(**folders: str | None) -> None:
    """Each given shard folder (by its flag's field name) holds a manifest; checked before TensorFlow loads."""
    from prodfuse.data.shards import MANIFEST

    for name, folder in folders.items():
        if folder and not (Path(folder) / MANIFEST).is_file():
            flag = "--" + name.replace("_", "-")
            raise ValueError(
                f"{flag} {folder!r} is not an embedding shard folder: it has no {MANIFEST}. Make one from your "
                f"catalog with `prodfuse extract --catalog CATALOG --out {folder}` (a folder to score or predict "
                f"on: add --like TRAINING_SHARDS)."
            )


def check_shard_column(folder: str, column: str | None, role: str, flag: str) -> None:
    """`column` (None: the one the folder's manifest records for `role`) is a column of the folder's shards."""
    from prodfuse.data import shards

    column = column or shards.read_manifest(folder)["columns"].get(role)
    present = shards.shard_columns(folder)
    if column and present and column not in present:
        carried = [c for c in present if not c.endswith(("_embedding", "_views")) and c not in shards_internal()]
        raise ValueError(
            f"{flag} {column!r} is not a column of the shards in {folder!r}; they carry {carried}. Pass {flag} "
            f"with one of those."
        )


def shards_internal() -> set[str]:
    """Columns extraction adds to every shard (not catalog columns)."""
    return {"has_text", "text", "ocr_text", "tokens"}


def add_trust_pickle(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="also load a shard folder's TF-IDF state saved by prodfuse before 0.2 as a pickle; unpickling runs "
        "any code the file holds, so only for folders you made (re-extracting saves it as plain arrays)",
    )


def add_column_args(
    parser: argparse.ArgumentParser,
    split: bool = True,
    inherit: str | None = None,
    inherit_label: str | None = None,
    text_help: str | None = None,
) -> None:
    """The catalog column flags of extract and predict. Each defaults to None, which the config reads as the column
    `inherit` names (extract: "the --like folder's"; `inherit_label`, predict: "the run's"), else the usual name."""

    def usual(name: str, source: str | None = inherit) -> str:
        return f"default: {source}, else {name}" if source else f"default: {name}"

    g = parser.add_argument_group("catalog columns")
    g.add_argument("--id-col", default=None, help=f"unique product id column ({usual('product_id')})")
    g.add_argument(
        "--image-col",
        default=None,
        help=f"image path column; relative paths are relative to the catalog file ({usual('image_path')})",
    )
    g.add_argument(
        "--text-cols",
        default=None,
        help=text_help or f"comma list of text columns, any may be absent; '' for none ({usual('title,description')})",
    )
    g.add_argument(
        "--label-col",
        default=None,
        help=f"label column; '' for an unlabelled catalog ({usual('label', inherit_label or inherit)})",
    )
    if split:
        g.add_argument(
            "--split-col", default=None, help=f"optional train/val/test column; '' for none ({usual('split')})"
        )
    g.add_argument("--encoding", default="utf-8", help="text encoding of a CSV/TSV/JSONL catalog (default utf-8)")
