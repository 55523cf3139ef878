"""Ingest: GeoTIFF scenes or image folders plus caption corpora → Parquet shards and ``manifest.json``."""

from __future__ import annotations

import glob
import hashlib
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from rsitr.io import geotiff, shards
from rsitr.io.captions import CaptionRecord, read_captions

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff"}


class IngestError(RuntimeError):
    """Nothing usable could be ingested, or the inputs do not exist."""


def _expand(paths: list[str]) -> list[str]:
    found: list[str] = []
    for pattern in paths:
        matches = sorted(glob.glob(pattern)) if any(ch in pattern for ch in "*?[") else [pattern]
        for match in matches:
            p = Path(match)
            found.extend(sorted(str(f) for f in p.glob("*.tif*")) if p.is_dir() else [match])
    return found


def _row(**values: Any) -> dict[str, Any]:
    row = {name: None for name in shards.SHARD_SCHEMA.names}
    row.update(values)
    return row


def ingest_scenes(
    paths: list[str],
    dataset: str,
    out: str,
    tile_size: int = 256,
    max_nodata: float = 0.5,
    captions: str | None = None,
) -> dict[str, Any]:
    """Tile GeoTIFF scenes into shard rows; attach captions keyed by tile id when a caption file is given.

    Each tile is one input; a scene that cannot be read is one quarantined input.

    Returns:
        The manifest that was written.

    Raises:
        IngestError: no scene was found, or nothing usable remained.
    """
    scenes = _expand(paths)
    if not scenes:
        raise IngestError(f"no GeoTIFF scenes found at {paths}")
    records = read_captions(captions) if captions else {}
    root = shards.dataset_root(out, dataset)
    writer = shards.ShardWriter(root)
    quarantined: list[shards.Quarantined] = []
    seen = 0
    for scene in scenes:
        try:
            info = geotiff.scene_info(scene)
            tiles = list(geotiff.iter_tiles(scene, tile_size=tile_size, max_nodata=max_nodata))
        except Exception as err:  # noqa: BLE001 - any unreadable scene is quarantined, the rest continue
            seen += 1
            quarantined.append(shards.Quarantined(scene, f"unreadable scene: {err}"))
            log.warning("quarantined %s: %s", scene, err)
            continue
        for tile in tiles:
            seen += 1
            record = records.get(tile.image_id, CaptionRecord("none"))
            if records and not record.captions:
                quarantined.append(shards.Quarantined(tile.image_id, "tile has no caption in the caption file"))
                continue
            row = _row(
                image_id=f"{dataset}/{tile.image_id}",
                image=tile.png,
                format="png",
                height=tile_size,
                width=tile_size,
                bands=info["bands"],
                dtype=info["dtype"],
                captions=record.captions,
                split=record.split,
                label=record.label,
                source_uri=str(Path(scene).resolve()),
                window=tile.window,
                crs=info["crs"],
                bounds=tile.bounds,
                geometry=tile.geometry,
                acquired_at=info["acquired_at"],
                sha256=tile.pixels_sha256,
            )
            writer.add(row)
    return _finish(
        root,
        writer,
        quarantined,
        seen,
        {
            "kind": "scenes",
            "paths": paths,
            "tile_size": tile_size,
            "max_nodata": max_nodata,
            "captions": captions,
        },
    )


def _finish(
    root: str,
    writer: shards.ShardWriter,
    quarantined: list[shards.Quarantined],
    seen: int,
    parameters: dict[str, Any],
) -> dict[str, Any]:
    writer.flush()
    if not writer.splits:
        reasons = "; ".join(f"{q.input}: {q.reason}" for q in quarantined[:3])
        raise IngestError(f"nothing usable to ingest into {root} ({len(quarantined)} quarantined: {reasons})")
    manifest = shards.write_manifest(root, writer, quarantined, seen, parameters)
    log.info("ingested %d rows into %s (%d quarantined)", manifest["rows"], root, len(quarantined))
    return manifest


def ingest_corpus(images: str, captions: str, dataset: str, out: str, fmt: str = "auto") -> dict[str, Any]:
    """Images in a folder plus a caption file → shards; the image's own encoded bytes are kept.

    Each captioned image is one input. Missing, unreadable or caption-less images are quarantined.

    Returns:
        The manifest that was written.

    Raises:
        IngestError: the image folder does not exist, or nothing usable remained.
    """
    folder = Path(images).resolve()
    if not folder.is_dir():
        raise IngestError(f"image folder {images} does not exist")
    records = read_captions(captions, fmt)
    root = shards.dataset_root(out, dataset)
    writer = shards.ShardWriter(root)
    quarantined: list[shards.Quarantined] = []
    seen = 0
    for name, record in sorted(records.items()):
        seen += 1
        path = (folder / name).resolve()
        reason = None
        if not path.is_relative_to(folder):
            reason = "path escapes the image folder"
        elif not path.is_file():
            reason = "image file is missing"
        elif not record.captions:
            reason = "image has no non-empty caption"
        if reason is None:
            try:
                data = path.read_bytes()
                with Image.open(io.BytesIO(data)) as img:
                    fmt_name = (img.format or path.suffix.lstrip(".")).lower()
                    pixels = np.asarray(img.convert("RGB"))
            except (UnidentifiedImageError, OSError, ValueError) as err:
                reason = f"unreadable image: {err}"
        if reason is not None:
            quarantined.append(shards.Quarantined(name, reason))
            continue
        row = _row(
            image_id=f"{dataset}/{Path(name).stem}",
            image=data,
            format=fmt_name,
            height=pixels.shape[0],
            width=pixels.shape[1],
            bands=3,
            dtype="uint8",
            captions=record.captions,
            split=record.split,
            label=record.label,
            source_uri=str(path),
            sha256=hashlib.sha256(pixels.tobytes()).hexdigest(),
        )
        writer.add(row)
    return _finish(
        root,
        writer,
        quarantined,
        seen,
        {
            "kind": "corpus",
            "images": str(folder),
            "captions": str(captions),
            "format": fmt,
        },
    )


def find_captions(folder: Path) -> Path:
    """The caption file of a corpus folder: ``captions.json``, or the first JSON/CSV under ``captions/``.

    Raises:
        IngestError: no caption file was found.
    """
    for candidate in [folder / "captions.json", *sorted((folder / "captions").glob("*.json"))]:
        if candidate.is_file() and '"images"' in candidate.read_text(errors="replace")[:4096]:
            return candidate
    csvs = sorted((folder / "captions").glob("*.csv")) if (folder / "captions").is_dir() else []
    if csvs:
        return csvs[0]
    raise IngestError(f"{folder}: no caption file (captions.json or captions/*.json|*.csv)")


def ingest_folder(folder: str, dataset: str, out: str, tile_size: int = 128) -> dict[str, Any]:
    """Ingest a corpus folder by its layout: ``scenes/*.tif`` + captions (tiled), or ``images/`` + captions.

    Raises:
        IngestError: the folder is missing or has neither layout.
    """
    root = Path(folder)
    if not root.is_dir():
        raise IngestError(f"data folder {folder} does not exist")
    captions = find_captions(root)
    if (root / "scenes").is_dir():
        return ingest_scenes([str(root / "scenes")], dataset, out, tile_size=tile_size, captions=str(captions))
    if (root / "images").is_dir():
        return ingest_corpus(str(root / "images"), str(captions), dataset, out)
    raise IngestError(f"{folder}: expected a scenes/ or images/ folder beside the captions")
