"""What feeds the per-worker loop: the train stream cut into epochs, and rank 0's val split read ahead.

Two train streams, chosen by :func:`open_train_stream`: from shards, one Ray Data stream per epoch
(:class:`EpochStream`, the next one begun while rank 0 validates); from the frozen-prefix cache, one stream for the
whole run (:class:`RunStream`, which reads on between epochs). The val split is read once, in a thread, while the
first epoch trains, and kept in memory after that (:class:`Validation`, :class:`KeptBatches`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import numpy as np
import ray.train
import torch

from rsitr.config import TrainConfig
from rsitr.evaluation.evaluate import evaluate_model
from rsitr.models.msa import MSA

# rank 0 keeps a val split this small in memory after its first pass (RSICD val decoded at 260 px: about 0.2 GiB)
VAL_MEMORY_BYTES = 2 * 1024**3


class TrainStream(Protocol):
    """A worker's train shard, read an epoch at a time."""

    flowing: threading.Event  # set at the first batch of the run

    def epoch(self) -> Iterator[dict[str, torch.Tensor]]: ...

    def begin_next(self) -> None: ...


def open_train_stream(
    shard: Any, train: TrainConfig, batch_size: int, device: torch.device, steps_per_epoch: int
) -> TrainStream:
    """The stream ``rsitr.train`` trains from: one for the run from the cache (whose train dataset holds every
    epoch, :func:`rsitr.train.trainer.training_datasets`), one per epoch from shards."""
    if train.cache_frozen:
        return RunStream(shard, batch_size, device, steps_per_epoch)
    return EpochStream(shard, batch_size, device)


