"""Concurrent requests' queries answered in batches: the text tower encodes every query waiting at that moment in
one pass (the image tower every uploaded image), which costs far less than one pass each.

A batch is taken when the towers become free, with everything that arrived while they worked: under load the queue
fills during a batch, and a lone query is never held back waiting for company. The work runs in a worker thread, off
the replica's event loop, which keeps taking the requests that form the next batch.

Why not Ray Serve's ``@serve.batch``: it forms the next batch as soon as one request waits, and that batch then
queues behind the running one (``max_concurrent_batches``) with its membership fixed. With towers that take tens of
milliseconds on a CPU, batches stay at one or two queries and the service runs at about the one-query rate, unless
``batch_wait_timeout_s`` holds every query, a lone one included, for about a batch's time. docs/search-service.md
has the measurement.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from rsitr.retrieval.search import Hit, Searcher
from rsitr.retrieval.search_inputs import SearchError, TextQuery
from rsitr.service.state import SearchService

Item = TypeVar("Item")
Output = TypeVar("Output")

# the most queries one pass takes (a replica's max_ongoing_requests is set above it, so a batch can fill)
MAX_BATCH = 16


@dataclass
class BatchCounts:
    """How many batches ran and how many queries they held (``queries / batches``: the mean batch)."""

    batches: int = 0
    queries: int = 0
    largest: int = 0


class Batcher(Generic[Item, Output]):
    """Runs ``run_many`` in a worker thread over every item waiting when the previous batch is done (at most
    ``max_batch`` at once); an output that is an exception is raised to its own caller alone. Used from one event
    loop: its state needs no lock."""

    def __init__(
        self, run_many: Callable[[list[Item]], Sequence[Output | Exception]], max_batch: int = MAX_BATCH
    ) -> None:
        self._run_many = run_many
        self.max_batch = max_batch
        self._waiting: list[tuple[Item, asyncio.Future[Output]]] = []
        self._draining: asyncio.Task[None] | None = None
        self.counts = BatchCounts()

    async def __call__(self, item: Item) -> Output:
        """The output for ``item``, computed in one batch with the items of other callers waiting then.

        Raises:
            Exception: what ``run_many`` raised for the batch ``item`` was in.
        """
        future: asyncio.Future[Output] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._draining is None:
            self._draining = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[: self.max_batch], self._waiting[self.max_batch :]
                outputs: Sequence[Output | Exception]
                try:
                    outputs = await asyncio.to_thread(self._run_many, [item for item, _ in batch])
                    if len(outputs) != len(batch):
                        raise RuntimeError(f"{len(outputs)} outputs for a batch of {len(batch)}")
                except Exception as err:  # every caller of the batch gets the error, none hangs
                    outputs = [err] * len(batch)
                for (_, future), output in zip(batch, outputs, strict=True):
                    if future.done():  # the request was cancelled (its client went away)
                        continue
                    if isinstance(output, Exception):
                        future.set_exception(output)
                    else:
                        future.set_result(output)
                self.counts.batches += 1
                self.counts.queries += len(batch)
                self.counts.largest = max(self.counts.largest, len(batch))
        finally:
            self._draining = None


class QueryBatches:
    """A replica's text searches and image encodings, batched across its concurrent requests. Each answer names the
    :class:`Searcher` (index version) it came from: a batch is answered from one version, whole."""

    def __init__(self, service: SearchService, max_batch: int = MAX_BATCH) -> None:
        self.service = service
        self._searches: Batcher[TextQuery, tuple[Searcher, list[Hit]]] = Batcher(self._search_all, max_batch)
        self._images: Batcher[tuple[bytes, str], tuple[Searcher, torch.Tensor]] = Batcher(self._encode_all, max_batch)

    def counts(self) -> dict[str, Any]:
        """The batches run so far, for text and for images."""
        return {"text": vars(self._searches.counts).copy(), "images": vars(self._images.counts).copy()}

    async def search(self, query: TextQuery) -> tuple[Searcher, list[Hit]]:
        """The tiles for ``query`` (see :meth:`Searcher.search_many`) and the searcher that found them.

        Raises:
            SearchError: the query cannot be answered by this index (e.g. re-rank without a caption table).
        """
        return await self._searches(query)

    async def encode_image(self, data: bytes, name: str) -> tuple[Searcher, torch.Tensor]:
        """The embedding of an encoded image (``name`` labels it in errors) and the searcher whose model made it.

        Raises:
            SearchError: the bytes are not an image.
        """
        return await self._images((data, name))

    def _search_all(self, queries: list[TextQuery]) -> list[tuple[Searcher, list[Hit]]]:
        searcher = self.service.searcher
        return [(searcher, hits) for hits in searcher.search_many(queries)]

    def _encode_all(self, uploads: list[tuple[bytes, str]]) -> list[tuple[Searcher, torch.Tensor] | Exception]:
        searcher = self.service.searcher
        decoded: list[np.ndarray | SearchError] = []
        for data, name in uploads:  # an upload that is not an image is refused alone
            try:
                decoded.append(searcher.decode_image(data, name))
            except SearchError as err:
                decoded.append(err)
        images = [pixels for pixels in decoded if isinstance(pixels, np.ndarray)]
        vectors = iter(searcher.encode_images(images) if images else ())
        return [item if isinstance(item, Exception) else (searcher, next(vectors)) for item in decoded]
