"""A whole training run's rows as one Ray Data dataset: every epoch, each in a new seeded order, read in turn.

Ray Data executes a dataset anew each time a trainer iterates it: it plans, starts read tasks, shuffles every row
before the first batch and (Ray 2.60's Parquet reader) starts an actor to read file footers. On 2 cores that is
seconds at each epoch's start, which the trainer waits through unless validation happens to hide it. Read as one
stream, the run's reads go on between epochs and the next epoch's rows are already on their way.

The order comes from the files, so this needs files whose rows are already in random order (the frozen-prefix
cache is written that way): each epoch reads the files in a new seeded order, :data:`FILES_PER_READ` at a time, with
those files' rows permuted together.

numpy and pyarrow only in what the read tasks run, as in :mod:`rsitr.data.cached_rows`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data
from ray.data._internal.execution.execution_callback import ExecutionCallback
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from rsitr.errors import ConfigError
from rsitr.io import shards, storage

# Files read and permuted together. Each cache file is a random sample of its dataset, so this only varies which
# rows share a batch from one epoch to the next: 4 files of ~2-4 MB (the cache's block size) make ~8-16 MB blocks.
FILES_PER_READ = 4
# train.shuffle's values, for a run's stream and for a per-epoch one (rsitr.data.streams)
SHUFFLES = ("full", "blocks", "none")
# how long Ray Data's scheduler sleeps per step while the trainer holds every stage of a run's stream back
HELD_BACK_PAUSE_S = 0.05


def check_shuffle(shuffle: str) -> None:
    """Refuse a ``shuffle`` that is not one of :data:`SHUFFLES`.

    Raises:
        ConfigError: naming it and the values allowed.
    """
    if shuffle not in SHUFFLES:
        raise ConfigError(f"train.shuffle {shuffle!r}: expected one of {', '.join(SHUFFLES)}")


def read_permuted(
    paths: Sequence[str], filesystem: Any, columns: list[str], split: str, seed: Sequence[int] | None
) -> Iterator[pa.Table]:
    """The ``split`` rows of some Parquet files, as one table; with ``seed``, in an order drawn from it.

    Raises:
        DatasetError: a file that cannot be read, or lacks a column (named, with the reason).

    ``filesystem``: a pyarrow filesystem, or None for local paths and ``s3://`` URIs (:func:`storage.arrow_filesystem`:
    it carries a custom S3 endpoint to the read tasks).
    """
    tables = []
    for path in paths:
        read = sorted({*columns, "split"})
        with shards.parquet_read_named(path, read):
            table = pq.read_table(path, filesystem=filesystem, columns=read)
        tables.append(table.filter(pc.equal(table["split"], split)).select(columns))
    rows = pa.concat_tables(tables)
    if seed is not None:
        rows = rows.take(np.random.default_rng(list(seed)).permutation(rows.num_rows))
    yield rows


class RunOfEpochs(Datasource):
    """Ray Data datasource: the ``split`` rows of some Parquet files (``{path: bytes}`` on ``filesystem``, as
    :func:`read_permuted` takes them), ``epochs`` times over, one epoch after another.

    ``order``: ``full`` (each epoch a new seeded file order, rows permuted :data:`FILES_PER_READ` files at a time),
    ``blocks`` (file order only) or ``none`` (the files as listed, every epoch).
    """

    def __init__(
        self,
        files: dict[str, int],
        columns: list[str],
        split: str,
        epochs: int,
        seed: int,
        order: str = "full",
        filesystem: Any = None,
    ) -> None:
        super().__init__()
        check_shuffle(order)
        self.files, self.columns, self.split = dict(sorted(files.items())), columns, split
        self.filesystem = filesystem
        self.epochs, self.seed, self.order = max(1, epochs), seed, order

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(self.files.values()) * self.epochs

    def epoch_order(self, epoch: int) -> list[str]:
        """The files in the order ``epoch`` reads them."""
        names = list(self.files)
        if self.order == "none":
            return names
        return [names[i] for i in np.random.default_rng([self.seed, epoch]).permutation(len(names))]

    def read_count(self) -> int:
        """How many read tasks :meth:`get_read_tasks` makes: one per :data:`FILES_PER_READ` files per epoch."""
        return self.epochs * -(-len(self.files) // FILES_PER_READ)

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
    ) -> list[ReadTask]:
        tasks = []
        for epoch in range(self.epochs):
            names = self.epoch_order(epoch)
            for start in range(0, len(names), FILES_PER_READ):
                group = names[start : start + FILES_PER_READ]
                seed = (self.seed, epoch, start) if self.order == "full" else None
                read = functools.partial(read_permuted, group, self.filesystem, self.columns, self.split, seed)
                size = sum(self.files[name] for name in group)
                metadata = BlockMetadata(num_rows=None, size_bytes=size, input_files=tuple(group), exec_stats=None)
                tasks.append(ReadTask(read, metadata, per_task_row_limit=per_task_row_limit))
        return tasks


class PauseWhileHeldBack(ExecutionCallback):
    """Ray Data execution callback: sleep :data:`HELD_BACK_PAUSE_S` after a scheduling step that moved nothing.

    A run's stream spends most of the run held back, waiting for training to take its batches. Ray Data 2.60's
    scheduler loop blocks only on tasks still running (a finished task whose output is held back does not block
    it), so it spun at 0.9 of a core beside the trainer instead.
    """

    def __init__(self) -> None:
        self.last: tuple[int, ...] = ()

    def on_execution_step(self, executor: Any) -> None:
        moved = tuple(
            count
            for op in executor._topology
            for count in (
                op.metrics.num_tasks_submitted,
                op.metrics.num_task_outputs_generated,
                op.metrics.num_outputs_taken,
            )
        )
        if moved == self.last:
            time.sleep(HELD_BACK_PAUSE_S)
        self.last = moved


def pausing_while_held_back(ds: ray.data.Dataset) -> ray.data.Dataset:
    """``ds``, its execution pausing while held back (:class:`PauseWhileHeldBack`; the dataset's own context)."""
    context = ds.context
    context.custom_execution_callback_classes = [*context.custom_execution_callback_classes, PauseWhileHeldBack]
    return ds


def read_run(
    folder: str, columns: list[str], split: str, epochs: int, seed: int, order: str, num_cpus: float
) -> ray.data.Dataset:
    """Every Parquet file under ``folder`` as :class:`RunOfEpochs` reads it.

    Raises:
        FileNotFoundError: no Parquet file under ``folder``.
        ConfigError: an unknown ``order``.
    """
    base, filesystem = storage.arrow_filesystem(folder)
    files = {f"{base.rstrip('/')}/{name}": size for name, size in storage.list_files(folder).items()}
    files = {path: size for path, size in files.items() if path.endswith(".parquet")}
    if not files:
        raise FileNotFoundError(f"no Parquet files under {folder}")
    source = RunOfEpochs(files, columns, split, epochs, seed, order, filesystem)
    # One read at a time: each is a few files, a small part of an epoch. Unbounded, Ray Data would begin one read per
    # file at once, each in a new process, and on a small machine the first batch would wait behind them all.
    return ray.data.read_datasource(
        source,
        num_cpus=num_cpus,
        compute=ray.data.TaskPoolStrategy(size=1),
        # else Ray Data cuts each read's block into pieces to reach its default parallelism: 10-11 pieces each
        # in the demo's run, ~1 MB blocks each passing on through every later stage
        override_num_blocks=source.read_count(),
    )
