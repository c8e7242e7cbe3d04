#!/usr/bin/env python
"""Catalog -> OCR + image/text embeddings -> parquet shards. Same as `prodfuse extract`; see README.md."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # works from a clone without `pip install`
from prodfuse.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["extract", *sys.argv[1:]]))
