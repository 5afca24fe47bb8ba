"""Dynamic batching: concurrent requests' inputs answered by one model call.

Why not Serve's `@serve.batch`: it is built for requests that come through Serve's router,
and pays for that on every call even when they do not. Profiled on a replica at 128
clients (py-spy, issue 7 note): each request runs `inspect.signature` on the batched
method (`extract_signature` in `enqueue_request`) and looks up Serve's request and trace
contexts; each batch records five Ray metrics and, with no wait time, still creates an
`asyncio.wait_for` task. Our requests come through the replica's own HTTP server
(serving/http_server.py) and need none of it, so this queue does the same job with a
deque, a future per request and one task per replica (benchmarks/README.md has the
before/after).

Semantics, as `@serve.batch`, but counted in model inputs: a batch is at most
`max_batch_size` inputs (a request's rows or texts, its `size`; a larger request runs
alone), so that a model call's cost stays bounded whatever the requests carry (32 embed
requests of 8 texts were one 256-text call); the first request of a batch waits up to
`batch_wait_timeout_s` for others (0: a batch is what queued while the previous one
ran and in one more turn of the event loop, which under load fills batches by itself and
delays a lone client by one empty turn only); both change live. A result that is an
exception is raised to its own caller only, so one bad request does not fail its
neighbours.

A request still queued `timeout_s` after it was submitted is not run: its caller gets
TimeoutError (the app's 504). The deadline is checked when a batch is taken, the only time
a queued request can have waited (the batches run on the event loop, so nothing else runs
meanwhile), which costs a comparison per request where a timer per request (asyncio.timeout)
cost about 4% of a replica's time at 10,000 requests/s.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(frozen=True)
class Batching:
    """The batcher's settings, the one home of their defaults; the Serve app reads them from
    its deployment's `user_config` (changed live, serving/config.yaml)."""

    max_batch_size: int = 32
    """Model inputs (rows, texts) run through onnxruntime together at most."""
    batch_wait_timeout_s: float = 0.0
    """How long the first request of a batch waits for others. 0: no timer, a batch is
    whatever queued while the previous one ran and in one more turn of the event loop;
    under load that fills batches by itself (measured: benchmarks/README.md), and a lone
    client waits for one empty turn only."""

    @classmethod
    def from_user_config(cls, config: dict[str, Any] | None) -> Batching:
        config = dict(config or {})
        known = {f.name for f in fields(cls)}
        unknown = set(config) - known
        if unknown:
            raise ValueError(
                f"user_config: unknown setting(s) {sorted(unknown)}; known: {sorted(known)}"
            )
        return cls(**config)


class DynamicBatcher(Generic[Item, Result]):
    """`await batcher.submit(item)` -> that item's entry of `run_batch(items)`.

    `run_batch` takes a list of items and returns one result per item, in order; it runs
    on the event loop (onnxruntime on a small batch takes less time than a thread handoff).
    Create the batcher anywhere; its task starts with the first `submit`, on the running
    loop.
    """

    def __init__(
        self,
        run_batch: Callable[[list[Item]], list[Result | BaseException]],
        max_batch_size: int = Batching.max_batch_size,
        batch_wait_timeout_s: float = Batching.batch_wait_timeout_s,
        timeout_s: float = float("inf"),
    ) -> None:
        self._run_batch = run_batch
        self.configure(max_batch_size, batch_wait_timeout_s)
        self.timeout_s = timeout_s
        # (item, its caller's future, the loop time after which it is not run, its size)
        self._queue: collections.deque[tuple[Item, asyncio.Future, float, int]] = (
            collections.deque()
        )
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    def configure(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        """New limits, taken from the next batch on (`reconfigure` calls this live)."""
        if max_batch_size < 1 or batch_wait_timeout_s < 0:
            raise ValueError(
                f"batching needs max_batch_size >= 1 and batch_wait_timeout_s >= 0, got "
                f"{max_batch_size} and {batch_wait_timeout_s}"
            )
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s

    async def submit(self, item: Item, size: int = 1) -> Result:
        """`item`'s result; `size`: the model inputs it carries (counted in a batch)."""
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._arrived = asyncio.Event()
            self._worker = loop.create_task(self._serve_batches(), name="dynamic-batcher")
        future = loop.create_future()
        self._queue.append((item, future, loop.time() + self.timeout_s, size))
        self._arrived.set()
        return await future

    async def _serve_batches(self) -> None:
        assert self._arrived is not None
        while True:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            if self._queued_inputs() < self.max_batch_size:
                if self.batch_wait_timeout_s > 0:
                    await self._wait_for_more(self.batch_wait_timeout_s)
                else:
                    # One more turn of the loop first: it reads the sockets again, and the
                    # requests whose bytes came while the last batch ran join this one. Over
                    # HTTP at 32 clients the batches doubled (10 -> 20 requests) and a
                    # replica answered 27% more (benchmarks/README.md); a lone request
                    # waits for one empty turn, microseconds.
                    await asyncio.sleep(0)
            self._answer(self._next_batch())
            # Yield once so the answers go out and new requests reach the queue before the
            # next batch is taken.
            await asyncio.sleep(0)

    async def _wait_for_more(self, timeout_s: float) -> None:
        assert self._arrived is not None
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self._queued_inputs() < self.max_batch_size:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._arrived.wait()
            except TimeoutError:
                return

    def _queued_inputs(self) -> int:
        return sum(entry[3] for entry in self._queue)

    def _next_batch(self) -> list[tuple[Item, asyncio.Future]]:
        batch = []
        inputs = 0
        now = asyncio.get_running_loop().time()
        while self._queue:
            item, future, deadline, size = self._queue[0]
            if future.done():  # a caller that went away is skipped
                self._queue.popleft()
                continue
            if now > deadline:
                self._queue.popleft()
                future.set_exception(TimeoutError())
                continue
            if batch and inputs + size > self.max_batch_size:
                break  # the next batch's first
            self._queue.popleft()
            batch.append((item, future))
            inputs += size
        return batch

    def _answer(self, batch: list[tuple[Item, asyncio.Future]]) -> None:
        if not batch:
            return
        try:
            results = self._run_batch([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(
                    f"run_batch returned {len(results)} results for {len(batch)} items"
                )
        except BaseException as exc:  # the whole call failed: every caller hears why
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(exc))
            if not isinstance(exc, Exception):
                raise  # e.g. the loop shutting down: the batcher task ends here
            return
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
