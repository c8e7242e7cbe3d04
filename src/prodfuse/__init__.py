"""prodfuse: multimodal product classification (image + title/description + OCR text) on Keras 3."""

__version__ = "0.1.0"

import ctypes as _ctypes
import os as _os
import sys as _sys

# TensorFlow's C++ start-up chatter (no CUDA here, CPU instruction sets...) buries our own messages; a user can
# still set TF_CPP_MIN_LOG_LEVEL=0 to see it. Must be set before TensorFlow is first imported.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _keep_freed_heap_mapped(pad_bytes: int = 64 << 20) -> bool:
    """Ask glibc to keep `pad_bytes` of freed heap mapped instead of trimming it back to the system at once.

    Training allocates fresh batch arrays every step (~0.3 MB at batch 32 of 2048 + 384 floats) and frees them a
    step later. With glibc's defaults each batch's memory was returned and page-faulted in again, which on 2 cores
    doubled an epoch's CPU time and made the ShardSequence feed 2.5x slower than `fit` on in-memory arrays
    (benchmarks/training_feed.py). It only helps when set before TensorFlow starts its threads, hence here.
    Returns False (and changes nothing) where the C library is not glibc.
    """
    if not _sys.platform.startswith("linux") or _os.environ.get("PRODFUSE_KEEP_MALLOC_DEFAULTS"):
        return False
    try:
        return bool(_ctypes.CDLL(None).mallopt(-2, pad_bytes))  # -2: M_TOP_PAD
    except (OSError, AttributeError):
        return False


_keep_freed_heap_mapped()

# Registers the fusion layers with Keras, so `import prodfuse` is all a saved `model.keras` needs to load.
from . import fusion  # noqa: E402,F401
