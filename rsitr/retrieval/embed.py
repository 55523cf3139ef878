"""Batch-embed an archive's tiles (and, when asked, its captions) with a trained model into GeoParquet.

Ray Data reads the shards and decodes; an actor pool (one model per actor) embeds. Work is saved per shard under
``<out>/_parts/<model_version>/`` (``<model_version>-<N>views`` when images average N views) as soon as a shard is
complete, so an interrupted run resumes with the shards it had not finished; the final files are written
atomically from the parts, which are then removed.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import posixpath
import time
from collections.abc import Callable
from typing import Any, NotRequired, TypedDict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
import torch

from rsitr.config import checked_test_views
from rsitr.data.preprocess import caption_rows, decode_with_paths
from rsitr.data.shard_reads import read_shard_slices
from rsitr.data.streams import DATA_TASK_CPUS
from rsitr.io import shards, storage
from rsitr.models import checkpoint as ckpt
from rsitr.retrieval.embedders import CaptionEmbedder, ImageEmbedder
from rsitr.retrieval.index import CAPTIONS_FILE, EMBEDDINGS_FILE
from rsitr.retrieval.tile_rows import PROVENANCE_KEY
from rsitr.runtime.precision import checked
from rsitr.runtime.raysession import init_ray

log = logging.getLogger(__name__)
PARTS_DIR = "_parts"
# rows per Parquet row group of the files written: a reader (the index build) can take them a group at a time
ROW_GROUP_ROWS = 65_536
META_COLUMNS = ["image_id", "geometry", "acquired_at", "source_uri", "window", "split"]


def default_actors() -> int:
    """One single-threaded CPU actor per core of a local Ray (one per two logical CPUs on a cluster), or one per
    GPU when there are GPUs."""
    resources = ray.cluster_resources()
    if resources.get("GPU"):
        return int(resources["GPU"])
    cpus = int(resources.get("CPU", 1))
    return max(1, min(cpus, os.cpu_count() or 1) if len(ray.nodes()) == 1 else cpus // 2)


def _part_uri(parts: str, kind: str, shard: shards.ShardEntry) -> str:
    # the shard's checksum in the name: a re-ingested shard with other bytes is never taken for a finished one
    stem = posixpath.basename(shard["path"]).removesuffix(".parquet")
    return storage.join(parts, f"{kind}-{stem}-{shard['sha256'][:16]}.parquet")


def _expected_keys(data: str, shard: shards.ShardEntry, kind: str) -> int:
    if kind == "images":
        return shard["rows"]
    fs, path = storage.filesystem(storage.join(data, shard["path"]))
    with fs.open(path, "rb") as handle:
        captions = pq.read_table(handle, columns=["captions"])["captions"]
    return sum(len(c or []) for c in captions.to_pylist())


def _embed_pending(
    ds: ray.data.Dataset, expected: dict[str, int], write: Callable[[str, dict[str, Any]], None]
) -> dict[str, float]:
    """Consume ``ds`` (rows: key, path, embedding), handing each shard's vectors to ``write`` once it is complete.

    Returns:
        Seconds until the first embeddings arrived (start-up: planning, actors loading the model) and in all.

    Raises:
        RuntimeError: the stream ended with a shard incomplete.
    """
    done: dict[str, dict[str, np.ndarray]] = {name: {} for name in expected}
    for name in [n for n, count in expected.items() if count == 0]:
        write(name, done.pop(name))
    started, first = time.monotonic(), None
    # blocks as they come (one per embedded batch): a shard is saved as soon as its last rows arrive
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        first = first or time.monotonic() - started
        for key, path, vector in zip(batch["key"], batch["path"], batch["embedding"], strict=True):
            name = posixpath.basename(str(path))
            done[name][str(key)] = vector
            if len(done[name]) == expected[name]:
                write(name, done.pop(name))
    if done:
        raise RuntimeError(f"embedding ended with shards incomplete: {sorted(done)}")
    return {"first_batch_s": first or 0.0, "stream_s": time.monotonic() - started}


def _write_part(uri: str, vectors: dict[str, np.ndarray]) -> None:
    keys = sorted(vectors)
    dim = len(vectors[keys[0]]) if keys else 0
    table = pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "embedding": pa.array([vectors[k].astype(np.float32) for k in keys], type=pa.list_(pa.float32(), dim)),
        }
    )
    sink = io.BytesIO()
    pq.write_table(table, sink)
    storage.write_bytes_atomic(uri, sink.getvalue())


def _read_parts(uris: list[str]) -> dict[str, np.ndarray]:
    vectors: dict[str, np.ndarray] = {}
    for uri in uris:
        fs, path = storage.filesystem(uri)
        with fs.open(path, "rb") as handle:
            table = pq.read_table(handle)
        if table.num_rows:
            matrix = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
            vectors.update(zip(table["key"].to_pylist(), matrix, strict=True))
    return vectors


def decoded_tiles(uris: list[str], image_size: int, batch_size: int, decoders: int) -> ray.data.Dataset:
    """The shards' tiles decoded (``image_id``, ``image``, ``path``) in their read tasks, at most ``decoders`` at
    once, in blocks of one batch.

    Each block reaches the embedding actors as one input, so they share a shard's batches. With Ray Data's default
    block size (128 MB) a shard of a few thousand tiles was one or two blocks, and one actor embedded them alone
    while the others waited (1,024 tiles, 2 actors: one had 896 of them).
    """
    return read_shard_slices(
        uris,
        ["image_id", "image"],
        functools.partial(decode_with_paths, image_size=image_size),
        slice_rows=batch_size,
        tasks=decoders,
        num_cpus=DATA_TASK_CPUS,
        # a read cuts a block once it holds more than this: just under one decoded batch (uint8, HWC) cuts after each
        block_bytes=int(0.9 * batch_size * image_size * image_size * 3),
    )


def decoders_for(actors: int) -> int:
    """Decode tasks to run at once beside ``actors``: one per CPU actor (decoding a tile costs ~1/30 of embedding it
    on a core), four per GPU. Unbounded, every shard's read would start a decode process at once, and on a small
    machine the actors' own start would wait behind them."""
    return actors * (4 if torch.cuda.is_available() else 1)


