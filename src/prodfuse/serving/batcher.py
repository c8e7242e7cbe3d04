"""Micro-batching: items of concurrent requests gathered into one call of a (blocking) batch function.

The event loop only queues and hands over; the batch function runs in one worker thread (the model is not
thread-safe), so no CPU-heavy work blocks the loop. A batch closes at `max_batch` items or `max_wait_ms` after
its first item; items queued while a batch runs form the next one at once, so under load batches fill up.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any, Callable, Sequence


class MicroBatcher:
    def __init__(
        self,
        fn: Callable[[Sequence[Any]], Sequence[Any]],
        max_batch: int,
        max_wait_ms: float,
        on_batch: Callable[[int, float], None] | None = None,
    ):
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        self.on_batch = on_batch  # (batch size, seconds in fn), for metrics
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="prodfuse-model")

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._thread.shutdown(wait=True)

    def depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def submit(self, payload: Any) -> tuple[Any, float]:
        """The batch function's result for `payload`, and the seconds it waited in the queue."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put_nowait((payload, future, loop.time()))  # admission is bounded by the caller
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait_ms / 1000.0
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            live = [b for b in batch if not b[1].done()]  # a client that went away cancelled its future
            if not live:
                continue
            started = loop.time()
            try:
                results = await loop.run_in_executor(self._thread, self.fn, [p for p, _, _ in live])
            except Exception as e:  # the batch's error is each item's error; the loop goes on
                for _, future, _ in live:
                    if not future.done():
                        future.set_exception(e)
                continue
            if self.on_batch is not None:
                self.on_batch(len(live), loop.time() - started)
            for (_, future, queued), result in zip(live, results):
                if not future.done():
                    future.set_result((result, started - queued))
