"""Prefect flow ``index-archive``: embed tiles and build the retrieval index, or bring it up to date with an archive."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from rsitr.io import geotiff, storage
from rsitr.retrieval import embed, index, reindex


@task
def embed_tiles(checkpoint: str, data: str, out: str, captions: bool) -> dict[str, Any]:
    """Embed every tile (and with ``captions`` every caption) of an ingested dataset; resumes a killed run."""
    return embed.embed_archive(checkpoint, data, out, captions=captions)


@task
def build(embeddings: str, out: str, checkpoint: str, captions: str | None) -> dict[str, Any]:
    """Build the index from the embeddings (with a caption table when there are caption embeddings)."""
    return index.build_index(embeddings, out, checkpoint, captions=captions)


@task
def update_from_archive(archive: str, out: str, checkpoint: str, tile_size: int) -> dict[str, Any]:
    """Index the archive's scenes that are not indexed yet (by content hash)."""
    return reindex.reindex_archive(archive, out, checkpoint, geotiff.TileOptions(tile_size=tile_size))


@flow(name="index-archive", log_prints=True)
def index_archive(
    checkpoint: str = ".rsitr/runs",
    data: str | None = None,
    archive: str | None = None,
    out: str = ".rsitr/index/demo",
    tile_size: int = geotiff.SCENE_TILE_SIZE,
    captions: bool = False,
) -> dict[str, Any]:
    """Index an ingested dataset (``data``: embed everything, rebuild) or a folder/URI of scenes (``archive``:
    incremental — only scenes not yet indexed are tiled, embedded and appended; a second run with nothing new does
    nothing and says so).

    ``checkpoint`` is a checkpoint, a finished run, or a runs folder (its latest finished run). ``captions`` (with
    ``data``) also indexes the dataset's captions for image → text search and re-ranking.
    """
    if (data is None) == (archive is None):
        raise ValueError("index-archive: give exactly one of data (ingested dataset) or archive (scene folder)")
    out = storage.resolve(out)
    if archive is not None:
        summary = update_from_archive(archive, out, checkpoint, tile_size)
        if summary["nothing_new"]:
            message = f"nothing new under {archive}: all {summary['scenes']} scenes are already indexed at {out}"
        else:
            message = (
                f"{summary['new_scenes']} new scene(s) ({summary['quarantined']} quarantined), "
                f"{summary['renamed']} renamed, {summary['changed']} changed: {summary['tiles_added']} tiles added; "
                f"the index at {out} now holds {summary['rows']} tiles"
            )
        create_markdown_artifact(key="index-archive", markdown=f"# Re-index\n\n{message}.")
        print(message)
        return summary
    summary = embed_tiles(checkpoint, data, out, captions)
    meta = build(summary["embeddings"], out, summary["checkpoint"], summary.get("captions"))
    create_markdown_artifact(
        key="index-archive",
        markdown=f"# Index\n\n{meta['rows']} tiles, {meta.get('caption_rows', 0)} captions, {meta['kind']} search, "
        f"model `{meta['model_version']}`, at `{out}`.",
    )
    print(f"indexed {meta['rows']} tiles at {out}")
    return {"index": out, **meta}
