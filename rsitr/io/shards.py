"""The shard contract: Parquet files of one row per image, a manifest beside them, GeoParquet metadata."""

# no `from __future__ import annotations` here: TypedDict reads NotRequired from evaluated annotations (3.11)
import hashlib
import io
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NotRequired, TypedDict, cast

import pyarrow as pa
import pyarrow.parquet as pq

from rsitr.errors import DatasetError, UserError
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

# JPEG/PNG bytes do not compress further: zstd on them costs time and saves nothing.
COMPRESSION = {name: ("none" if name == "image" else "zstd") for name in SHARD_SCHEMA.names}

# Written by ingest; what later stages rely on to find the shards.
MANIFEST_NAME = "manifest.json"
SHARD_DIR = "shards"


class ShardEntry(TypedDict):
    """One shard in the manifest."""

    path: str  # relative to the dataset root
    rows: int
    bytes: int
    sha256: str


class SplitCounts(TypedDict):
    rows: int
    captions: int


class RejectedInput(TypedDict):
    """A quarantined input or a rejected caption, as the manifest lists it."""

    input: str
    reason: str


class CaptionStats(TypedDict):
    """The manifest's caption-side counts, from the caption corpus as read."""

    captions_seen: int
    captions_rejected: list[RejectedInput]
    caption_formats: dict[str, str]  # caption file → the format it was read as


class Manifest(TypedDict):
    """``manifest.json``: the contract docs/contracts.md ("Manifest") describes; the required keys are its table."""

    shards: list[ShardEntry]
    rows: int
    splits: dict[str, SplitCounts]
    inputs_seen: int
    quarantined: list[RejectedInput]
    skipped: int
    captions: int
    captions_seen: int
    captions_rejected: list[RejectedInput]
    caption_formats: dict[str, str]
    captions_of_unwritten_inputs: int
    fingerprint: str
    parameters: dict[str, Any]
    # scene ingests: one summary per scene; corpus ingests: where each row's split came from
    scenes: NotRequired[list[dict[str, Any]]]
    split_sources: NotRequired[dict[str, int]]
    split_conflicts_with_table: NotRequired[int]


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


def write_shard(root: str, name: str, rows: list[dict[str, Any]]) -> ShardEntry:
    """Write rows as ``<root>/shards/<name>`` atomically; the same rows always give the same bytes.

    Returns:
        The shard's manifest entry: ``path`` (relative to ``root``), ``rows``, ``bytes`` and ``sha256``.
    """
    table = pa.Table.from_pylist(rows, schema=SHARD_SCHEMA).replace_schema_metadata(geo_metadata())
    sink = io.BytesIO()
    pq.write_table(table, sink, compression=COMPRESSION, row_group_size=256)
    data = sink.getvalue()
    storage.write_bytes_atomic(storage.join(root, SHARD_DIR, name), data)
    return {
        "path": f"{SHARD_DIR}/{name}",
        "rows": table.num_rows,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


class ManifestMismatchError(RuntimeError):
    """The counts of an ingest do not reconcile; the manifest is not written."""


def write_manifest(root: str, manifest: Manifest) -> Manifest:
    """Check that a finished ingest's counts reconcile, then write ``manifest.json`` atomically.

    Inputs seen = rows + quarantined + skipped, and captions seen = captions written + captions rejected
    + captions of the inputs that were quarantined or skipped.

    Raises:
        ManifestMismatchError: the counts do not reconcile.
    """
    accounted = manifest["rows"] + len(manifest["quarantined"]) + manifest["skipped"]
    if manifest["inputs_seen"] != accounted:
        raise ManifestMismatchError(
            f"ingest of {root}: {manifest['inputs_seen']} inputs seen but {manifest['rows']} written + "
            f"{len(manifest['quarantined'])} quarantined + {manifest['skipped']} skipped"
        )
    captions = manifest["captions"] + len(manifest["captions_rejected"]) + manifest["captions_of_unwritten_inputs"]
    if manifest["captions_seen"] != captions:
        raise ManifestMismatchError(
            f"ingest of {root}: {manifest['captions_seen']} captions seen but {captions} accounted for"
        )
    storage.write_json_atomic(storage.join(root, MANIFEST_NAME), manifest)
    return manifest


class ShardsNotFoundError(UserError, FileNotFoundError):
    """No ingested dataset (manifest + shards) at the given URI."""


def read_manifest(root: str) -> Manifest:
    """The manifest of the dataset at ``root``.

    Raises:
        ShardsNotFoundError: there is no manifest at ``root``.
    """
    uri = storage.join(storage.resolve(root), MANIFEST_NAME)
    if not storage.exists(uri):
        raise ShardsNotFoundError(
            f"no ingested dataset at {root} (missing {MANIFEST_NAME}); run `rsitr ingest …` to create it"
        )
    return cast(Manifest, storage.read_json(uri))


def shard_uris(root: str) -> list[str]:
    """Full URIs of a dataset's shards, in manifest order."""
    root = storage.resolve(root)
    return [storage.join(root, shard["path"]) for shard in read_manifest(root)["shards"]]


def iter_rows(root: str, columns: list[str] | None = None, split: str | None = None) -> Iterator[dict[str, Any]]:
    """Rows of a dataset's shards without loading them all at once (small jobs and tests); with ``split``, only
    that split's rows (the ``split`` column is read for it even when ``columns`` leaves it out)."""
    read = columns if split is None or columns is None or "split" in columns else [*columns, "split"]
    for uri in shard_uris(root):
        fs, path = storage.filesystem(uri)
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            for batch in parquet.iter_batches(columns=read, batch_size=256):
                for row in batch.to_pylist():
                    if split is None or row.get("split") == split:
                        yield row


@contextmanager
def parquet_read_named(path: str, columns: Sequence[str]) -> Iterator[None]:
    """Reading ``columns`` of the Parquet file at ``path`` inside: a file that cannot be read, or lacks a column,
    fails naming the file, the columns and the reason (a Ray read task's error names no file otherwise).

    Raises:
        DatasetError: as above, from the read's ``OSError`` or Arrow error.
    """
    try:
        yield
    except (OSError, pa.ArrowException) as err:
        raise DatasetError(f"{path}: not a readable Parquet file with columns {list(columns)} ({err})") from err
