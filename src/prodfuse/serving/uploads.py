"""An uploaded photo: written to a private file under a generated name, checked and decoded like a catalog image."""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from prodfuse.encoders.image import ALLOWED_FORMATS, DEFAULT_MAX_PIXELS, ImageRejected, load_image


def save_upload(data: bytes, folder: Path) -> tuple[str, str]:
    """(path, sha256) of the bytes written to `folder` under a random name: a client's filename is never a path."""
    path = folder / f"{uuid.uuid4().hex}.upload"
    with open(path, "wb") as f:
        f.write(data)
    return str(path), hashlib.sha256(data).hexdigest()


_DATA_URL = re.compile(r"data:[\w.+-]+/[\w.+-]+(?:;[\w.+-]+=[\w.+-]+)*;base64,", re.IGNORECASE)


def decode_base64(text: str) -> bytes:
    """The bytes of a photo sent as base64 text: also with the line breaks of MIME encoders (`base64` wraps at 76)
    or as a `data:image/...;base64,` URL, as browsers' FileReader gives it. Otherwise strict: a character outside
    the alphabet or a wrong length is a ValueError (binascii.Error) naming what was wrong."""
    text = text.strip()
    match = _DATA_URL.match(text)
    if match:
        text = text[match.end() :]
    elif text[:5].lower() == "data:":
        raise ValueError("a data: URL must be data:<type>/<subtype>;base64,<data>")
    try:
        return base64.b64decode(re.sub(r"[ \t\r\n]+", "", text), validate=True)
    except binascii.Error as e:
        raise ValueError(f"not valid base64: {e}") from None


def decode_upload(
    path: str, image_size: int, views: int, crop_scale: float, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, float]:
    """The photo as `load_image` gives it for the run (only its allowed formats), and its megapixels (its OCR
    deadline scales with them); ImageRejected (extraction's reason names) with the server's file path replaced by
    'upload', so no path of the server reaches the client."""
    try:
        decoded = load_image(path, image_size, max_pixels=max_pixels, views=views, crop_scale=crop_scale)
    except ImageRejected as e:
        raise ImageRejected(e.reason, e.detail.replace(path, "upload")) from None
    with Image.open(path, formats=ALLOWED_FORMATS) as img:  # the header load_image has just accepted
        return decoded, img.width * img.height / 1e6


def remove(path: str | None) -> None:
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass
