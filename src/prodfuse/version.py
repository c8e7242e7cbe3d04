"""The installed prodfuse version, for `prodfuse --version`, `prodfuse.__version__`, shard manifests and run
folders (the lowest layer: every stage may import it)."""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("prodfuse")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.2.0"
