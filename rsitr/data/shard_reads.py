"""Ingested shards as a Ray Data dataset whose read tasks also turn the rows into what the next stage takes (decoded
tiles, caption rows), a slice of rows at a time.

Ray 2.60's ``read_parquet`` lists the files in a task and reads their footers in an actor before the first read,
then hands each block to a separate map stage: more processes starting beside the embedding actors, which on a
small machine delays the first embeddings. A shard's files are named by the manifest, so nothing needs listing,
and the decode runs in the read task itself.

numpy and pyarrow only in what the read tasks run, as in :mod:`rsitr.data.cached_rows`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
from ray.data.block import Block, BlockAccessor, BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from rsitr.io import shards, storage

# what a slice of a shard's rows (with a ``path`` column naming the shard) becomes: one block of the dataset
SliceTransform = Callable[[pa.Table], dict[str, Any]]


def _record_batches(path: str, filesystem: Any, columns: Sequence[str], rows: int) -> Iterator[pa.RecordBatch]:
    """One Parquet file's ``columns``, ``rows`` rows at a time.

    Raises:
        DatasetError: the file cannot be read, or lacks a column (named, with the reason).
    """
    with shards.parquet_read_named(path, columns):
        yield from pq.ParquetFile(path, filesystem=filesystem).iter_batches(batch_size=rows, columns=columns)


def read_slices(
    path: str, filesystem: Any, columns: Sequence[str], transform: SliceTransform, slice_rows: int
) -> Iterator[Block]:
    """``transform`` of each ``slice_rows`` rows of one Parquet file, in order, each slice with a ``path`` column.

    Raises:
        DatasetError: the file cannot be read, or lacks a column (named, with the reason). A transform's own errors
            (a tile that does not decode) pass through as they are.

    ``filesystem``: a pyarrow filesystem, or None for local paths (as :func:`storage.arrow_filesystem` gives it).
    """
    for batch in _record_batches(path, filesystem, columns, slice_rows):
        rows = pa.Table.from_batches([batch])
        paths = pa.array([path] * rows.num_rows, pa.string())  # typed even for a slice of no rows
        yield BlockAccessor.batch_to_block(transform(rows.append_column("path", paths)))


class ShardSlices(Datasource):
    """Ray Data datasource: one read task per Parquet file, yielding :func:`read_slices` of it."""

    def __init__(
        self, paths: Sequence[str], columns: Sequence[str], transform: SliceTransform, slice_rows: int, filesystem: Any
    ) -> None:
        super().__init__()
        self.paths, self.columns, self.transform = list(paths), list(columns), transform
        self.slice_rows, self.filesystem = slice_rows, filesystem

    def estimate_inmemory_data_size(self) -> int | None:
        return None  # what a transform makes of the rows (decoded pixels, captions) is not the files' size

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
    ) -> list[ReadTask]:
        return [
            ReadTask(
                functools.partial(read_slices, path, self.filesystem, self.columns, self.transform, self.slice_rows),
                BlockMetadata(num_rows=None, size_bytes=None, input_files=(path,), exec_stats=None),
                per_task_row_limit=per_task_row_limit,
            )
            for path in self.paths
        ]


def read_shard_slices(
    uris: Sequence[str],
    columns: Sequence[str],
    transform: SliceTransform,
    slice_rows: int,
    tasks: int,
    num_cpus: float,
    block_bytes: int | None = None,
) -> ray.data.Dataset:
    """The shards at ``uris`` (local paths or ``s3://``) as :class:`ShardSlices` reads them, at most ``tasks`` reads
    at a time. The ``path`` column of each row is the shard's path as the reads saw it (its file name is the shard's).

    ``block_bytes``: cut a read's output into blocks once they hold more than this (Ray Data's default, 128 MB,
    otherwise joins a shard's slices into one block, which one consumer then takes alone).
    """
    located = [storage.arrow_filesystem(uri) for uri in uris]
    source = ShardSlices([path for path, _ in located], columns, transform, slice_rows, located[0][1] if uris else None)
    context = ray.data.DataContext.get_current()
    saved = context.target_max_block_size
    if block_bytes is not None:
        context.target_max_block_size = block_bytes
    try:  # a dataset keeps the context it was created with
        return ray.data.read_datasource(
            source,
            num_cpus=num_cpus,
            compute=ray.data.TaskPoolStrategy(size=max(1, min(tasks, len(uris)))),
            override_num_blocks=len(uris),  # else Ray splits each read's blocks to reach its default parallelism
        )
    finally:
        context.target_max_block_size = saved
