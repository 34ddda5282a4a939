"""Dynamic batching: requests that arrive together are run through the model as one batch.

Each request puts its images on an asyncio queue and awaits a future. One worker task takes the first waiting
request, then keeps collecting until the batch holds `max_batch` images or `max_wait_ms` have passed since that
first request, runs the model once in a worker thread (so the event loop keeps accepting requests meanwhile), and
hands every request its own slice of the logits.

The worker waits for more only while a request is known to be on its way (received, still being decoded: see
`expect`). When every request the server holds is already queued, waiting cannot grow the batch, only delay it; on
a busy CPU such idle waits also cost a scheduler wake-up each, which in a first version made batching slower than
no batching at all. Requests that arrive while the model runs form the next batch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import time
from typing import Callable

import numpy as np


@dataclasses.dataclass
class _Pending:
    images: np.ndarray
    future: asyncio.Future


class DynamicBatcher:
    """Groups concurrent `submit` calls into batches of up to `max_batch` images for `predict`.

    `predict(uint8 [N, C, H, W]) -> float32 logits [N, K]` runs in a single background thread, one batch at a time.
    A request larger than `max_batch` runs as a batch of its own; only images of one shape share a batch (a request of
    another shape starts the next one). `on_batch(size, seconds)` is called after each batch.
    """

    def __init__(self, predict: Callable[[np.ndarray], np.ndarray], max_batch: int, max_wait_ms: float,
                 on_batch: Callable[[int, float], None] | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.predict = predict
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.on_batch = on_batch
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._carry: _Pending | None = None
        self._expected = 0

    def expect(self) -> None:
        """Announces a request whose images are being decoded and will be submitted with `expected=True`, or
        withdrawn with `withdraw` if it turns out malformed."""
        self._expected += 1

    def withdraw(self) -> None:
        self._expected -= 1

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainforge-infer")
        self._worker = asyncio.create_task(self._run(), name="trainforge-batcher")

    async def stop(self) -> None:
        """Finishes every request already submitted, then stops the worker."""
        if self._worker is None:
            return
        while self._queue.qsize() or self._carry is not None:
            await asyncio.sleep(self.max_wait + 0.001)
        self._worker.cancel()
        try:
            await self._worker
        except asyncio.CancelledError:
            pass
        self._executor.shutdown(wait=True)
        self._worker = None

    async def submit(self, images: np.ndarray, expected: bool = False) -> np.ndarray:
        """The logits of `images` (uint8 [n, C, H, W]), computed in some batch together with other requests.

        `expected=True` settles an earlier `expect()`.
        """
        try:
            if self._queue is None:
                raise RuntimeError("the batcher is not running")
            future = asyncio.get_running_loop().create_future()
            self._queue.put_nowait(_Pending(images, future))
        finally:
            if expected:
                self._expected -= 1
        return await future

    async def _next(self, timeout: float | None) -> _Pending | None:
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        if timeout is None:
            return await self._queue.get()
        if not self._queue.empty():
            return self._queue.get_nowait()
        if timeout <= 0 or self._expected <= 0:
            return None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next(None)
            batch, size = [first], len(first.images)
            deadline = loop.time() + self.max_wait
            while size < self.max_batch:
                item = await self._next(deadline - loop.time())
                if item is None:
                    break
                if size + len(item.images) > self.max_batch or item.images.shape[1:] != first.images.shape[1:]:
                    self._carry = item
                    break
                batch.append(item)
                size += len(item.images)
            await self._execute(loop, batch, size)

    async def _execute(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending], size: int) -> None:
        images = batch[0].images if len(batch) == 1 else np.concatenate([p.images for p in batch])
        start = time.perf_counter()
        try:
            logits = await loop.run_in_executor(self._executor, self.predict, images)
        except Exception as exc:  # a failing batch fails its requests, never the worker
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        if self.on_batch is not None:
            self.on_batch(size, time.perf_counter() - start)
        offset = 0
        for pending in batch:
            n = len(pending.images)
            if not pending.future.done():  # the client may have gone away
                pending.future.set_result(logits[offset:offset + n])
            offset += n
