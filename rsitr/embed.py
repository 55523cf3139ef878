"""Batch-embed an archive's tiles with a trained image tower (Ray Data actor pool) into GeoParquet."""

from __future__ import annotations

import io
import json
import logging
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
import torch

from rsitr import checkpoint as ckpt
from rsitr.data.pipeline import DATA_TASK_CPUS, decode_images, read_shards
from rsitr.io import shards, storage
from rsitr.raysession import init_ray

log = logging.getLogger(__name__)
EMBEDDINGS_FILE = "embeddings.parquet"
# schema metadata naming the ingested dataset the embeddings came from (result sheets read thumbnails there)
PROVENANCE_KEY = b"rsitr"
META_COLUMNS = ["image_id", "geometry", "acquired_at", "source_uri", "window", "split"]


class ImageEmbedder:
    """Holds one model per actor; turns decoded image batches into embeddings."""

    def __init__(self, checkpoint: str) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.set_num_threads(1)
        self.model, _, _ = ckpt.load_checkpoint(checkpoint, map_location=self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            vectors = self.model.encode_image(torch.as_tensor(batch["image"]).to(self.device))
        return {"image_id": batch["image_id"], "embedding": vectors.float().cpu().numpy()}


def default_actors() -> int:
    """One single-threaded CPU actor per core of a local Ray (one per two logical CPUs on a cluster), or one per
    GPU when there are GPUs."""
    resources = ray.cluster_resources()
    if resources.get("GPU"):
        return int(resources["GPU"])
    cpus = int(resources.get("CPU", 1))
    return max(1, min(cpus, os.cpu_count() or 1) if len(ray.nodes()) == 1 else cpus // 2)


def embed_archive(
    checkpoint: str, data: str, out: str, actors: int | None = None, batch_size: int = 64
) -> dict[str, Any]:
    """Embed every tile of an ingested dataset; write ``<out>/embeddings.parquet`` (GeoParquet) atomically.

    ``actors`` model copies embed in parallel (default: :func:`default_actors`).

    Returns:
        A summary: rows, model_version, checkpoint and the output URI.
    """
    checkpoint = ckpt.resolve_checkpoint(checkpoint)
    _, config, state = ckpt.load_checkpoint(checkpoint)
    data = storage.resolve(data)
    init_ray()
    actors = actors or default_actors()
    ds = (
        read_shards(data, ["image_id", "image"])
        .map_batches(
            decode_images,  # type: ignore[arg-type]
            fn_kwargs={"image_size": config.train.image_size},
            batch_format="pyarrow",
            batch_size=batch_size,
            num_cpus=DATA_TASK_CPUS,
        )
        .map_batches(
            ImageEmbedder,
            fn_constructor_kwargs={"checkpoint": checkpoint},
            batch_size=batch_size,
            concurrency=actors,
            num_cpus=0.5,
            num_gpus=1 if torch.cuda.is_available() else 0,
        )
    )
    vectors: dict[str, np.ndarray] = {}
    context = ray.data.DataContext.get_current()
    saved = context.target_max_block_size
    # a block per decoded batch (they are ~10 MB): otherwise one shard is one block, which one actor embeds alone
    context.target_max_block_size = 4 * 1024 * 1024
    try:
        for batch in ds.iter_batches(batch_size=1024, batch_format="numpy"):
            vectors.update(zip((str(i) for i in batch["image_id"]), batch["embedding"], strict=True))
    finally:
        context.target_max_block_size = saved
    rows = [row for row in shards.iter_rows(data, columns=META_COLUMNS)]
    missing = [r["image_id"] for r in rows if r["image_id"] not in vectors]
    if missing:
        raise RuntimeError(f"embedding of {data} lost {len(missing)} tiles, e.g. {missing[0]}")
    dim = len(next(iter(vectors.values())))
    table = pa.table(
        {
            "image_id": [r["image_id"] for r in rows],
            "embedding": pa.array(
                [vectors[r["image_id"]].astype(np.float32) for r in rows], type=pa.list_(pa.float32(), dim)
            ),
            "geometry": pa.array([r["geometry"] for r in rows], type=pa.binary()),
            "acquired_at": pa.array([r["acquired_at"] for r in rows], type=pa.timestamp("us", tz="UTC")),
            "source_uri": [r["source_uri"] for r in rows],
            "window": pa.array([r["window"] for r in rows], type=shards.WINDOW_TYPE),
            "split": [r["split"] for r in rows],
            "model_version": [state["model_version"]] * len(rows),
        }
    ).replace_schema_metadata({**shards.geo_metadata(), PROVENANCE_KEY: json.dumps({"data": data}).encode()})
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    target = storage.join(storage.resolve(out), EMBEDDINGS_FILE)
    storage.write_bytes_atomic(target, sink.getvalue())
    summary = {
        "rows": table.num_rows,
        "model_version": state["model_version"],
        "checkpoint": checkpoint,
        "embeddings": target,
        "dim": dim,
    }
    log.info("embedded %d tiles into %s", table.num_rows, target)
    return summary
