"""Ingest captioned image corpora (RSICD, RSITMD, UCM, …): image files matched to caption records, split, sharded."""

from __future__ import annotations

import hashlib
import io
import logging
import posixpath
import warnings
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import rasterio
from PIL import Image, UnidentifiedImageError
from rasterio.errors import NotGeoreferencedWarning, RasterioError

from rsitr.errors import IngestError
from rsitr.ingest.runner import (
    DEFAULT_SHARD_MB,
    ManifestDetails,
    UnitReport,
    caption_stats,
    entry_rejections,
    execute_units,
    finish_ingest,
    plan_fingerprint,
    prepare_output,
    run_unit,
    shard_row,
    timestamp_of,
)
from rsitr.ingest.scenes import ingest_scenes
from rsitr.io import geotiff, shards, storage
from rsitr.io.captions import (
    CaptionCorpus,
    CaptionRecord,
    Rejection,
    read_corpus,
    read_split_table,
    seeded_split,
)

log = logging.getLogger("rsitr.ingest")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")


@dataclass
class _CorpusItem:
    name: str
    uri: str
    image_id: str
    record: CaptionRecord


def _decode_chip(name: str, data: bytes) -> dict[str, Any]:
    """Validate and describe one image file; TIFF chips are converted to PNG (with their georeferencing).

    Raises:
        ValueError: empty, not an image, truncated or corrupt.
    """
    if not data:
        raise ValueError("empty file (0 bytes)")
    if name.lower().endswith((".tif", ".tiff")):
        return _decode_tiff(data)
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            fmt = (img.format or "").lower()
            bands = len(img.getbands())
            rgb = img if img.mode == "RGB" else img.convert("RGB")
            if fmt not in ("jpeg", "png"):
                return _as_png(np.asarray(rgb), bands, "uint8")
            pixels = rgb.tobytes()  # row-major RGB, the same bytes np.asarray(rgb) would hold
            width, height = rgb.size
    except UnidentifiedImageError as err:
        raise ValueError("not an image (unrecognised content)") from err
    except (OSError, SyntaxError) as err:
        raise ValueError(f"corrupt or truncated image ({err})") from err
    return {
        "image": data,
        "format": fmt,
        "height": height,
        "width": width,
        "bands": bands,
        "dtype": "uint8",
        "sha256": hashlib.sha256(pixels).hexdigest(),
    }


def _as_png(pixels: np.ndarray, bands: int, dtype: str) -> dict[str, Any]:
    rgb = np.ascontiguousarray(pixels)
    encoded = io.BytesIO()
    Image.fromarray(rgb).save(encoded, format="PNG")
    return {
        "image": encoded.getvalue(),
        "format": "png",
        "height": rgb.shape[0],
        "width": rgb.shape[1],
        "bands": bands,
        "dtype": dtype,
        "sha256": hashlib.sha256(rgb.data).hexdigest(),
    }


def _decode_tiff(data: bytes) -> dict[str, Any]:
    try:
        with warnings.catch_warnings(), rasterio.MemoryFile(data) as memfile:
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            path = memfile.name
            with memfile.open() as ds:
                size = max(ds.width, ds.height, 8)
            options = geotiff.TileOptions(tile_size=size, max_nodata=1.0)
            plan = geotiff.plan_scene(path, options)
            tile = next(geotiff.read_tiles(plan, options, [(0, 0)]))
    except (RasterioError, geotiff.SceneError, StopIteration) as err:
        raise ValueError(f"corrupt or unreadable TIFF ({err})") from err
    if tile.failed or tile.png is None:
        raise ValueError(f"corrupt or unreadable TIFF ({tile.failed})")
    with Image.open(io.BytesIO(tile.png)) as img:
        rgb = np.asarray(img)[: plan.height, : plan.width]
    described = _as_png(rgb, plan.count, plan.dtype)
    geo: dict[str, Any] = {"crs": plan.crs}
    if plan.georef_reason is None:
        geo.update(bounds=tile.bounds, geometry=tile.geometry)
    return {**described, **geo, "acquired_at": timestamp_of(plan.acquired_at)}


