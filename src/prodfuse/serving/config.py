"""ServeConfig: the settings of `prodfuse serve`, their defaults and checks."""

from __future__ import annotations

import os
from dataclasses import dataclass

from prodfuse.checks import check_range

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServeConfig:
    """One service: which run, where it listens, how requests are batched and bounded.

    Items of concurrent requests are gathered into one model call of up to `max_batch` items, waiting at most
    `max_wait_ms` for more; at most `max_queue` items are admitted at once (more get 503 with Retry-After), so
    memory stays bounded under overload. `api_key_file` holds one key; without it the service has no
    authentication and should listen on loopback only.

    Every item is bounded too: a photo by `max_upload_mb`, each text field by `max_text_chars`, a batch body by
    `max_upload_mb` per item it holds, and a photo's OCR by `ocr_timeout` seconds per megapixel (at least
    `ocr_timeout` seconds), after which its worker is replaced and the item answered 503 `ocr_timeout`.
    """

    run: str
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 32
    max_wait_ms: float = 10.0
    max_queue: int = 256
    max_items: int = 64  # items in one batch request
    max_upload_mb: float = 10.0
    max_text_chars: int = 10_000  # characters of one text field (title, description) of one item
    ocr_workers: int = 1
    ocr_cache: str | None = None
    ocr_timeout: float = 5.0  # seconds of OCR per megapixel of a photo, and at least this much for any photo
    decode_threads: int = 2
    api_key_file: str | None = None
    warm_up: bool = True
    index: str | None = None  # a `prodfuse index` folder: each answer then lists the most similar indexed products
    similar_k: int = 5
    trust_pickle: bool = False  # load a pre-0.2 pickled TF-IDF state of the run's shards (runs code)

    def __post_init__(self):
        check_range("port", self.port, 0, 65535, integer=True)
        check_range("max_batch", self.max_batch, 1, 4096, integer=True)
        check_range("max_wait_ms", self.max_wait_ms, 0.0, 10_000.0)
        check_range("max_queue", self.max_queue, 1, 1_000_000, integer=True)
        check_range("max_items", self.max_items, 1, 10_000, integer=True)
        check_range("max_upload_mb", self.max_upload_mb, 0.001, 1024.0)
        check_range("max_text_chars", self.max_text_chars, 1, 100_000_000, integer=True)
        check_range("ocr_workers", self.ocr_workers, 1, 256, integer=True)
        check_range("ocr_timeout", self.ocr_timeout, 0.05, 3600.0)
        check_range("decode_threads", self.decode_threads, 1, 256, integer=True)
        check_range("similar_k", self.similar_k, 1, 100, integer=True)
        if self.api_key_file is not None and not os.path.isfile(self.api_key_file):
            raise ValueError(f"api_key_file {self.api_key_file!r} is not a file; write one key into it")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def ocr_deadline(self, megapixels: float) -> float:
        """Seconds a photo of `megapixels` may spend in OCR: `ocr_timeout` per megapixel, at least `ocr_timeout`."""
        return self.ocr_timeout * max(1.0, megapixels)

    def api_key(self) -> str | None:
        """The key in `api_key_file` (surrounding whitespace removed), or None without one."""
        if self.api_key_file is None:
            return None
        with open(self.api_key_file, encoding="utf-8") as f:
            key = f.read().strip()
        if len(key) < 16:
            raise ValueError(f"the key in {self.api_key_file!r} has {len(key)} characters; use at least 16")
        return key
