"""glibc heap tuning for training on small machines; the CLI calls it, a library user may.

The bottom of the package: it imports nothing from prodfuse.
"""

from __future__ import annotations

import ctypes
import os
import sys


def keep_freed_heap_mapped(pad_bytes: int = 64 << 20) -> bool:
    """Ask glibc to keep `pad_bytes` of freed heap mapped instead of trimming it back to the system at once.

    Training allocates fresh batch arrays every step (~0.3 MB at batch 32 of 2048 + 384 floats) and frees them a
    step later. With glibc's defaults each batch's memory was returned and page-faulted in again, which on 2 cores
    doubled an epoch's CPU time and made the ShardSequence feed 2.5x slower than `fit` on in-memory arrays
    (benchmarks/training_feed.py). It only helps when set before TensorFlow starts its threads, hence here.
    Returns False (and changes nothing) where the C library is not glibc.
    """
    if not sys.platform.startswith("linux") or os.environ.get("PRODFUSE_KEEP_MALLOC_DEFAULTS"):
        return False
    try:
        return bool(ctypes.CDLL(None).mallopt(-2, pad_bytes))  # -2: M_TOP_PAD
    except (OSError, AttributeError):
        return False
