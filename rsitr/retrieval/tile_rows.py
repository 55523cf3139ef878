"""Tile rows as the index stores them: the embedding as ``vector``, the footprint's lon/lat bounds for filtering and
its ``cell`` on the index's grid (:class:`~rsitr.retrieval.index_meta.CellGrid`; null without a footprint), in cell
order, so that the rows a bbox reaches lie together.

:func:`index_rows` orders a table held in memory (a re-index batch). :class:`SortedTiles` does the same for an
embeddings file of any size with bounded memory: the vectors (nearly all of a row's bytes: 6 KiB at 1,536-d) go to
a local scratch file as they are read, the rest of each row (id, footprint, time: a few hundred bytes) stays in
memory, and the rows come back in cell order a batch at a time, their vectors read back from the scratch file.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import shapely

from rsitr.errors import EmbeddingsMismatchError, EmbeddingsNotFoundError
from rsitr.io import storage
from rsitr.retrieval.index_meta import CellGrid

CELL_COLUMN = "cell"
VECTOR_COLUMN = "vector"
EMBEDDING_COLUMN = "embedding"
# where an embeddings file records the ingested dataset it was embedded from (rsitr.retrieval.embed writes it)
PROVENANCE_KEY = b"rsitr"
# rows read, and written to the index, at a time (48 MiB of 1,536-d vectors)
BATCH_ROWS = 8192


def index_rows(table: pa.Table, where: str = "embeddings") -> pa.Table:
    """Embedding rows (held in memory) as the index stores them, in cell order.

    Raises:
        EmbeddingsMismatchError: the rows come from several model versions.
    """
    model_version(table, where)
    data = with_cells(table.rename_columns([_renamed(name) for name in table.column_names]))
    return data.take(pc.sort_indices(data, [(CELL_COLUMN, "ascending")])).replace_schema_metadata(None)


def model_version(table: pa.Table, where: str) -> str:
    """The one model version of a table's rows.

    Raises:
        EmbeddingsMismatchError: the rows come from several model versions (or there are none).
    """
    versions = set(pc.unique(table["model_version"]).to_pylist())
    if len(versions) != 1:
        raise EmbeddingsMismatchError(f"{where}: embeddings of several model versions {sorted(versions)}; re-embed")
    return str(versions.pop())


def with_cells(table: pa.Table) -> pa.Table:
    """``table`` with the bounds of its ``geometry`` (WKB, lon/lat) and their cell appended."""
    geometry = shapely.from_wkb(table["geometry"].to_numpy(zero_copy_only=False))
    bounds = shapely.bounds(geometry)  # NaN where a row has no footprint
    missing = np.isnan(bounds[:, 0])
    for column, name in enumerate(("min_lon", "min_lat", "max_lon", "max_lat")):
        table = table.append_column(name, pa.array(bounds[:, column], type=pa.float64(), mask=missing))
    corner = np.asarray(CellGrid().cell(bounds[:, 0], bounds[:, 1]))
    cells = pa.array(np.nan_to_num(corner, nan=-1).astype(np.int32), mask=np.isnan(corner))
    return table.append_column(CELL_COLUMN, cells)


def _renamed(name: str) -> str:
    return VECTOR_COLUMN if name == EMBEDDING_COLUMN else name


class SortedTiles:
    """The rows of an embeddings file (see :mod:`rsitr.retrieval.embed`) in cell order, a batch at a time, in bounded
    memory: hold it open with ``with``; its scratch file (the size of the vectors) is removed on leaving.

    Raises:
        EmbeddingsNotFoundError: the file is not an embeddings GeoParquet file.
        EmbeddingsMismatchError: its rows come from several model versions.
    """

    def __init__(self, uri: str, batch_rows: int = BATCH_ROWS) -> None:
        self.uri = uri
        self.batch_rows = batch_rows
        self._scratch = tempfile.TemporaryDirectory(prefix="rsitr-index-")
        self._vectors = Path(self._scratch.name) / "vectors.f32"
        try:
            self._rest, self.vector_type = self._spill()
            self.model_version = model_version(self._rest, uri)
            self._rest = with_cells(self._rest)
            self._order = pc.sort_indices(self._rest, [(CELL_COLUMN, "ascending")]).to_numpy()
        except BaseException:
            self._scratch.cleanup()
            raise
        self.rows = self._rest.num_rows
        self.dim = self.vector_type.list_size
        names = [_renamed(name) for name in self._columns] + self._rest.column_names[len(self._columns) - 1 :]
        fields = {field.name: field for field in self._rest.schema}
        fields[VECTOR_COLUMN] = pa.field(VECTOR_COLUMN, self.vector_type)
        self.schema = pa.schema([fields[name] for name in names])

    def _spill(self) -> tuple[pa.Table, pa.FixedSizeListType]:
        fs, path = storage.filesystem(self.uri)
        with fs.open(path, "rb") as handle, open(self._vectors, "wb") as vectors:
            try:
                parquet = pq.ParquetFile(handle)
                self._columns = parquet.schema_arrow.names
                provenance = (parquet.schema_arrow.metadata or {}).get(PROVENANCE_KEY, b"{}")
                vector_type = parquet.schema_arrow.field(EMBEDDING_COLUMN).type
                if not pa.types.is_fixed_size_list(vector_type):
                    raise EmbeddingsNotFoundError(f"{self.uri}: its embedding column is not fixed-size vectors")
                rest = []
                for batch in parquet.iter_batches(batch_size=self.batch_rows):
                    column = batch.column(EMBEDDING_COLUMN)
                    vectors.write(column.flatten().to_numpy().astype(np.float32, copy=False).tobytes())
                    rest.append(batch.drop_columns([EMBEDDING_COLUMN]))
            except (pa.ArrowInvalid, KeyError) as err:
                raise EmbeddingsNotFoundError(f"{self.uri}: not an embeddings GeoParquet file ({err})") from err
        schema = parquet.schema_arrow.remove(parquet.schema_arrow.get_field_index(EMBEDDING_COLUMN))
        self.source: str | None = json.loads(provenance).get("data")  # the ingested dataset it was embedded from
        return pa.Table.from_batches(rest, schema=schema.remove_metadata()), vector_type

    def batches(self) -> Iterator[pa.RecordBatch]:
        """The rows in cell order, ``batch_rows`` at a time, as ``schema`` says."""
        for start in range(0, self.rows, self.batch_rows):
            picked = self._order[start : start + self.batch_rows]
            rest = self._rest.take(picked)
            # mapped for one batch only: the pages read stay file cache, not this process's memory
            stored = np.memmap(self._vectors, dtype=np.float32, mode="r", shape=(self.rows, self.dim))
            vectors = pa.FixedSizeListArray.from_arrays(pa.array(stored[picked].ravel()), type=self.vector_type)
            del stored
            columns = {name: rest[name].combine_chunks() for name in rest.column_names}
            columns[VECTOR_COLUMN] = vectors
            yield pa.RecordBatch.from_arrays([columns[name] for name in self.schema.names], schema=self.schema)

    def reader(self) -> pa.RecordBatchReader:
        """:meth:`batches` as a stream a table can be created from."""
        return pa.RecordBatchReader.from_batches(self.schema, self.batches())

    def __enter__(self) -> SortedTiles:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._scratch.cleanup()
