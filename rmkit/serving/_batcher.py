"""Dynamic batching: rows of concurrent requests scored together in one ``predict`` call.

One worker coroutine takes the oldest waiting request, then keeps adding
waiting requests (in arrival order) while the batch stays within the row and
token budgets, waiting at most ``window_s`` after the first one for more to
arrive. The batch is scored by one ``predict`` call in a single worker thread
(the event loop keeps answering health checks, metrics and 429s meanwhile);
requests that arrive while it runs form the next batch. Because the
featurizer runs each distinct prompt once per ``predict`` call, the N
responses of one prompt sent as N concurrent requests (what GRPO-style
trainers do) share one prefix pass.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field

__all__ = ["Batcher", "QueueFull", "ServiceStopped"]


class QueueFull(Exception):
    """The bounded queue has no room for the request's rows (HTTP 429)."""


class ServiceStopped(Exception):
    """The server is shutting down (HTTP 503)."""


@dataclass
class _Job:
    rows: list
    tokens: int
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    """Collects jobs from concurrent requests into batches for one scoring function.

    Parameters
    ----------
    score : callable
        ``score(rows) -> sequence of floats``, one per row; runs in ``executor``.
    executor : concurrent.futures.Executor
        Where ``score`` runs (a single thread: one batch at a time).
    max_batch_rows, max_batch_tokens : int
        Budgets of one batch (a single larger request still runs, alone).
    window_s : float
        How long to wait for more requests after the first one of a batch.
    max_queue_rows : int
        Rows allowed to wait; a request that does not fit raises :class:`QueueFull`.
    enabled : bool
        ``False`` scores each request on its own (one request per batch).
    metrics : object, optional
        Gets ``observe_batch(rows, requests, seconds)`` and ``set_queue(rows)``.
    """

    def __init__(self, score, executor, *, max_batch_rows=256, max_batch_tokens=65536, window_s=0.01,
                 max_queue_rows=4096, enabled=True, metrics=None):
        self.score = score
        self.executor = executor
        self.max_batch_rows = max_batch_rows
        self.max_batch_tokens = max_batch_tokens
        self.window_s = window_s
        self.max_queue_rows = max_queue_rows
        self.enabled = enabled
        self.metrics = metrics
        self._queue = collections.deque()
        self._queued_rows = 0
        self._wakeup = None
        self._task = None
        self._stopped = False

    @property
    def queued_rows(self):
        return self._queued_rows

    def start(self):
        self._wakeup = asyncio.Event()
        self._stopped = False
        self._task = asyncio.get_running_loop().create_task(self._run(), name="rmkit-batcher")

    async def stop(self):
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        while self._queue:
            job = self._queue.popleft()
            if not job.future.done():
                job.future.set_exception(ServiceStopped("the server is shutting down"))
        self._queued_rows = 0
        self._report_queue()

    def _report_queue(self):
        if self.metrics is not None:
            self.metrics.set_queue(self._queued_rows)

    async def submit(self, rows, tokens=0):
        """Queue ``rows`` and wait for their rewards (a list of floats)."""
        if self._stopped or self._task is None:
            raise ServiceStopped("the server is not running")
        if self._queued_rows + len(rows) > self.max_queue_rows:
            raise QueueFull(f"{self._queued_rows} rows are already waiting (limit {self.max_queue_rows})")
        job = _Job(list(rows), int(tokens), asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._queued_rows += len(job.rows)
        self._report_queue()
        self._wakeup.set()
        try:
            return await job.future
        except asyncio.CancelledError:  # the client went away: drop the job if it has not started
            job.future.cancel()
            raise

    def _take(self):
        job = self._queue.popleft()
        self._queued_rows -= len(job.rows)
        return job

    async def _collect(self):
        while not self._queue:
            self._wakeup.clear()
            await self._wakeup.wait()
        batch = [self._take()]
        if not self.enabled:
            return batch
        rows, tokens = len(batch[0].rows), batch[0].tokens
        deadline = time.perf_counter() + self.window_s
        while rows < self.max_batch_rows and tokens < self.max_batch_tokens:
            if self._queue:
                nxt = self._queue[0]
                if rows + len(nxt.rows) > self.max_batch_rows or tokens + nxt.tokens > self.max_batch_tokens:
                    break
                batch.append(self._take())
                rows, tokens = rows + len(nxt.rows), tokens + nxt.tokens
                continue
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                break
        return batch

    async def _score(self, rows):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self.score, rows)

    async def _run(self):
        while True:
            batch = await self._collect()
            self._report_queue()
            batch = [job for job in batch if not job.future.done()]  # clients that left before their turn
            if not batch:
                continue
            rows = [r for job in batch for r in job.rows]
            start = time.perf_counter()
            try:
                values = await self._score(rows)
                error = None
            except Exception as exc:  # noqa: BLE001 - reported to the requests
                values, error = None, exc
            if self.metrics is not None:
                self.metrics.observe_batch(len(rows), len(batch), time.perf_counter() - start)
            if error is None:
                pos = 0
                for job in batch:
                    n = len(job.rows)
                    if not job.future.done():
                        job.future.set_result([float(v) for v in values[pos:pos + n]])
                    pos += n
            elif len(batch) == 1:
                if not batch[0].future.done():
                    batch[0].future.set_exception(error)
            else:  # isolate the request that made the batch fail: score each on its own
                for job in batch:
                    if job.future.done():
                        continue
                    try:
                        vals = await self._score(job.rows)
                        if not job.future.done():
                            job.future.set_result([float(v) for v in vals])
                    except Exception as exc:  # noqa: BLE001
                        if not job.future.done():
                            job.future.set_exception(exc)
