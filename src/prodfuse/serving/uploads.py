"""An uploaded photo: written to a private file under a generated name, checked and decoded like a catalog image."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import numpy as np

from prodfuse.encoders.image import DEFAULT_MAX_PIXELS, ImageRejected, load_image


def save_upload(data: bytes, folder: Path) -> tuple[str, str]:
    """(path, sha256) of the bytes written to `folder` under a random name: a client's filename is never a path."""
    path = folder / f"{uuid.uuid4().hex}.upload"
    with open(path, "wb") as f:
        f.write(data)
    return str(path), hashlib.sha256(data).hexdigest()


def decode_upload(
    path: str, image_size: int, views: int, crop_scale: float, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """The photo as `load_image` gives it for the run; ImageRejected (extraction's reason names) with the server's
    file path replaced by 'upload', so no path of the server reaches the client."""
    try:
        return load_image(path, image_size, max_pixels=max_pixels, views=views, crop_scale=crop_scale)
    except ImageRejected as e:
        raise ImageRejected(e.reason, e.detail.replace(path, "upload")) from None


def remove(path: str | None) -> None:
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass
