"""Ingest raster scenes (GeoTIFF, VRT, JP2, …): each scene tiled into fixed-size tiles with footprints and times."""

from __future__ import annotations

import glob
import logging
from dataclasses import asdict
from functools import partial
from typing import Any

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
from rsitr.io import geotiff, shards, storage
from rsitr.io.captions import CaptionCorpus, CaptionRecord, Rejection, read_corpus

log = logging.getLogger("rsitr.ingest")
RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".img")


def expand_scenes(paths: list[str]) -> list[str]:
    """Scene specs from paths, globs, folders and ``s3://`` URIs; comma-joined band files stay one scene."""
    found: list[str] = []
    for pattern in paths:
        if "," in pattern:
            found.append(",".join(storage.resolve(p.strip()) for p in pattern.split(",") if p.strip()))
            continue
        uri = storage.resolve(pattern)
        if any(ch in pattern for ch in "*?["):
            if storage.is_remote(uri):
                fs, path = storage.filesystem(uri)
                found.extend(f"s3://{match}" for match in sorted(fs.glob(path)))
            else:
                found.extend(sorted(storage.resolve(m) for m in glob.glob(pattern)))
        elif storage.is_dir(uri):
            rasters = [rel for rel in sorted(storage.list_files(uri)) if rel.lower().endswith(RASTER_SUFFIXES)]
            found.extend(storage.join(uri, rel) for rel in rasters)
        else:
            found.append(uri)
    return found


def _plan_or_reason(spec: str, options: geotiff.TileOptions) -> geotiff.ScenePlan | str:
    try:
        return geotiff.plan_scene(spec, options)
    except geotiff.SceneError as err:
        return str(err).removeprefix(f"{spec}: ")  # the quarantine entry names the scene already


def _scene_unit(
    dataset: str,
    plan: geotiff.ScenePlan,
    options: geotiff.TileOptions,
    windows: list[tuple[int, int]],
    records: dict[str, CaptionRecord] | None,
    default_split: str,
) -> tuple[list[dict[str, Any]], UnitReport]:
    """Tiles of some windows of one scene; with ``records`` (captions given), tiles without captions are rejected."""
    report = UnitReport(inputs=len(windows))
    rows: list[dict[str, Any]] = []
    try:
        tiles = list(geotiff.read_tiles(plan, options, windows))
    except geotiff.SceneError as err:
        for row_off, col_off in windows:
            report.quarantine(geotiff.tile_id(plan.name, row_off, col_off), f"scene became unreadable: {err}")
        return rows, report
    for tile in tiles:
        if tile.failed:
            report.quarantine(tile.image_id, tile.failed)
            continue
        record = records.get(tile.image_id) if records is not None else None
        if tile.skipped:
            report.skipped += 1
            report.captions_skipped += len(record.captions) if record else 0
            continue
        if records is not None and (record is None or not record.captions):
            report.quarantine(tile.image_id, "tile has no caption in the caption files")
            continue
        if plan.georef_reason is None and tile.geometry is None:
            report.without_footprint += 1
        row = shard_row(
            image_id=f"{dataset}/{tile.image_id}",
            image=tile.png,
            format="png",
            height=options.output_size,
            width=options.output_size,
            bands=plan.count,
            dtype=plan.dtype,
            captions=record.captions if record else [],
            split=(record.split if record and record.split else default_split),
            label=record.label if record else None,
            source_uri=plan.source,
            window=tile.window,
            crs=plan.crs,
            bounds=tile.bounds,
            geometry=tile.geometry,
            acquired_at=timestamp_of(plan.acquired_at),
            sha256=tile.pixels_sha256,
        )
        report.add_row(row)
        rows.append(row)
    return rows, report


