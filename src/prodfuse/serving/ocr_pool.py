"""OCR for the service: the OCR cache first, then a pool of worker processes that is replaced when one dies."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from concurrent.futures.process import BrokenProcessPool

from prodfuse.encoders import ocr


class OcrWorkerDied(RuntimeError):
    """A worker process died while reading this request's photo; the pool has been replaced."""


class OcrPool:
    """`await pool.read(path, sha)` -> the photo's filtered OCR text, exactly as extraction reads it."""

    def __init__(self, engine: str, langs, workers: int, cache_dir=None, on_replace=None):
        self.engine = engine
        self.langs = langs
        self.workers = workers
        self.cache_dir = cache_dir
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None
        self._task = None
        self._lock = threading.Lock()
        self.on_replace = on_replace  # called once per pool replaced (metrics)

    @property
    def enabled(self) -> bool:
        return self.engine != "none"

    def start(self) -> None:
        """Start the workers and load the engine in each (blocking: call from a thread)."""
        if self.enabled and self._executor is None:
            self._executor, self._task = ocr.open_executor(self.engine, self.langs, self.workers)

    def pids(self) -> list[int]:
        return list(getattr(self._executor, "_processes", None) or {})

    def _replace(self, broken) -> None:
        with self._lock:
            if self._executor is broken:  # another request may have replaced it already
                broken.shutdown(wait=False, cancel_futures=True)
                self._executor = None
                self.start()
                if self.on_replace is not None:
                    self.on_replace()

    async def read(self, path: str, sha: str) -> str:
        if not self.enabled:
            return ""
        cache_file, text = await asyncio.to_thread(ocr.cache_lookup, sha, self.engine, self.langs, self.cache_dir)
        if text is not None:
            return text
        executor = self._executor
        try:
            _, text, error = await asyncio.wrap_future(executor.submit(self._task, (0, path)))
        except BrokenProcessPool as e:
            await asyncio.to_thread(self._replace, executor)
            raise OcrWorkerDied("an OCR worker process died while reading this photo; the pool was restarted") from e
        if error is not None:
            return ""  # as extraction: an OCR failure leaves the item without OCR text
        await asyncio.to_thread(ocr.cache_store, cache_file, text, sha, self.engine, self.langs)
        return text

    def close(self) -> None:
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True, cancel_futures=True)
                self._executor = None
