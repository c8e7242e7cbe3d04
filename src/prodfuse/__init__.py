"""prodfuse: multimodal product classification (image + title/description + OCR text) on Keras 3."""

__version__ = "0.1.0"

import os as _os

# TensorFlow's C++ start-up chatter (no CUDA here, CPU instruction sets...) buries our own messages; a user can
# still set TF_CPP_MIN_LOG_LEVEL=0 to see it. Must be set before TensorFlow is first imported.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Registers the fusion layers with Keras, so `import prodfuse` is all a saved `model.keras` needs to load.
from . import fusion  # noqa: E402,F401