def _tiles_per_unit(options: geotiff.TileOptions, shard_mb: int) -> int:
    estimated_png_bytes = options.output_size**2 * 3 // 2
    return max(16, min(8192, shard_mb * 2**20 // estimated_png_bytes))


def ingest_scenes(
    paths: list[str],
    dataset: str,
    out: str,
    options: geotiff.TileOptions | None = None,
    captions: list[str] | None = None,
    split: str = "none",
    workers: int | None = None,
    strict: bool = False,
    overwrite: bool = False,
    shard_mb: int = DEFAULT_SHARD_MB,
) -> shards.Manifest:
    """Tile raster scenes into shards; with caption files (keyed by tile id) the tiles become a training corpus.

    Inputs are tile windows, plus one per scene that cannot be read. Windows over ``max_nodata`` are skipped.

    Returns:
        The manifest that was written.

    Raises:
        IngestError: no scene was found, the output holds another ingest, nothing usable remained, or
            ``strict`` and something was quarantined.
    """
    options = options or geotiff.TileOptions()
    specs = expand_scenes(paths)
    if not specs:
        raise IngestError(f"no raster scenes found at {paths}")
    corpus = read_corpus(captions) if captions else CaptionCorpus()
    root = shards.dataset_root(out, dataset)
    planned = execute_units([partial(_plan_or_reason, spec, options) for spec in specs], workers)
    units, scene_reports, quarantined = _plan_units(specs, planned, options, _tiles_per_unit(options, shard_mb))
    records = corpus.records
    quarantined.extend(entry_rejections(corpus))
    quarantined.extend(_captions_without_tiles(records, units))
    parameters = {"kind": "scenes", "dataset": dataset, "paths": paths, "captions": captions, "split": split,
                  "options": asdict(options), "shard_mb": shard_mb}  # fmt: skip
    fingerprint = plan_fingerprint([parameters, [(p.summary(), len(w)) for p, w in units], quarantined])
    done = prepare_output(root, fingerprint, overwrite)
    if done is not None:
        log.info("%s already holds this ingest; nothing to do", root)
        return done
    tasks = []
    for index, (plan, windows) in enumerate(units):
        unit_records = _records_for(records, plan, windows) if captions else None
        unit = partial(_scene_unit, dataset, plan, options, windows, unit_records, split)
        tasks.append(partial(run_unit, root, index, unit))
    reports = execute_units(tasks, workers)
    _summarise_scenes(scene_reports, reports, options)
    seen = len(quarantined) + sum(r.inputs for r in reports)
    details: ManifestDetails = {"scenes": scene_reports}
    return finish_ingest(
        root, reports, quarantined, seen, (fingerprint, parameters), caption_stats(corpus), strict, details
    )


def _records_for(
    records: dict[str, CaptionRecord], plan: geotiff.ScenePlan, windows: list[tuple[int, int]]
) -> dict[str, CaptionRecord]:
    """Only the captions of these windows travel with a unit (keeps Ray task arguments small)."""
    names = (geotiff.tile_id(plan.name, r, c) for r, c in windows)
    return {name: records[name] for name in names if name in records}


Units = list[tuple[geotiff.ScenePlan, list[tuple[int, int]]]]


def _plan_units(
    specs: list[str], planned: list[geotiff.ScenePlan | str], options: geotiff.TileOptions, per_unit: int
) -> tuple[Units, list[dict[str, Any]], list[Rejection]]:
    """Each readable scene's windows cut into units of ``per_unit`` tiles; a report per scene (with the range of
    its units); the scenes that cannot be read, quarantined."""
    units: Units = []
    scene_reports: list[dict[str, Any]] = []
    quarantined: list[Rejection] = []
    for spec, plan in zip(specs, planned, strict=True):
        if isinstance(plan, str):
            quarantined.append(Rejection(spec, plan, 0))
            log.warning("quarantined %s: %s", spec, plan)
            continue
        windows = plan.windows(options)
        first_unit = len(units)
        units.extend((plan, windows[i : i + per_unit]) for i in range(0, len(windows), per_unit))
        scene_reports.append({**plan.summary(), "windows": len(windows), "units": [first_unit, len(units)]})
    return units, scene_reports, quarantined


def _captions_without_tiles(records: dict[str, CaptionRecord], units: Units) -> list[Rejection]:
    """Caption entries that name no tile of the planned scenes, as quarantined inputs."""
    used = {geotiff.tile_id(p.name, r, c) for p, w in units for r, c in w}
    reason = "caption entry names no tile of these scenes"
    return [Rejection(name, reason, len(records[name].captions)) for name in sorted(set(records) - used)]


def _summarise_scenes(
    scene_reports: list[dict[str, Any]], reports: list[UnitReport], options: geotiff.TileOptions
) -> None:
    """Fill each scene's report from its units' reports, and say why a scene gave no tiles or footprints."""
    for scene in scene_reports:
        parts = reports[scene["units"][0] : scene["units"][1]]
        scene.update(
            rows=sum(sum(t["rows"] for t in r.splits.values()) for r in parts),
            skipped=sum(r.skipped for r in parts),
            quarantined=sum(len(r.quarantined) for r in parts),
            without_footprint=sum(r.without_footprint for r in parts),
        )
        del scene["units"]
        if scene["rows"] == 0 and scene["skipped"] == scene["windows"]:
            scene["note"] = f"no tiles: every window is over the nodata limit ({options.max_nodata})"
            if min(scene["width"], scene["height"]) < options.tile_size:
                scene["note"] += "; the scene is smaller than one tile and edge padding counts as nodata"
        if scene["without_footprint"]:
            scene["footprint_reason"] = "tile corners fall outside the projection's valid area (off the Earth's disk)"
