"""The shard contract: Parquet files of one row per image, a manifest beside them, GeoParquet metadata."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from rsitr.io import storage

SPLITS = ("train", "val", "test", "none")
WINDOW_TYPE = pa.struct(
    [("col_off", pa.int64()), ("row_off", pa.int64()), ("width", pa.int64()), ("height", pa.int64())]
)
BOUNDS_TYPE = pa.list_(pa.float64(), 4)

SHARD_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("image", pa.binary()),
        ("format", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("bands", pa.int32()),
        ("dtype", pa.string()),
        ("captions", pa.list_(pa.string())),
        ("split", pa.string()),
        ("label", pa.string()),
        ("source_uri", pa.string()),
        ("window", WINDOW_TYPE),
        ("crs", pa.string()),
        ("bounds", BOUNDS_TYPE),
        ("geometry", pa.binary()),
        ("acquired_at", pa.timestamp("us", tz="UTC")),
        ("sha256", pa.string()),
    ]
)

# Written by ingest; what later stages rely on to find the shards.
MANIFEST_NAME = "manifest.json"
SHARD_DIR = "shards"


def geo_metadata(column: str = "geometry") -> dict[bytes, bytes]:
    """GeoParquet 1.1 file metadata for a WKB footprint column in OGC:CRS84 (lon/lat)."""
    meta = {
        "version": "1.1.0",
        "primary_column": column,
        "columns": {column: {"encoding": "WKB", "geometry_types": ["Polygon"]}},
    }
    return {b"geo": json.dumps(meta).encode()}


def dataset_root(out: str, dataset: str) -> str:
    """Folder of one dataset: ``<out>/<dataset>``."""
    return storage.join(storage.resolve(out), dataset)


@dataclass
class Quarantined:
    """An input that was rejected, and why."""

    input: str
    reason: str


@dataclass
class ShardWriter:
    """Buffers rows and writes size-bounded shards atomically, recording each shard's checksum."""

    root: str
    target_bytes: int = 128 * 1024 * 1024
    shards: list[dict[str, Any]] = field(default_factory=list)
    splits: dict[str, dict[str, int]] = field(default_factory=dict)
    _rows: list[dict[str, Any]] = field(default_factory=list)
    _bytes: int = 0

    def add(self, row: dict[str, Any]) -> None:
        """Queue one row; flushes a shard when the buffer reaches ``target_bytes``."""
        tally = self.splits.setdefault(row["split"], {"rows": 0, "captions": 0})
        tally["rows"] += 1
        tally["captions"] += len(row["captions"])
        self._rows.append(row)
        self._bytes += len(row["image"])
        if self._bytes >= self.target_bytes:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as the next shard."""
        if not self._rows:
            return
        table = pa.Table.from_pylist(self._rows, schema=SHARD_SCHEMA)
        table = table.replace_schema_metadata(geo_metadata())
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd", row_group_size=256)
        data = sink.getvalue()
        name = f"part-{len(self.shards):05d}.parquet"
        storage.write_bytes_atomic(storage.join(self.root, SHARD_DIR, name), data)
        self.shards.append(
            {"path": f"{SHARD_DIR}/{name}", "rows": table.num_rows, "sha256": hashlib.sha256(data).hexdigest()}
        )
        self._rows, self._bytes = [], 0


def write_manifest(
    root: str,
    writer: ShardWriter,
    quarantined: list[Quarantined],
    inputs_seen: int,
    parameters: dict[str, Any],
) -> dict[str, Any]:
    """Write ``manifest.json`` for a finished ingest and return it.

    Raises:
        RuntimeError: the counts do not reconcile (inputs seen != rows written + quarantined).
    """
    splits = writer.splits
    n_rows = sum(tally["rows"] for tally in splits.values())
    n_captions = sum(tally["captions"] for tally in splits.values())
    if inputs_seen != n_rows + len(quarantined):
        raise RuntimeError(
            f"ingest of {root}: {inputs_seen} inputs seen but {n_rows} written + {len(quarantined)} quarantined"
        )
    manifest = {
        "inputs_seen": inputs_seen,
        "rows": n_rows,
        "captions": n_captions,
        "splits": splits,
        "quarantined": [{"input": q.input, "reason": q.reason} for q in quarantined],
        "shards": writer.shards,
        "parameters": parameters,
    }
    storage.write_json_atomic(storage.join(root, MANIFEST_NAME), manifest)
    return manifest


class ShardsNotFoundError(FileNotFoundError):
    """No ingested dataset (manifest + shards) at the given URI."""


def read_manifest(root: str) -> dict[str, Any]:
    """The manifest of the dataset at ``root``.

    Raises:
        ShardsNotFoundError: there is no manifest at ``root``.
    """
    uri = storage.join(storage.resolve(root), MANIFEST_NAME)
    if not storage.exists(uri):
        raise ShardsNotFoundError(
            f"no ingested dataset at {root} (missing {MANIFEST_NAME}); run `rsitr ingest …` to create it"
        )
    manifest: dict[str, Any] = storage.read_json(uri)
    return manifest


def shard_uris(root: str) -> list[str]:
    """Full URIs of a dataset's shards, in manifest order."""
    root = storage.resolve(root)
    return [storage.join(root, shard["path"]) for shard in read_manifest(root)["shards"]]


def iter_rows(root: str, columns: list[str] | None = None, split: str | None = None) -> Iterator[dict[str, Any]]:
    """Rows of a dataset's shards without loading them all at once (small jobs and tests)."""
    for uri in shard_uris(root):
        fs, path = storage.filesystem(uri)
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            for batch in parquet.iter_batches(columns=columns, batch_size=256):
                for row in batch.to_pylist():
                    if split is None or row.get("split") == split:
                        yield row
