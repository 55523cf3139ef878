"""A retrieval index over tile embeddings: LanceDB, exact for small sets, IVF-PQ above a threshold."""

from __future__ import annotations

import json
import logging
import math
from datetime import UTC, datetime
from typing import Any

import lancedb
import pyarrow as pa
import pyarrow.parquet as pq
import shapely

from rsitr.io import storage

log = logging.getLogger(__name__)
TABLE = "tiles"
INDEX_META = "index.json"
ANN_THRESHOLD = 100_000
FILTER_COLUMNS = ("min_lon", "max_lon", "min_lat", "max_lat", "acquired_at")


class IndexNotFoundError(FileNotFoundError):
    """No index at the given URI."""


def _bbox_columns(geometries: list[bytes | None]) -> dict[str, list[float | None]]:
    cols: dict[str, list[float | None]] = {"min_lon": [], "min_lat": [], "max_lon": [], "max_lat": []}
    for wkb in geometries:
        bounds = shapely.from_wkb(wkb).bounds if wkb else (None,) * 4
        for key, value in zip(cols, bounds, strict=True):
            cols[key].append(value)
    return cols


def build_index(embeddings: str, out: str, checkpoint: str | None = None) -> dict[str, Any]:
    """Build (or rebuild) the index at ``out`` from an embeddings GeoParquet file.

    LanceDB keeps versions: a rebuild commits a new version, readers keep the one they opened.

    Returns:
        ``index.json``'s content: rows, model_version, checkpoint, kind (exact or ivf_pq).
    """
    table = read_embeddings(embeddings)
    data = index_rows(table, embeddings)
    out = storage.resolve(out)
    lance_table = lancedb.connect(out).create_table(TABLE, data=data, mode="overwrite")
    extra = {"embeddings": embeddings, "data": embeddings_source(table)}
    return publish(out, lance_table, data["model_version"][0].as_py(), checkpoint, extra)


def read_embeddings(uri: str) -> pa.Table:
    """An embeddings GeoParquet file (see :mod:`rsitr.embed`)."""
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle)


def embeddings_source(table: pa.Table) -> str | None:
    """The ingested dataset an embeddings table was computed from, when it records one."""
    source: str | None = json.loads((table.schema.metadata or {}).get(b"rsitr", b"{}")).get("data")
    return source


def index_rows(table: pa.Table, where: str = "embeddings") -> pa.Table:
    """Embedding rows as the index stores them: ``vector`` plus the footprint's lon/lat bounds for filtering.

    Raises:
        ValueError: the rows come from several model versions.
    """
    versions = set(table["model_version"].to_pylist())
    if len(versions) != 1:
        raise ValueError(f"{where}: embeddings of several model versions {sorted(versions)}; re-embed")
    boxes = _bbox_columns(table["geometry"].to_pylist())
    data = table.rename_columns(["vector" if n == "embedding" else n for n in table.column_names])
    for name, values in boxes.items():
        data = data.append_column(name, pa.array(values, type=pa.float64()))
    return data.replace_schema_metadata(None)


def publish(
    out: str, lance_table: Any, model_version: str, checkpoint: str | None, extra: dict[str, Any]
) -> dict[str, Any]:
    """Add the ANN index once the table is large enough, then point ``index.json`` at the table (atomically)."""
    rows = int(lance_table.count_rows())
    kind = "exact"
    if rows >= ANN_THRESHOLD:
        if not lance_table.list_indices():
            lance_table.create_index(
                metric="cosine", index_type="IVF_PQ", num_partitions=int(math.sqrt(rows)), num_sub_vectors=32
            )
            for column in FILTER_COLUMNS:  # so bbox/time prefilters do not scan every row
                lance_table.create_scalar_index(column, index_type="BTREE")
        else:  # fold appended rows into the existing ANN index
            lance_table.optimize()
        kind = "ivf_pq"
    meta = {
        "table": lance_table.name,
        "rows": rows,
        "model_version": model_version,
        "kind": kind,
        "checkpoint": checkpoint,
        **extra,
        "built_at": datetime.now(UTC).isoformat(),
    }
    storage.write_json_atomic(storage.join(out, INDEX_META), meta)
    log.info("index %s: %d tiles (%s)", out, rows, kind)
    return meta


def open_index(uri: str) -> tuple[Any, dict[str, Any]]:
    """The LanceDB table and the metadata of the index at ``uri``.

    Raises:
        IndexNotFoundError: no index was built at ``uri``.
    """
    uri = storage.resolve(uri)
    meta_uri = storage.join(uri, INDEX_META)
    if not storage.exists(meta_uri):
        raise IndexNotFoundError(f"no index at {uri} (missing {INDEX_META}); build one with `rsitr index build`")
    meta: dict[str, Any] = storage.read_json(meta_uri)
    return lancedb.connect(uri).open_table(meta["table"]), meta


def describe(meta: dict[str, Any]) -> str:
    """One line about an index."""
    return json.dumps({k: meta[k] for k in ("rows", "kind", "model_version")})