def _corpus_unit(dataset: str, items: list[_CorpusItem]) -> tuple[list[dict[str, Any]], UnitReport]:
    report = UnitReport(inputs=len(items))
    rows: list[dict[str, Any]] = []
    for item in items:
        try:
            described = _decode_chip(item.name, storage.read_bytes(item.uri))
        except (ValueError, OSError) as err:
            report.quarantine(item.name, str(err), len(item.record.captions))
            continue
        row = shard_row(
            image_id=item.image_id,
            captions=item.record.captions,
            split=item.record.split,
            label=item.record.label,
            source_uri=item.uri,
            **described,
        )
        report.add_row(row)
        rows.append(row)
    return rows, report


def _match_images(
    corpus: CaptionCorpus, files: dict[str, int], images_uri: str, dataset: str
) -> tuple[list[tuple[_CorpusItem, int]], list[Rejection]]:
    """Pair caption entries with image files; everything that cannot pair is quarantined with its reason."""
    by_base: dict[str, list[str]] = {}
    for file_rel in files:
        by_base.setdefault(PurePosixPath(file_rel).name, []).append(file_rel)
    quarantined = entry_rejections(corpus)
    items: list[tuple[_CorpusItem, int]] = []
    claimed: dict[str, str] = {}
    named: set[str] = set()
    ids: dict[str, str] = {}
    for name, record in sorted(corpus.records.items()):
        normal = posixpath.normpath(name)
        candidates = by_base.get(PurePosixPath(normal).name, [])
        rel = normal if normal in files else (candidates[0] if len(candidates) == 1 else None)
        image_id = f"{dataset}/{PurePosixPath(rel or normal).with_suffix('')}"
        reason = None
        if normal.startswith("../") or normal == ".." or normal.startswith("/"):
            reason = "path escapes the image folder"
        elif rel is None:
            reason = (
                f"image file is missing from {images_uri}"
                if not candidates
                else f"ambiguous: {len(candidates)} files named {PurePosixPath(normal).name}"
            )
        elif rel in claimed:
            reason = f"duplicate image id: {rel} is already named by entry {claimed[rel]!r}"
        elif image_id in ids:
            reason = f"duplicate image id {image_id} (also {ids[image_id]})"
        elif not record.captions:
            reason = "image has no usable caption"
        if rel is not None:
            named.add(rel)
        if reason is not None:
            quarantined.append(Rejection(name, reason, len(record.captions)))
            continue
        assert rel is not None
        claimed[rel] = name
        ids[image_id] = rel
        items.append((_CorpusItem(rel, storage.join(images_uri, rel), image_id, record), files[rel]))
    for rel in sorted(set(files) - named):
        quarantined.append(Rejection(rel, "image has no caption in the caption files", 0))
    return items, quarantined


def _assign_splits(
    items: list[tuple[_CorpusItem, int]],
    table: dict[str, tuple[str, str | None]],
    default_split: str | None,
    seed: int,
) -> ManifestDetails:
    """Split per image: split table, else the corpus (entry, then caption-file name), else ``default_split``, else
    the seeded split. Labels come from the table when the corpus has none."""
    sources: Counter[str] = Counter()
    conflicts = 0
    for item, _size in items:
        record = item.record
        source: str
        row = table.get(item.name) or table.get(PurePosixPath(item.name).name)
        if row is not None:
            conflicts += int(record.split is not None and record.split != row[0])
            record.split, source = row[0], "table"
            record.label = row[1] or record.label
        elif record.split is not None:
            source = "corpus"
        elif default_split is not None:
            record.split, source = default_split, "option"
        else:
            record.split, source = seeded_split(item.image_id, seed), "seeded"
        sources[source] += 1
    return {"split_sources": dict(sources), "split_conflicts_with_table": conflicts}


