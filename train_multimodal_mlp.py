#!/usr/bin/env python
"""Parquet shards -> two-branch fusion MLP run folder. Same as `prodfuse train`; see README.md."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # works from a clone without `pip install`
from prodfuse.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
