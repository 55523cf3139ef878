"""Prefect flow ``index-archive``: (ingest new scenes,) embed the tiles, build the retrieval index."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from rsitr import embed, index, ingest
from rsitr.io import geotiff, shards, storage


@task
def ingest_archive(archive: str, out: str, tile_size: int) -> str:
    """Tile the archive's GeoTIFF scenes into the ``archive`` dataset; return its folder."""
    options = geotiff.TileOptions(tile_size=tile_size)
    ingest.ingest_scenes([archive], "archive", out, options, workers=1, overwrite=True)
    return shards.dataset_root(out, "archive")


@task
def embed_tiles(checkpoint: str, data: str, out: str) -> dict[str, Any]:
    """Embed every tile of an ingested dataset."""
    return embed.embed_archive(checkpoint, data, out)


@task
def build(embeddings: str, out: str, checkpoint: str) -> dict[str, Any]:
    """Build the index from the embeddings."""
    return index.build_index(embeddings, out, checkpoint)


@flow(name="index-archive", log_prints=True)
def index_archive(
    checkpoint: str = ".rsitr/runs",
    data: str | None = None,
    archive: str | None = None,
    out: str = ".rsitr/index/demo",
    tile_size: int = 128,
) -> dict[str, Any]:
    """Embed an ingested dataset (``data``) or a folder of scenes (``archive``) and build an index at ``out``.

    ``checkpoint`` is a checkpoint, a finished run, or a runs folder (its latest finished run).
    """
    if (data is None) == (archive is None):
        raise ValueError("index-archive: give exactly one of data (ingested dataset) or archive (scene folder)")
    out = storage.resolve(out)
    if archive is not None:
        data = ingest_archive(archive, storage.join(out, "shards"), tile_size)
    assert data is not None
    summary = embed_tiles(checkpoint, data, out)
    meta = build(summary["embeddings"], out, summary["checkpoint"])
    create_markdown_artifact(
        key="index-archive",
        markdown=f"# Index\n\n{meta['rows']} tiles, {meta['kind']} search, model `{meta['model_version']}`, "
        f"at `{out}`.",
    )
    print(f"indexed {meta['rows']} tiles at {out}")
    return {"index": out, **meta}
