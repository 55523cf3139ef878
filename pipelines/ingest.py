"""Prefect ingest flows → Parquet shards + manifest.

- ``ingest``: a corpus folder by its layout (or the generated demo corpus);
- ``ingest-corpus``: an image folder plus caption files in any supported format;
- ``ingest-archive``: raster scenes (GeoTIFF/COG, local or S3) tiled into an archive dataset.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from rsitr import ingest
from rsitr.io import geotiff, shards
from rsitr.synthetic import generate_demo_corpus

DEMO = "demo"


@task
def generate_demo(out: str, seed: int) -> str:
    """Write the demo corpus (deterministic from ``seed``) and return its folder."""
    return str(generate_demo_corpus(out, seed=seed)["out"])


@task
def ingest_folder(source: str, dataset: str, out: str, tile_size: int) -> dict[str, Any]:
    """Ingest a corpus folder into shards."""
    return ingest.ingest_folder(source, dataset, out, tile_size=tile_size)


@flow(name="ingest", log_prints=True)
def ingest_flow(
    source: str = DEMO, dataset: str = "demo", out: str = ".rsitr/data", tile_size: int = 128, seed: int = 0
) -> dict[str, Any]:
    """Ingest ``source`` (a corpus folder, or ``demo`` to generate one) as dataset ``dataset`` under ``out``.

    Returns the dataset folder and the manifest's counts.
    """
    if source == DEMO:
        source = generate_demo(str(Path(out).parent / "demo-data"), seed)
    manifest = ingest_folder(source, dataset, out, tile_size)
    return _publish(dataset, out, manifest)


def _publish(dataset: str, out: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Summarise a manifest as a Prefect artifact and in the flow's log; return the dataset folder and counts."""
    root = shards.dataset_root(out, dataset)
    splits = " · ".join(f"{name} {v['rows']}" for name, v in sorted(manifest["splits"].items()))
    reasons = Counter(q["reason"].split(":")[0] for q in manifest["quarantined"])
    top = "\n".join(f"| {reason} | {count} |" for reason, count in reasons.most_common(10))
    create_markdown_artifact(
        key=f"ingest-{dataset}".lower().replace("_", "-"),
        markdown=(
            f"# Ingest `{dataset}`\n\n{manifest['inputs_seen']} inputs seen, {manifest['rows']} rows, "
            f"{manifest['captions']} captions, {manifest['skipped']} skipped, "
            f"{len(manifest['quarantined'])} quarantined.\n\nSplits: {splits}\n\nShards: `{root}`"
            + (f"\n\n| quarantine reason | inputs |\n|---|---|\n{top}" if top else "")
        ),
    )
    print(
        f"ingested {manifest['rows']} rows into {root} "
        f"({len(manifest['quarantined'])} quarantined, {manifest['skipped']} skipped)"
    )
    return {
        "data": root,
        "rows": manifest["rows"],
        "skipped": manifest["skipped"],
        "quarantined": len(manifest["quarantined"]),
    }


@flow(name="ingest-corpus", log_prints=True)
def ingest_corpus_flow(
    images: str,
    captions: list[str],
    dataset: str,
    out: str = ".rsitr/data",
    format: str = "auto",  # noqa: A002 - the parameter users see in the Prefect UI
    split_table: str | None = None,
    split: str | None = None,
    seed: int = 0,
    workers: int | None = None,
    strict: bool = False,
) -> dict[str, Any]:
    """Ingest an image folder and its caption files (Karpathy, COCO, ALBEF, AMFMN or VT-RSBS) as ``dataset``."""
    manifest = ingest.ingest_corpus(
        images,
        captions,
        dataset,
        out,
        format,
        split=split,
        split_table=split_table,
        seed=seed,
        workers=workers,
        strict=strict,
    )
    return _publish(dataset, out, manifest)


@flow(name="ingest-archive", log_prints=True)
def ingest_archive_flow(
    scenes: list[str],
    dataset: str = "archive",
    out: str = ".rsitr/data",
    options: geotiff.TileOptions | None = None,
    workers: int | None = None,
    strict: bool = False,
) -> dict[str, Any]:
    """Tile raster scenes (paths, globs, folders or ``s3://`` URIs) into the archive dataset ``dataset``;
    ``options`` as ``rsitr ingest scenes`` takes them (a deployment passes e.g. ``{tile_size: 256, bands: rgb}``)."""
    manifest = ingest.ingest_scenes(scenes, dataset, out, options, workers=workers, strict=strict)
    return _publish(dataset, out, manifest)
