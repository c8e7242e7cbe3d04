"""prodfuse: multimodal product classification (image + title/description + OCR text) on Keras 3."""

__version__ = "0.1.0"
