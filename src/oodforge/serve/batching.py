"""Dynamic batching: requests wait up to ``max_delay_ms`` for others, then run as one batch of at most ``max_batch``
images on one of ``workers`` threads (torch releases the GIL while it computes)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor


class Batcher:
    """Collects the images of concurrent requests into batches for ``run`` ((N, C, H, W) -> N result rows)."""

    def __init__(self, run: Callable[[Tensor], list[dict]], max_batch: int = 64, max_delay_ms: float = 5.0,
                 workers: int = 1, on_batch: Callable[[int], None] | None = None) -> None:
        self.run, self.max_batch, self.max_delay = run, max_batch, max_delay_ms / 1000.0
        self.workers, self.on_batch = workers, on_batch
        self.queue: asyncio.Queue | None = None
        self.tasks: list[asyncio.Task] = []
        self.executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        """Start the consumer tasks (inside the server's event loop)."""
        self.queue = asyncio.Queue()
        self.executor = ThreadPoolExecutor(self.workers, thread_name_prefix="oodforge-batch")
        self.tasks = [asyncio.create_task(self._consume()) for _ in range(self.workers)]

    async def stop(self) -> None:
        """Cancel the consumers and shut the threads down."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.executor is not None:
            self.executor.shutdown(wait=True)

    async def submit(self, images: list[Tensor]) -> list[dict]:
        """The result rows of one request's preprocessed images, in order."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((images, future))
        return await future

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            count = len(items[0][0])
            deadline = loop.time() + self.max_delay
            while count < self.max_batch:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), left)
                except TimeoutError:
                    break
                items.append(item)
                count += len(item[0])
            await self._run(loop, items, count)

    async def _run(self, loop: asyncio.AbstractEventLoop, items: list, count: int) -> None:
        batch = torch.stack([image for images, _ in items for image in images])
        try:
            rows = await loop.run_in_executor(self.executor, self.run, batch)
        except Exception as exc:  # the requests get the error; the server goes on
            for _, future in items:
                if not future.done():
                    future.set_exception(exc)
            return
        if self.on_batch is not None:
            self.on_batch(count)
        start = 0
        for images, future in items:
            if not future.done():
                future.set_result(rows[start:start + len(images)])
            start += len(images)