class EpochStream:
    """A worker's train shard, an epoch at a time; the next epoch can be begun early, in a thread.

    Each epoch's stream starts with a global shuffle of the split, which must finish before its first batch. Begun
    as soon as the previous epoch's batches are used up, that shuffle runs while rank 0 validates and saves.
    """

    def __init__(self, shard: Any, batch_size: int, device: torch.device) -> None:
        self.shard, self.batch_size, self.device = shard, batch_size, device
        self.flowing = threading.Event()
        self._begun: threading.Thread | None = None
        self._first: tuple[Iterator[dict[str, torch.Tensor]], dict[str, torch.Tensor] | None] | None = None
        self._error: BaseException | None = None

    def _open(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.shard.iter_torch_batches(batch_size=self.batch_size, drop_last=True, device=self.device))

    def begin_next(self) -> None:
        """Start the next epoch's stream now (every worker must, as every worker reads each epoch)."""

        def first_batch() -> None:
            try:
                batches = self._open()
                self._first = (batches, next(batches, None))
            except BaseException as error:  # raised in the training thread when the epoch is read
                self._error = error

        self._begun = threading.Thread(target=first_batch, name="next-epoch", daemon=True)
        self._begun.start()

    def epoch(self) -> Iterator[dict[str, torch.Tensor]]:
        """This epoch's batches: the begun stream's, or a stream opened now."""
        for batch in self._epoch():
            self.flowing.set()
            yield batch

    def _epoch(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._begun is None:
            yield from self._open()
            return
        self._begun.join()
        self._begun, begun, self._first = None, self._first, None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        assert begun is not None
        batches, first = begun
        if first is not None:
            yield first
            yield from batches


class RunStream:
    """A worker's train shard that holds the whole run (:mod:`rsitr.data.run_rows`), read as one stream and cut into
    epochs of ``steps`` batches.

    It is iterated once, so Ray Data never starts it again: between epochs, while rank 0 validates, it goes on
    reading. Every worker's share has the same number of rows (Ray Train's split is ``equal``), so all workers
    take the same number of steps, even when the last epoch comes up short.
    """

    def __init__(self, shard: Any, batch_size: int, device: torch.device, steps: int) -> None:
        self.shard, self.batch_size, self.device, self.steps = shard, batch_size, device, max(1, steps)
        self.flowing = threading.Event()
        self._batches: Iterator[dict[str, torch.Tensor]] | None = None

    def begin_next(self) -> None:
        """Nothing to begin: the stream runs on between epochs."""

    def epoch(self) -> Iterator[dict[str, torch.Tensor]]:
        """The next ``steps`` batches of the run (fewer where the run's rows end)."""
        if self._batches is None:
            self._batches = iter(
                self.shard.iter_torch_batches(batch_size=self.batch_size, drop_last=True, device=self.device)
            )
        for _ in range(self.steps):
            batch = next(self._batches, None)
            if batch is None:
                return
            self.flowing.set()
            yield batch


class KeptBatches:
    """A stream of batches read from ``make()`` once and replayed from memory after that, unless its batches come
    to more than ``budget`` bytes (then every pass reads it again).

    Re-reading the val split every epoch re-plans its datasets and starts their actors again, which on a small
    machine costs more than validating does.
    """

    def __init__(self, make: Callable[[], Iterable[dict[str, Any]]], budget: int = VAL_MEMORY_BYTES) -> None:
        self.make, self.budget = make, budget
        self.kept: list[dict[str, Any]] | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.kept is not None:
            yield from self.kept
            return
        kept: list[dict[str, Any]] | None = []
        size = 0
        for batch in self.make():
            if kept is not None:
                own = _owned(batch)
                size += _nbytes(own)
                if size <= self.budget:
                    kept.append(own)
                else:
                    kept = None
            yield batch
        self.kept = kept  # only once the whole split has been read

    def fill(self) -> None:
        """Read the whole stream into memory now; stops reading, keeping nothing, once it outgrows the budget."""
        if self.kept is not None:
            return
        kept, size = [], 0
        for batch in self.make():
            own = _owned(batch)
            size += _nbytes(own)
            if size > self.budget:
                return
            kept.append(own)
        self.kept = kept


def _owned(batch: dict[str, Any]) -> dict[str, Any]:
    # copies: views into Ray's object store would pin its blocks for the whole run
    return {k: np.array(v, copy=True) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


def _nbytes(batch: dict[str, Any]) -> int:
    return sum(v.nbytes for v in batch.values() if isinstance(v, np.ndarray))


class Validation:
    """Rank 0's val metrics, keyed ``val_*``, from the whole val split (kept in memory between epochs).

    The split is read ahead, in a thread, while the first epoch trains: starting its datasets (planning, decode
    and tokenizing tasks) is mostly waiting, which the first validation would otherwise wait through. The read
    starts once ``start`` is set (by the train stream at the first training batch), so it does not compete with
    the first epoch's own cold start.
    """

    def __init__(self, train_cfg: TrainConfig, device: torch.device, start: threading.Event) -> None:
        images, captions = ray.train.get_dataset_shard("val_images"), ray.train.get_dataset_shard("val_captions")
        self.images = KeptBatches(lambda: images.iter_batches(batch_size=train_cfg.eval_batch_size))
        self.captions = KeptBatches(lambda: captions.iter_batches(batch_size=256))
        self.rerank_k, self.reverse_weight, self.device = train_cfg.rerank_k, train_cfg.rerank_reverse_weight, device
        self._start = start
        self._read_error: BaseException | None = None
        self._reader: threading.Thread | None = threading.Thread(target=self._read_ahead, name="val-read-ahead")
        self._reader.daemon = True
        self._reader.start()

    def _read_ahead(self) -> None:
        self._start.wait()
        try:
            self.images.fill()
            self.captions.fill()
        except BaseException as error:  # handed to the training thread, which raises it at the first validation
            self._read_error = error

    def __call__(self, model: MSA) -> dict[str, float]:
        if self._reader is not None:
            self._start.set()  # an epoch without a single batch never set it
            self._reader.join()
            self._reader = None
            if self._read_error is not None:
                raise self._read_error
        val = evaluate_model(model, self.images, self.captions, self.device, self.rerank_k, self.reverse_weight)
        return {f"val_{k}": v for k, v in val.items()}