def caption_texts(uris: list[str], batch_size: int, readers: int) -> ray.data.Dataset:
    """The shards' captions, one row each (``caption_id``, ``caption``, ``path``), read by at most ``readers`` tasks
    at once, in blocks of one batch (so the embedding actors share a shard, as with :func:`decoded_tiles`; text rows
    are too small to cut by bytes)."""
    rows = read_shard_slices(uris, ["image_id", "captions"], caption_rows, batch_size, readers, DATA_TASK_CPUS)
    return rows.repartition(target_num_rows_per_block=batch_size)


def _embed_kind(
    kind: str, checkpoint: str, data: str, parts: str, actors: int, batch_size: int, options: dict[str, Any]
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Embeddings of every key of one ``kind`` ("images" → image_id, "captions" → caption_id) of the dataset, and
    the run's numbers: shards resumed from parts a previous run had finished, and the stream's timing. ``options``
    go to the embedder (precision; test_views for images)."""
    by_name = {posixpath.basename(s["path"]): s for s in shards.read_manifest(data)["shards"]}
    part_of = {name: _part_uri(parts, kind, shard) for name, shard in by_name.items()}
    pending = {name: shard for name, shard in by_name.items() if not storage.exists(part_of[name])}
    stats = {"resumed_shards": float(len(by_name) - len(pending))}
    if pending:
        uris = [storage.join(data, s["path"]) for s in pending.values()]
        embedder: type
        if kind == "images":
            image_size = ckpt.read_meta(checkpoint).config.model.image_size
            ds = decoded_tiles(uris, image_size, batch_size, decoders_for(actors))
            embedder = ImageEmbedder
        else:
            ds, embedder = caption_texts(uris, batch_size, decoders_for(actors)), CaptionEmbedder
        ds = ds.map_batches(
            embedder,
            fn_constructor_kwargs={"checkpoint": checkpoint, **options},
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=0.5,
            num_gpus=1 if torch.cuda.is_available() else 0,
        )
        expected = {name: _expected_keys(data, shard, kind) for name, shard in pending.items()}
        stats |= _embed_pending(ds, expected, lambda name, vectors: _write_part(part_of[name], vectors))
    return _read_parts(list(part_of.values())), stats


def _write_table(table: pa.Table, data: str, uri: str) -> None:
    """Parquet with the source dataset in its metadata (GeoParquet metadata too when rows have footprints)."""
    geo = shards.geo_metadata() if "geometry" in table.column_names else {}
    table = table.replace_schema_metadata({**geo, PROVENANCE_KEY: json.dumps({"data": data}).encode()})
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    storage.write_bytes_atomic(uri, sink.getvalue())


def _vector_column(keys: list[str], vectors: dict[str, np.ndarray], data: str) -> pa.Array:
    missing = [k for k in keys if k not in vectors]
    if missing:
        raise RuntimeError(f"embedding of {data} lost {len(missing)} rows, e.g. {missing[0]}")
    dim = len(vectors[keys[0]]) if keys else 0
    return pa.array([vectors[k].astype(np.float32) for k in keys], type=pa.list_(pa.float32(), dim))


class EmbedSummary(TypedDict):
    """What ``embed_archive`` wrote (``captions`` / ``caption_rows`` only when captions were embedded)."""

    rows: int
    model_version: str
    checkpoint: str
    embeddings: str
    dim: int
    resumed_shards: int
    precision: str  # as asked: auto, float32 or bfloat16
    test_views: int  # views each tile's embedding averages (model.test_views, or the override)
    first_batch_s: float
    stream_s: float
    captions: NotRequired[str]
    caption_rows: NotRequired[int]


def embed_archive(
    checkpoint: str,
    data: str,
    out: str,
    actors: int | None = None,
    batch_size: int = 64,
    captions: bool = False,
    precision: str = "auto",
    test_views: int | None = None,
) -> EmbedSummary:
    """Embed every tile of an ingested dataset into ``<out>/embeddings.parquet`` (GeoParquet), and with
    ``captions`` every caption into ``<out>/captions.parquet``. Resumes an interrupted run of the same model.

    ``actors`` model copies embed in parallel (default: :func:`default_actors`). ``precision``: ``auto`` embeds in
    bf16 autocast on CPUs with bf16 hardware (much faster there, at a cosine of ~0.9999 to float32),
    ``float32`` or ``bfloat16`` force one (see :mod:`rsitr.runtime.precision`). ``test_views`` replaces the
    checkpoint's ``model.test_views`` (e.g. 1 for an archive too large for 8 backbone passes per tile).
    """
    precision, test_views = checked(precision), checked_test_views(test_views)  # before Ray starts
    meta = ckpt.read_meta(checkpoint)
    checkpoint = meta.uri
    data, out = storage.resolve(data), storage.resolve(out)
    version = meta.model_version
    views = meta.config.model.test_views if test_views is None else test_views
    # parts of another view count are other vectors: they must not be resumed
    parts = storage.join(out, PARTS_DIR, version if views == 1 else f"{version}-{views}views")
    init_ray()
    actors = actors or default_actors()
    options = {"precision": precision, "test_views": views}
    vectors, stats = _embed_kind("images", checkpoint, data, parts, actors, batch_size, options)
    rows = list(shards.iter_rows(data, columns=[*META_COLUMNS, *(["captions"] if captions else [])]))
    table = _embeddings_table(rows, vectors, data, version)
    target = storage.join(out, EMBEDDINGS_FILE)
    _write_table(table, data, target)
    summary = EmbedSummary(
        rows=table.num_rows, model_version=version, checkpoint=checkpoint, embeddings=target, precision=precision,
        test_views=views, dim=table.schema.field("embedding").type.list_size,
        resumed_shards=int(stats["resumed_shards"]),
        first_batch_s=round(stats.get("first_batch_s", 0.0), 2), stream_s=round(stats.get("stream_s", 0.0), 2),
    )  # fmt: skip
    if captions:
        summary["captions"] = storage.join(out, CAPTIONS_FILE)
        summary["caption_rows"], resumed = _embed_captions(rows, checkpoint, data, parts, actors, batch_size, summary)
        summary["resumed_shards"] += resumed
    storage.remove_tree(storage.join(out, PARTS_DIR))
    log.info(
        "embedded %d tiles into %s (%d shards resumed; first embeddings after %.1f s, stream %.1f s)",
        table.num_rows,
        target,
        summary["resumed_shards"],
        summary["first_batch_s"],
        summary["stream_s"],
    )
    return summary


def _embeddings_table(rows: list[dict[str, Any]], vectors: Any, data: str, version: str) -> pa.Table:
    """The embeddings GeoParquet's rows: each tile's vector beside its shard metadata."""
    ids = [r["image_id"] for r in rows]
    return pa.table(
        {
            "image_id": ids,
            "embedding": _vector_column(ids, vectors, data),
            "geometry": pa.array([r["geometry"] for r in rows], type=pa.binary()),
            "acquired_at": pa.array([r["acquired_at"] for r in rows], type=pa.timestamp("us", tz="UTC")),
            "source_uri": [r["source_uri"] for r in rows],
            "window": pa.array([r["window"] for r in rows], type=shards.WINDOW_TYPE),
            "split": [r["split"] for r in rows],
            "model_version": [version] * len(rows),
        }
    )


def _embed_captions(
    rows: list[dict[str, Any]],
    checkpoint: str,
    data: str,
    parts: str,
    actors: int,
    batch_size: int,
    summary: EmbedSummary,
) -> tuple[int, int]:
    """Every caption of ``rows`` into ``summary["captions"]``; ``(caption rows, shards resumed)``."""
    options = {"precision": summary["precision"]}
    vectors, stats = _embed_kind("captions", checkpoint, data, parts, actors, batch_size, options)
    flat = [
        (f"{r['image_id']}#{n}", r["image_id"], c, r["split"]) for r in rows for n, c in enumerate(r["captions"] or [])
    ]
    caption_ids = [f[0] for f in flat]
    table = pa.table(
        {
            "caption_id": caption_ids,
            "image_id": [f[1] for f in flat],
            "caption": [f[2] for f in flat],
            "embedding": _vector_column(caption_ids, vectors, data),
            "split": [f[3] for f in flat],
            "model_version": [summary["model_version"]] * len(flat),
        }
    )
    _write_table(table, data, summary["captions"])
    return table.num_rows, int(stats["resumed_shards"])
