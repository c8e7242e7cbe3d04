"""prodfuse: multimodal product classification (image + title/description + OCR text) on Keras 3."""

__version__ = "0.1.0"

# Registers the fusion layers with Keras, so `import prodfuse` is all a saved `model.keras` needs to load.
from . import fusion  # noqa: E402,F401
