"""Incremental archive indexing: scenes not yet indexed (by content hash) are tiled, embedded and appended.

A ledger beside the index (``ledger-<table>.json``) maps each indexed scene's SHA-256 to its URI, tile count and
batch. Each run hashes the archive's scenes (reusing a hash while a file's size and mtime are unchanged) and then:
a known hash under a new URI is a rename (rows get the new URI, nothing is re-embedded); a known URI with a new
hash is a changed file (its old rows go, the new content is indexed); unknown hashes are ingested into a batch,
embedded and appended in one LanceDB commit. ``index.json`` and the ledger are written after that commit, so an
interrupted run leaves the previous version queryable and the next run redoes the batch (its rows are replaced, not
doubled). Each model version gets its own table: a new checkpoint re-embeds everything into a new table and
switches ``index.json`` to it only once it is complete. One run at a time per index (a lock file).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict

import pyarrow as pa

from rsitr import ingest
from rsitr.errors import IndexBusyError
from rsitr.io import geotiff, shards, storage
from rsitr.models import checkpoint as ckpt
from rsitr.retrieval import embed, index
from rsitr.retrieval.tile_rows import CELL_COLUMN, index_rows
from rsitr.runtime.locks import LockHeldError, pid_lock

log = logging.getLogger("rsitr.retrieval.reindex")
LOCK_NAME = ".reindex.lock"


@contextmanager
def index_lock(out: str) -> Iterator[None]:
    """Hold the index's re-index lock (an OS file lock: released even when the holder is killed).

    Local indexes lock ``<out>/.reindex.lock``; for an ``s3://`` index the lock lives in this machine's
    ``~/.cache/rsitr/locks`` (one scheduler host), since S3 offers no lock of its own.

    Raises:
        IndexBusyError: another process holds it.
    """
    if storage.is_remote(out):
        path = Path.home() / ".cache" / "rsitr" / "locks" / hashlib.sha256(out.encode()).hexdigest()[:16]
    else:
        path = Path(out) / LOCK_NAME
    try:
        with pid_lock(path):
            yield
    except LockHeldError as err:
        raise IndexBusyError(f"another re-index of {out} is running (process {err.holder}; lock {path})") from None


def scene_digest(spec: str) -> str:
    """SHA-256 of a scene's bytes (of each file in order, for comma-joined band files)."""
    digest = hashlib.sha256()
    for uri in spec.split(","):
        fs, path = storage.filesystem(uri)
        with fs.open(path, "rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def _stat(spec: str) -> list[Any]:
    stats = []
    for uri in spec.split(","):
        fs, path = storage.filesystem(uri)
        info = fs.info(path)
        stats.append([info.get("size"), str(info.get("mtime") or info.get("LastModified") or info.get("ETag"))])
    return stats


def _digests(specs: list[str], previous: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each scene's hash, reused from the last run while its files' size and mtime are the same."""
    found = {}
    for spec in specs:
        stat = _stat(spec)
        known = previous.get(spec)
        sha = known["sha256"] if known and known.get("stat") == stat else scene_digest(spec)
        found[spec] = {"sha256": sha, "stat": stat}
    return found


def table_name(model_version: str) -> str:
    """The index table that holds one model version's embeddings."""
    return f"tiles_{model_version.replace('-', '_')[:40]}"


def _open_table(db: Any, name: str) -> Any:
    """The named table, or None before its first batch."""
    try:
        return db.open_table(name)
    except ValueError:  # LanceDB: "Table … was not found"
        return None


class ReindexSummary(TypedDict):
    """What one re-index did (printed by ``rsitr index update``, returned by the nightly flow)."""

    scenes: int  # raster scenes under the archive
    new_scenes: int
    renamed: int
    changed: int  # same path, other bytes: re-embedded
    quarantined: int  # of the new scenes
    tiles_added: int
    index: str
    table: str
    rows: int  # tiles in the table afterwards
    nothing_new: bool


@dataclass
class _Changes:
    """How the archive differs from the ledger."""

    renamed: list[tuple[str, str]] = field(default_factory=list)  # (old uri, new uri), same bytes
    changed: list[str] = field(default_factory=list)  # known uri, new bytes
    new: list[str] = field(default_factory=list)  # to ingest and embed (includes changed)


def reindex_archive(
    archive: str, out: str, checkpoint: str, options: geotiff.TileOptions | None = None, workers: int | None = 1
) -> ReindexSummary:
    """Bring the index at ``out`` up to date with the scenes under ``archive``.

    Raises:
        IndexBusyError: another re-index of ``out`` is running.
        ingest.IngestError: no raster scene under ``archive``.
        StorageUnreachableError: the object store stopped answering; the index keeps its previous version.
    """
    out = storage.resolve(out)
    checkpoint_meta = ckpt.read_meta(checkpoint)
    checkpoint, model_version = checkpoint_meta.uri, checkpoint_meta.model_version
    name = table_name(model_version)
    ledger_uri = storage.join(out, f"ledger-{name}.json")
    with index_lock(out), storage.unreachable_store_named(out, "re-indexing into"):
        ledger: dict[str, Any] = (
            storage.read_json(ledger_uri) if storage.exists(ledger_uri) else {"scenes": {}, "files": {}}
        )
        specs = ingest.expand_scenes([archive])
        if not specs:
            raise ingest.IngestError(f"no raster scenes found under {archive}")
        current = _digests(specs, ledger["files"])
        by_hash: dict[str, dict[str, Any]] = ledger["scenes"]
        changes = _compare(current, by_hash)
        db = index.connect(out)
        table = _open_table(db, name)
        summary = ReindexSummary(
            scenes=len(specs), new_scenes=len(changes.new), renamed=len(changes.renamed), changed=len(changes.changed),
            quarantined=0, tiles_added=0, index=out, table=name, rows=table.count_rows() if table is not None else 0,
            nothing_new=not changes.new and not changes.renamed,
        )  # fmt: skip
        if summary["nothing_new"]:
            log.info("nothing new under %s: all %d scenes are indexed (model %s)", archive, len(specs), model_version)
            return summary
        _apply_moves(table, by_hash, changes)
        if changes.new:
            digests = sorted(current[s]["sha256"] for s in changes.new)
            # named by content: an interrupted run's batch resumes (ingest skips finished units) next time
            batch = "batch-" + hashlib.sha256(f"{model_version}:{digests}".encode()).hexdigest()[:12]
            rows, manifest = _ingest_and_embed(changes.new, batch, out, checkpoint, options, workers)
            if rows is not None:
                table = _publish_batch(db, name, table, rows, batch)
                summary["tiles_added"] = rows.num_rows
            summary["quarantined"] = _remember(by_hash, changes.new, current, batch, manifest)
        if table is not None:
            meta = index.publish(out, table, model_version, checkpoint, {"archive": archive, "data": None})
            summary["rows"] = int(meta.get("rows", 0))
        storage.write_json_atomic(ledger_uri, {"scenes": by_hash, "files": current, "model_version": model_version})
    log.info("re-indexed %s: %s", archive, summary)
    return summary


def _compare(current: dict[str, dict[str, Any]], by_hash: dict[str, dict[str, Any]]) -> _Changes:
    changes = _Changes()
    uri_of_hash = {record["uri"]: sha for sha, record in by_hash.items()}
    for spec, info in current.items():
        sha = info["sha256"]
        if sha in by_hash:
            if by_hash[sha]["uri"] != spec and by_hash[sha]["uri"] not in current:
                changes.renamed.append((by_hash[sha]["uri"], spec))
            continue
        if spec in uri_of_hash:
            changes.changed.append(spec)
        changes.new.append(spec)
    return changes


def _apply_moves(table: Any, by_hash: dict[str, dict[str, Any]], changes: _Changes) -> None:
    """Renamed scenes keep their rows under the new path; changed scenes lose theirs (re-embedded as new)."""
    uri_of_hash = {record["uri"]: sha for sha, record in by_hash.items()}
    for old_uri, new_uri in changes.renamed:
        if table is not None:
            table.update(where=f"source_uri = {index.sql_text(old_uri)}", values={"source_uri": new_uri})
        by_hash[uri_of_hash[old_uri]]["uri"] = new_uri
    for spec in changes.changed:
        if table is not None:
            table.delete(f"source_uri = {index.sql_text(spec)}")
        by_hash.pop(uri_of_hash[spec], None)


def _publish_batch(db: Any, name: str, table: Any, rows: pa.Table, batch: str) -> Any:
    rows = rows.append_column("batch", [[batch] * rows.num_rows])
    if table is None:
        return db.create_table(name, data=rows)
    if CELL_COLUMN not in table.schema.names:  # a table from before the cell grid: its searches scan bounds
        rows = rows.drop_columns([CELL_COLUMN])
    table.delete(f"batch = {index.sql_text(batch)}")  # a half-published earlier attempt of this batch
    table.add(rows)
    return table


def _remember(
    by_hash: dict[str, dict[str, Any]],
    new: list[str],
    current: dict[str, dict[str, Any]],
    batch: str,
    manifest: shards.Manifest,
) -> int:
    """Record the new scenes in the ledger; how many of them were quarantined.

    A rejected scene is remembered too: it is retried only once its bytes change.
    """
    reports = {scene["source"]: scene for scene in manifest.get("scenes", [])}
    rejected = {q["input"]: q["reason"] for q in manifest["quarantined"]}
    for spec in new:
        by_hash[current[spec]["sha256"]] = {
            "uri": spec,
            "batch": batch,
            "indexed_at": datetime.now(UTC).isoformat(),
            "tiles": reports.get(spec, {}).get("rows", 0),
            "quarantined": rejected.get(spec),
        }
    return sum(spec in rejected for spec in new)


def _ingest_and_embed(
    specs: list[str],
    batch: str,
    out: str,
    checkpoint: str,
    options: geotiff.TileOptions | None,
    workers: int | None,
) -> tuple[pa.Table | None, shards.Manifest]:
    """Tile and embed one batch of scenes; ``(index rows or None when every tile was rejected, manifest)``."""
    batches = storage.join(out, "batches")
    root = shards.dataset_root(batches, batch)
    try:
        manifest = ingest.ingest_scenes(specs, batch, batches, options, workers=workers)
    except ingest.IngestError:
        if not storage.exists(storage.join(root, shards.MANIFEST_NAME)):
            raise
        manifest = shards.read_manifest(root)  # nothing usable: every new scene was quarantined
    if not manifest["rows"]:
        return None, manifest
    summary = embed.embed_archive(checkpoint, root, storage.join(batches, batch, "embedded"))
    table = index.read_embeddings(summary["embeddings"])
    return index_rows(table, summary["embeddings"]), manifest
