"""A retrieval index over tile embeddings: LanceDB, exact for small sets, IVF-PQ above a threshold."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any, cast

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rsitr.errors import EmbeddingsMismatchError, EmbeddingsNotFoundError
from rsitr.io import storage
from rsitr.retrieval.index_meta import INDEX_META, CellGrid, IndexMeta, read_index_meta
from rsitr.retrieval.tile_rows import CELL_COLUMN, SortedTiles

log = logging.getLogger(__name__)
TABLE = "tiles"
CAPTIONS_TABLE = "captions"
ANN_THRESHOLD = 100_000
FILTER_COLUMNS = ("min_lon", "max_lon", "min_lat", "max_lat", "acquired_at")


def connect(uri: str) -> Any:
    """The LanceDB database at ``uri`` (a local folder or an ``s3://`` prefix)."""
    import lancedb  # here, not at the top: importing it takes seconds, and bad input is refused before that

    return lancedb.connect(uri, storage_options=storage.lance_options(uri))


def build_index(embeddings: str, out: str, checkpoint: str | None = None, captions: str | None = None) -> IndexMeta:
    """Build (or rebuild) the index at ``out`` from an embeddings GeoParquet file, and with ``captions`` (a
    captions file from ``rsitr embed --captions``) a caption table for image→text search beside the tiles.

    LanceDB keeps versions: a rebuild commits a new version, readers keep the one they opened.

    Returns:
        ``index.json``'s content: rows, model_version, checkpoint, kind (exact or the ANN index type), caption_rows.

    Raises:
        EmbeddingsNotFoundError: ``embeddings`` (or ``captions``) names nothing readable.
        EmbeddingsMismatchError: the captions come from another model version than the tiles.
        StorageUnreachableError: the object store stopped answering; readers keep the previous version.
    """
    embeddings, captions = locate_embeddings(embeddings, captions)
    out = storage.resolve(out)
    with SortedTiles(embeddings) as tiles:  # in cell order, in bounded memory (see rsitr.retrieval.tile_rows)
        version = tiles.model_version
        extra: dict[str, Any] = {"embeddings": embeddings, "data": tiles.source}
        caption_data = caption_index_rows(read_embeddings(captions), captions) if captions else None
        if caption_data is not None and caption_data["model_version"][0].as_py() != version:
            raise EmbeddingsMismatchError(
                f"{captions}: captions embedded by another model version than {embeddings}; re-embed"
            )
        with storage.unreachable_store_named(out, "building the index at"):
            db = connect(out)
            if caption_data is not None:
                caption_table = db.create_table(CAPTIONS_TABLE, data=caption_data, mode="overwrite")
                if caption_table.count_rows() >= ANN_THRESHOLD:
                    add_vector_index(caption_table)  # built and searched with the default ANN settings
                extra.update(captions_table=CAPTIONS_TABLE, caption_rows=caption_data.num_rows)
            lance_table = db.create_table(TABLE, data=tiles.reader(), mode="overwrite")
    return publish(out, lance_table, version, checkpoint, extra)


# what `rsitr embed --out FOLDER` writes (rsitr.retrieval.embed; named here so the index needs no torch)
EMBEDDINGS_FILE = "embeddings.parquet"
CAPTIONS_FILE = "captions.parquet"


def locate_embeddings(embeddings: str, captions: str | None = None) -> tuple[str, str | None]:
    """The embeddings and captions files a user named: the files themselves, or the folder ``rsitr embed --out``
    wrote (its ``captions.parquet`` is then used when present and ``captions`` is not given).

    Raises:
        EmbeddingsNotFoundError: no such file, or a folder without ``embeddings.parquet``.
    """
    if storage.is_dir(embeddings):
        folder = embeddings
        embeddings = storage.join(folder, EMBEDDINGS_FILE)
        if not storage.exists(embeddings):
            raise EmbeddingsNotFoundError(
                f"{folder}: a folder without {EMBEDDINGS_FILE}; give the folder `rsitr embed --out` wrote, or the file"
            )
        if captions is None and storage.exists(storage.join(folder, CAPTIONS_FILE)):
            captions = storage.join(folder, CAPTIONS_FILE)
    elif not storage.exists(embeddings):
        raise EmbeddingsNotFoundError(f"{embeddings}: no such embeddings file or folder (see `rsitr embed --out`)")
    if captions is not None and not storage.exists(captions):
        raise EmbeddingsNotFoundError(f"{captions}: no such captions file (see `rsitr embed --captions`)")
    return embeddings, captions


def read_embeddings(uri: str) -> pa.Table:
    """An embeddings GeoParquet file (see :mod:`rsitr.retrieval.embed`)."""
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as handle:
        try:
            return pq.read_table(handle)
        except pa.ArrowInvalid as err:
            raise EmbeddingsNotFoundError(f"{uri}: not an embeddings GeoParquet file ({err})") from err


def caption_index_rows(table: pa.Table, where: str = "captions") -> pa.Table:
    """Caption embedding rows as the index stores them (``vector``, caption_id, image_id, caption, split).

    Raises:
        EmbeddingsMismatchError: the rows come from several model versions, or there are none.
    """
    versions = set(table["model_version"].to_pylist())
    if len(versions) != 1:
        raise EmbeddingsMismatchError(f"{where}: expected captions of one model version, found {sorted(versions)}")
    return table.rename_columns(
        ["vector" if n == "embedding" else n for n in table.column_names]
    ).replace_schema_metadata(None)


@dataclass(frozen=True)
class AnnSettings:
    """How the ANN index is built (type, partitions, PQ sub-vectors) and searched (partitions probed, exact
    re-scoring of ``refine_factor`` × k candidates, HNSW ``ef``). ``benchmarks/index.py`` compares settings."""

    index_type: str = "IVF_PQ"
    partitions_per_sqrt_rows: float = 1.0
    sub_vectors: int = 32
    nprobes: int = 24
    refine_factor: int | None = 10
    ef: int | None = None
    filtered_exact: bool = False  # with a bbox/time filter, rank the rows that pass it exactly (no ANN)
    # a filter that keeps at most this many rows ranks them exactly: the few partitions an ANN search probes hold
    # few of a narrow filter's rows, and its recall falls, while ranking a few thousand rows exactly is quick
    exact_below: int = 0
    filter_indices: bool = False  # B-trees on the filter columns (at 10⁶ rows slower than scanning them)

    def config(self, rows: int) -> Any:
        """The LanceDB index configuration for a table of ``rows`` vectors."""
        from lancedb.index import HnswSq, IvfFlat, IvfPq, IvfSq

        partitions = max(1, round(self.partitions_per_sqrt_rows * math.sqrt(rows)))
        if self.index_type == "IVF_PQ":
            return IvfPq(distance_type="cosine", num_partitions=partitions, num_sub_vectors=self.sub_vectors)
        if self.index_type == "IVF_SQ":
            return IvfSq(distance_type="cosine", num_partitions=partitions)
        if self.index_type == "IVF_FLAT":
            return IvfFlat(distance_type="cosine", num_partitions=partitions)
        if self.index_type == "IVF_HNSW_SQ":
            return HnswSq(distance_type="cosine", num_partitions=partitions)
        raise ValueError(f"unknown ANN index type {self.index_type!r}")

    def exact_for(self, table: Any, predicate: str | None) -> bool:
        """Whether a search of ``table`` filtered by ``predicate`` (None: unfiltered) ranks its rows exactly."""
        if predicate is None:
            return False
        return self.filtered_exact or (self.exact_below > 0 and table.count_rows(predicate) <= self.exact_below)

    def apply(self, request: Any, exact: bool = False) -> Any:
        """Set the search-time knobs on a LanceDB vector query (``exact``: rank exactly, see :meth:`exact_for`)."""
        if exact:
            return request.bypass_vector_index()
        request = request.nprobes(self.nprobes)
        if self.refine_factor:
            request = request.refine_factor(self.refine_factor)
        if self.ef:
            request = request.ef(self.ef)
        return request


# The product's settings (benchmarks/index.py compares them with others on 10⁶ real-shaped vectors): 8-bit scalar
# quantization, where 32-byte PQ codes lost 40 % of the true neighbours; 32 of √n partitions probed, as 16 lost
# about one true neighbour in twenty of the 1,536-d default's; a filter keeping a few thousand tiles ranked exactly.
ANN = AnnSettings("IVF_SQ", nprobes=32, refine_factor=5, exact_below=20_000)


def add_vector_index(lance_table: Any, ann: AnnSettings = ANN) -> None:
    """The ANN index on ``vector``."""
    lance_table.create_index("vector", config=ann.config(int(lance_table.count_rows())), replace=True)


def add_filter_indices(lance_table: Any) -> None:
    """B-tree indices on the bbox/time filter columns."""
    from lancedb.index import BTree

    for column in FILTER_COLUMNS:
        lance_table.create_index(column, config=BTree())


def add_cell_index(lance_table: Any) -> None:
    """A bitmap index on ``cell``: a bbox search's ``cell IN (…)`` then reads only those cells' rows."""
    from lancedb.index import Bitmap

    lance_table.create_index(CELL_COLUMN, config=Bitmap(), replace=True)


def cell_grid(lance_table: Any) -> CellGrid:
    """The grid of a table with a ``cell`` column, with its widest footprint now (rows added or deleted since
    the last publish included)."""
    bounds = ["min_lon", "max_lon", "min_lat", "max_lat"]
    extents = lance_table.search().select(bounds).limit(None).to_arrow()
    widest = [pc.max(pc.subtract(extents[f"max_{axis}"], extents[f"min_{axis}"])).as_py() for axis in ("lon", "lat")]
    return CellGrid(widest_lon=widest[0] or 0.0, widest_lat=widest[1] or 0.0)


def ann_settings(meta: IndexMeta) -> AnnSettings | None:
    """The ANN settings an index was built with (None: exact search). Indexes from before settings were recorded
    are IVF-PQ with the first defaults."""
    if meta["kind"] == "exact":
        return None
    return AnnSettings(**meta["ann"]) if "ann" in meta else AnnSettings(index_type="IVF_PQ")


def publish(
    out: str,
    lance_table: Any,
    model_version: str,
    checkpoint: str | None,
    extra: dict[str, Any],
    ann: AnnSettings = ANN,
) -> IndexMeta:
    """Add the ANN index once the table is large enough, then point ``index.json`` at the table (atomically)."""
    rows = int(lance_table.count_rows())
    kind = "exact"
    with_cells = CELL_COLUMN in lance_table.schema.names  # tables built before the grid have no cell column
    if rows >= ANN_THRESHOLD:
        indexed = [i.columns for i in lance_table.list_indices()]
        if ["vector"] not in indexed:
            add_vector_index(lance_table, ann)
            if ann.filter_indices:
                add_filter_indices(lance_table)
        else:  # fold appended rows into the existing indices; the ANN index keeps the settings it was built with
            lance_table.optimize()
            ann = _recorded_settings(out, lance_table.name) or ann
        if with_cells and [CELL_COLUMN] not in indexed:
            add_cell_index(lance_table)
        kind = ann.index_type.lower()
        extra = {**extra, "ann": asdict(ann)}
    if with_cells:
        extra = {**extra, "cells": asdict(_widened(cell_grid(lance_table), out, lance_table.name))}
    # ``extra``: the optional keys (data, archive, ann, cells, captions_table, …)
    meta = cast(IndexMeta, {
        "table": lance_table.name,
        "rows": rows,
        "model_version": model_version,
        "kind": kind,
        "checkpoint": checkpoint,
        **extra,
        "built_at": datetime.now(UTC).isoformat(),
    })  # fmt: skip
    storage.write_json_atomic(storage.join(out, INDEX_META), meta)
    log.info("index %s: %d tiles (%s)", out, rows, kind)
    return meta


def _widened(grid: CellGrid, out: str, table: str) -> CellGrid:
    """``grid`` widened to the one ``index.json`` records for ``table``: a reader that opened an older version of the
    table may read the grid a later publish records, so the grid never narrows (see :func:`open_index`)."""
    previous = _published(out, table)
    recorded = CellGrid.from_meta(previous) if previous is not None else None
    if recorded is None or recorded.degrees != grid.degrees:
        return grid
    return replace(
        grid, widest_lon=max(grid.widest_lon, recorded.widest_lon), widest_lat=max(grid.widest_lat, recorded.widest_lat)
    )


def _recorded_settings(out: str, table: str) -> AnnSettings | None:
    previous = _published(out, table)
    return ann_settings(previous) if previous is not None else None


def _published(out: str, table: str) -> IndexMeta | None:
    """The ``index.json`` at ``out`` when it points at ``table`` (a publish of the same table before this one)."""
    meta_uri = storage.join(out, INDEX_META)
    previous: IndexMeta | None = storage.read_json(meta_uri) if storage.exists(meta_uri) else None
    return previous if previous is not None and previous["table"] == table else None


def open_index(uri: str) -> tuple[Any, IndexMeta]:
    """The LanceDB table and the metadata of the index at ``uri``.

    Raises:
        IndexNotFoundError: no index was built at ``uri``.
    """
    meta = read_index_meta(uri)
    table = connect(storage.resolve(uri)).open_table(meta["table"])
    # A publish may have committed between reading index.json and opening the table. The grid only widens
    # (publish never narrows it), so the one recorded now covers every footprint the opened version can hold.
    latest = read_index_meta(uri)
    if latest["table"] == meta["table"] and latest.get("cells"):
        meta["cells"] = latest["cells"]
    return table, meta


def open_captions(uri: str, meta: IndexMeta) -> Any | None:
    """The caption table of the index at ``uri`` (``meta``: its index.json), or None when it has none."""
    name = meta.get("captions_table")
    return connect(storage.resolve(uri)).open_table(name) if name else None


def sql_text(text: str) -> str:
    """``text`` as a SQL string literal in a LanceDB filter (quotes doubled: no text escapes the literal)."""
    return "'" + text.replace("'", "''") + "'"
