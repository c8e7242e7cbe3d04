"""OCR for the service: the OCR cache first, then a pool of worker processes that is replaced when one dies or
hangs past a photo's deadline."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import wait

from prodfuse.encoders import ocr

log = logging.getLogger(__name__)

STOP_GRACE_S = 5.0  # idle workers exit at once when the pool closes; a busy or stuck one is killed after this


class OcrWorkerDied(RuntimeError):
    """A worker process died while reading this request's photo (or no pool could be started); the pool has been
    replaced."""


class OcrTimeout(RuntimeError):
    """This request's photo was not read within its deadline; the pool (and its stuck worker) has been replaced."""


class OcrPool:
    """`await pool.read(path, sha, timeout)` -> the photo's filtered OCR text, exactly as extraction reads it.

    At most one photo per worker is handed to the pool at a time (the others wait their turn here), so a photo's
    deadline times its own OCR, never a queue behind other photos. A pool is replaced by starting the new one
    before the swap: a request never finds no pool, and one whose photo was in the replaced pool tries the new
    one once."""

    def __init__(self, engine: str, langs, workers: int, cache_dir=None, on_replace=None):
        self.engine = engine
        self.langs = langs
        self.workers = workers
        self.cache_dir = cache_dir
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None
        self._task = None
        self._lock = threading.Lock()
        self._turns: asyncio.Semaphore | None = None  # made in the event loop, on first use
        self.on_replace = on_replace  # called once per pool replaced (metrics)

    @property
    def enabled(self) -> bool:
        return self.engine != "none"

    def start(self) -> None:
        """Start the workers and load the engine in each (blocking: call from a thread)."""
        with self._lock:
            if self.enabled and self._executor is None:
                self._executor, self._task = ocr.open_executor(self.engine, self.langs, self.workers)

    def pids(self) -> list[int]:
        return list(getattr(self._executor, "_processes", None) or {})

    def _replace(self, old) -> bool:
        """Swap a started new pool in for `old` and kill old's workers (blocking); False when another request had
        replaced `old` already."""
        with self._lock:
            if self._executor is not old:
                return False
            self._executor, self._task = ocr.open_executor(self.engine, self.langs, self.workers)
        _stop(old, grace=0.0)  # a hung (or SIGSTOPped) worker never finishes: killed, not waited for
        if self.on_replace is not None:
            self.on_replace()
        return True

    async def _replaced(self, old) -> bool:
        try:
            return await asyncio.to_thread(self._replace, old)
        except Exception as e:  # the old pool stays in place: the next request tries again
            log.exception("could not start a new OCR pool")
            raise OcrWorkerDied("the OCR workers could not be restarted; retry shortly") from e

    async def read(self, path: str, sha: str, timeout: float) -> str:
        """The photo's text from the cache, or from a worker within `timeout` seconds (OcrTimeout after it)."""
        if not self.enabled:
            return ""
        cache_file, text = await asyncio.to_thread(ocr.cache_lookup, sha, self.engine, self.langs, self.cache_dir)
        if text is not None:
            return text
        if self._turns is None:
            self._turns = asyncio.Semaphore(self.workers)
        async with self._turns:
            text, error = await self._read(path, timeout)
        if error is not None:
            return ""  # as extraction: an OCR failure leaves the item without OCR text
        await asyncio.to_thread(ocr.cache_store, cache_file, text, sha, self.engine, self.langs)
        return text

    async def _read(self, path: str, timeout: float) -> tuple[str, str | None]:
        for attempt in range(2):
            executor, task = self._executor, self._task
            if executor is None:  # not started yet, or closed: the service is starting or stopping
                raise OcrWorkerDied("the OCR workers are not running; retry shortly")
            try:
                submitted = executor.submit(task, (0, path))
            except RuntimeError as e:  # broken already (BrokenProcessPool), or shut down as another replaced it
                broken = e
            else:
                try:
                    _, text, error = await asyncio.wait_for(asyncio.wrap_future(submitted), timeout)
                    return text, error
                except asyncio.TimeoutError:
                    await self._replaced(executor)
                    raise OcrTimeout(
                        f"OCR did not finish within {timeout:.1f} s (--ocr-timeout) for this photo; its worker was "
                        "replaced"
                    ) from None
                except BrokenProcessPool as e:
                    broken = e
                except Exception as e:  # the engine failed to start in the worker (each photo's own error is text)
                    log.error("OCR failed in a worker process: %s", e)
                    raise OcrWorkerDied("the OCR engine failed in its worker process; see the server log") from e
            if await self._replaced(executor) or attempt == 1:
                raise OcrWorkerDied(
                    "an OCR worker process died while reading this photo; the pool was restarted"
                ) from broken
            # another request's photo broke that pool and replaced it: this photo tries the new one
        raise AssertionError("unreachable: the second attempt returns or raises")

    def close(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            _stop(executor, grace=STOP_GRACE_S)


def _stop(executor: concurrent.futures.ProcessPoolExecutor, grace: float) -> None:
    """Shut `executor` down: idle workers exit on their own within `grace` seconds, the others are killed (a stuck
    one would make a waiting shutdown hang for ever). The executor's own thread reaps them, so this only waits on
    their sentinels."""
    processes = list((getattr(executor, "_processes", None) or {}).values())
    executor.shutdown(wait=False, cancel_futures=True)
    running = {p.sentinel: p for p in processes}
    deadline = time.monotonic() + grace
    while running and (left := deadline - time.monotonic()) > 0:
        for sentinel in wait(list(running), timeout=left):
            running.pop(sentinel)
    for p in running.values():
        p.kill()
