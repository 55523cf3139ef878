"""Concurrent callers' inputs encoded together: one forward pass for a batch costs far less than one per input.

No thread of its own: the first caller that finds the encoder idle leads — it takes every pending input (up to
``max_batch``), encodes them in one call and hands each caller its result; then, if more arrived meanwhile, it wakes
one of their callers to lead the next batch, so no caller waits behind more than the batch before its own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Item = TypeVar("Item")
Output = TypeVar("Output")


@dataclass
class _Request(Generic[Item, Output]):
    item: Item
    done: threading.Event = field(default_factory=threading.Event)
    lead: bool = False
    output: Output | None = None
    error: BaseException | None = None


class MicroBatcher(Generic[Item, Output]):
    """Calls ``encode_many`` with the inputs of every caller waiting at the moment, one batch at a time."""

    def __init__(self, encode_many: Callable[[list[Item]], Iterable[Output]], max_batch: int = 32) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch {max_batch}: at least 1")
        self._encode_many = encode_many
        self.max_batch = max_batch
        self._lock = threading.Lock()
        self._pending: list[_Request[Item, Output]] = []
        self._busy = False
        self.batches = 0  # batches encoded so far (a measure of how much was shared)

    def __call__(self, item: Item) -> Output:
        """The output for ``item``, computed in a batch with whatever other callers are waiting.

        Raises:
            Exception: what ``encode_many`` raised for the batch ``item`` was in.
        """
        request: _Request[Item, Output] = _Request(item)
        with self._lock:
            self._pending.append(request)
            request.lead = not self._busy
            self._busy = True
        while True:
            if request.lead:
                self._run_batch()
            request.done.wait()
            if request.output is not None or request.error is not None:
                break
            request.done.clear()  # woken to lead the next batch
        if request.error is not None:
            raise request.error
        assert request.output is not None
        return request.output

    def _run_batch(self) -> None:
        with self._lock:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
        try:
            outputs = list(self._encode_many([r.item for r in batch]))
            if len(outputs) != len(batch):
                raise RuntimeError(f"encoder returned {len(outputs)} outputs for {len(batch)} inputs")
            for request, output in zip(batch, outputs, strict=True):
                request.output = output
        except BaseException as err:  # every caller of the batch gets the error, none hangs
            for request in batch:
                request.error = err
            if not isinstance(err, Exception):  # an interrupt still stops the leading thread, after the hand-off
                raise
        finally:
            self._hand_off(batch)

    def _hand_off(self, batch: list[_Request[Item, Output]]) -> None:
        """Answer the batch's callers and wake the next leader (or mark the encoder idle)."""
        with self._lock:
            self.batches += 1
            if self._pending:
                self._pending[0].lead = True
                self._pending[0].done.set()
            else:
                self._busy = False
        for request in batch:
            request.lead = False
            request.done.set()