def _units_by_size(items: list[tuple[_CorpusItem, int]], shard_mb: int) -> list[list[_CorpusItem]]:
    units: list[list[_CorpusItem]] = []
    budget = shard_mb * 2**20
    current: list[_CorpusItem] = []
    used = 0
    for item, size in items:
        if current and used + size > budget:
            units.append(current)
            current, used = [], 0
        current.append(item)
        used += size
    if current:
        units.append(current)
    return units


def ingest_corpus(
    images: str,
    captions: list[str] | str,
    dataset: str,
    out: str,
    fmt: str = "auto",
    split: str | None = None,
    split_table: str | None = None,
    seed: int = 0,
    workers: int | None = None,
    strict: bool = False,
    overwrite: bool = False,
    shard_mb: int = DEFAULT_SHARD_MB,
) -> shards.Manifest:
    """An image folder (local or ``s3://``) plus caption files → shards; JPEG/PNG bytes are kept as they are.

    Inputs are the images named by the captions and the image files in the folder (each counted once), plus
    rejected duplicate entries. Missing, unreadable, caption-less and path-escaping inputs are quarantined.

    Returns:
        The manifest that was written.

    Raises:
        IngestError: the image folder does not exist, the output holds another ingest, nothing usable remained,
            or ``strict`` and something was quarantined.
        CaptionFormatError: a caption file is missing or does not parse.
    """
    images_uri = storage.resolve(images)
    if not storage.is_dir(images_uri):
        raise IngestError(f"image folder {images} does not exist")
    sources = [captions] if isinstance(captions, str) else list(captions)
    corpus = read_corpus(sources, fmt)
    files = {rel: size for rel, size in storage.list_files(images_uri).items() if rel.lower().endswith(IMAGE_SUFFIXES)}
    items, quarantined = _match_images(corpus, files, images_uri, dataset)
    table = read_split_table(split_table) if split_table else {}
    split_stats = _assign_splits(items, table, split, seed)
    units = _units_by_size(items, shard_mb)
    parameters = {"kind": "corpus", "dataset": dataset, "images": images_uri,
                  "captions": [storage.resolve(s) for s in sources], "format": fmt, "split": split,
                  "split_table": split_table, "seed": seed, "shard_mb": shard_mb}  # fmt: skip
    plan = [parameters, [[(i.name, i.record.split, i.record.captions, i.record.label) for i in u] for u in units]]
    fingerprint = plan_fingerprint([plan, {rel: files[rel] for rel in sorted(files)}, quarantined])
    root = shards.dataset_root(out, dataset)
    done = prepare_output(root, fingerprint, overwrite)
    if done is not None:
        log.info("%s already holds this ingest; nothing to do", root)
        return done
    reports = execute_units(
        [partial(run_unit, root, index, partial(_corpus_unit, dataset, unit)) for index, unit in enumerate(units)],
        workers,
    )
    seen = len(quarantined) + sum(r.inputs for r in reports)
    return finish_ingest(
        root, reports, quarantined, seen, (fingerprint, parameters), caption_stats(corpus), strict, split_stats
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


def ingest_folder(
    folder: str, dataset: str, out: str, tile_size: int = 128, workers: int | None = 1
) -> shards.Manifest:
    """Ingest a corpus folder by its layout: ``scenes/*.tif`` + captions (tiled), or ``images/`` + captions.

    Raises:
        IngestError: the folder is missing or has neither layout.
    """
    root = Path(folder)
    if not root.is_dir():
        raise IngestError(f"data folder {folder} does not exist")
    captions = find_captions(root)
    if (root / "scenes").is_dir():
        options = geotiff.TileOptions(tile_size=tile_size, edge="drop")
        return ingest_scenes(
            [str(root / "scenes")], dataset, out, options, captions=[str(captions)], workers=workers, overwrite=True
        )
    if (root / "images").is_dir():
        return ingest_corpus(str(root / "images"), str(captions), dataset, out, workers=workers, overwrite=True)
    raise IngestError(f"{folder}: expected a scenes/ or images/ folder beside the captions")
