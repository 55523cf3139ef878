"""Prefect flow ``ingest``: a corpus folder (or the generated demo corpus) → Parquet shards + manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from rsitr import ingest
from rsitr.io import shards
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
    root = shards.dataset_root(out, dataset)
    splits = " · ".join(f"{name} {v['rows']}" for name, v in sorted(manifest["splits"].items()))
    create_markdown_artifact(
        key=f"ingest-{dataset}".lower().replace("_", "-"),
        markdown=(
            f"# Ingest `{dataset}`\n\n{manifest['inputs_seen']} inputs seen, {manifest['rows']} rows, "
            f"{manifest['captions']} captions, {len(manifest['quarantined'])} quarantined.\n\n"
            f"Splits: {splits}\n\nShards: `{root}`"
        ),
    )
    print(f"ingested {manifest['rows']} rows into {root} ({len(manifest['quarantined'])} quarantined)")
    return {"data": root, "rows": manifest["rows"], "quarantined": len(manifest["quarantined"])}
