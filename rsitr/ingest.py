"""Ingest: raster scenes or image folders plus caption corpora → Parquet shards and ``manifest.json``.

Every ingest is planned first (which inputs go to which shard), then the plan's units run — in this process or
as Ray tasks — and each unit writes one shard plus a small completion record under ``_ingest/``. A re-run of
the same plan skips finished units, so an interrupted ingest resumes and a finished one is left as it is; the
shards are deterministic, so a unit that runs twice writes the same bytes. The manifest is written last, after
the counts reconcile.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import posixpath
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import numpy as np
import rasterio
from PIL import Image, UnidentifiedImageError
from rasterio.errors import NotGeoreferencedWarning, RasterioError

from rsitr.errors import IngestError
from rsitr.io import geotiff, shards, storage
from rsitr.io.captions import CaptionCorpus, CaptionRecord, read_corpus, read_split_table, seeded_split

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".img")
PLAN_DIR = "_ingest"
DEFAULT_SHARD_MB = 64
Result = TypeVar("Result")


@dataclass
class UnitReport:
    """What one unit of an ingest wrote and rejected; stored as ``_ingest/<shard>.json`` when it finishes."""

    shard: dict[str, Any] | None = None
    splits: dict[str, dict[str, int]] = field(default_factory=dict)
    quarantined: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0
    inputs: int = 0
    without_footprint: int = 0
    captions_skipped: int = 0

    def add_row(self, row: dict[str, Any]) -> None:
        """Count a row that will be written."""
        tally = self.splits.setdefault(row["split"], {"rows": 0, "captions": 0})
        tally["rows"] += 1
        tally["captions"] += len(row["captions"])

    def quarantine(self, name: str, reason: str, captions: int = 0) -> None:
        """Record an input that is not written."""
        self.quarantined.append({"input": name, "reason": reason, "captions": captions})
        log.warning("quarantined %s: %s", name, reason)


def _row(**values: Any) -> dict[str, Any]:
    row: dict[str, Any] = {name: None for name in shards.SHARD_SCHEMA.names}
    row.update(values)
    return row


def _unit_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def _run_unit(root: str, index: int, work: Callable[[], tuple[list[dict[str, Any]], UnitReport]]) -> UnitReport:
    """Run one unit unless its completion record exists; write its shard, then its record."""
    record_uri = storage.join(root, PLAN_DIR, f"{_unit_name(index)}.json")
    if storage.exists(record_uri):
        return UnitReport(**storage.read_json(record_uri))
    rows, report = work()
    if rows:
        report.shard = shards.write_shard(root, _unit_name(index), rows)
    storage.write_json_atomic(record_uri, asdict(report))
    return report


def _execute(tasks: Sequence[Callable[[], Result]], workers: int | None) -> list[Result]:
    """Run callables in order here (``workers == 1`` or a single task) or as Ray tasks, at most ``workers`` at once.

    ``workers=None`` uses every CPU the Ray cluster has.
    """
    if workers == 1 or len(tasks) <= 1:
        return [task() for task in tasks]
    import ray

    from rsitr.raysession import init_ray

    init_ray()
    limit = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    remote: Any = ray.remote(num_cpus=1, max_retries=2)(_call)
    results: dict[int, Result] = {}
    pending: dict[Any, int] = {}
    queue = list(enumerate(tasks))
    while queue or pending:
        while queue and len(pending) < limit:
            index, task = queue.pop(0)
            pending[remote.remote(task)] = index
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            results[pending.pop(ref)] = ray.get(ref)
    return [results[i] for i in range(len(tasks))]


def _call(task: Callable[[], Result]) -> Result:
    return task()


def _prepare_output(root: str, fingerprint: str, overwrite: bool) -> dict[str, Any] | None:
    """Claim ``root`` for this plan; the finished manifest when this exact plan already completed there.

    Raises:
        IngestError: ``root`` holds a different ingest and ``overwrite`` is not set.
    """
    plan_uri = storage.join(root, PLAN_DIR, "plan.json")
    existing = storage.read_json(plan_uri).get("fingerprint") if storage.exists(plan_uri) else None
    has_output = existing is not None or storage.exists(storage.join(root, shards.MANIFEST_NAME))
    if has_output and existing != fingerprint:
        if not overwrite:
            raise IngestError(
                f"{root} already holds a different ingest (other inputs or parameters); "
                "choose another --out/--dataset or pass --overwrite to replace it"
            )
        for part in (PLAN_DIR, shards.SHARD_DIR, shards.MANIFEST_NAME):
            storage.remove_tree(storage.join(root, part))
    if existing == fingerprint and storage.exists(storage.join(root, shards.MANIFEST_NAME)):
        manifest: dict[str, Any] = storage.read_json(storage.join(root, shards.MANIFEST_NAME))
        if manifest.get("fingerprint") == fingerprint:
            return manifest
    if existing == fingerprint and (removed := storage.remove_temporaries(root)):
        log.info("resuming the ingest at %s: removed %d half-written file(s) of the interrupted run", root, removed)
    storage.write_json_atomic(plan_uri, {"fingerprint": fingerprint})
    return None


def _fingerprint(plan: Any) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()


def _finish(
    root: str,
    reports: list[UnitReport],
    quarantined: list[dict[str, Any]],
    inputs_seen: int,
    extra: dict[str, Any],
    strict: bool,
) -> dict[str, Any]:
    """Aggregate the unit reports into the manifest, write it, and enforce ``strict`` / "something usable"."""
    splits: dict[str, dict[str, int]] = {}
    for report in reports:
        for split, tally in report.splits.items():
            total = splits.setdefault(split, {"rows": 0, "captions": 0})
            total["rows"] += tally["rows"]
            total["captions"] += tally["captions"]
    all_quarantined = quarantined + [q for report in reports for q in report.quarantined]
    manifest = {
        "inputs_seen": inputs_seen,
        "rows": sum(t["rows"] for t in splits.values()),
        "captions": sum(t["captions"] for t in splits.values()),
        "skipped": sum(report.skipped for report in reports),
        "splits": splits,
        "quarantined": [{"input": q["input"], "reason": q["reason"]} for q in all_quarantined],
        "captions_of_unwritten_inputs": sum(q.get("captions", 0) for q in all_quarantined)
        + sum(report.captions_skipped for report in reports),
        "shards": [report.shard for report in reports if report.shard],
        **extra,
    }
    shards.write_manifest(root, manifest)
    log.info(
        "ingested %d rows into %s (%d quarantined, %d skipped)",
        manifest["rows"],
        root,
        len(all_quarantined),
        manifest["skipped"],
    )
    if not manifest["rows"]:
        reasons = "; ".join(f"{q['input']}: {q['reason']}" for q in manifest["quarantined"][:3])
        raise IngestError(
            f"nothing usable to ingest into {root} ({len(all_quarantined)} quarantined, {manifest['skipped']} "
            f"skipped{': ' + reasons if reasons else ''}); see {storage.join(root, shards.MANIFEST_NAME)}"
        )
    if strict and all_quarantined:
        raise IngestError(
            f"{len(all_quarantined)} input(s) quarantined and --strict was given; "
            f"see {storage.join(root, shards.MANIFEST_NAME)}"
        )
    return manifest


# ---------------------------------------------------------------------------------------------- scenes


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
        row = _row(
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
            acquired_at=_timestamp(plan.acquired_at),
            sha256=tile.pixels_sha256,
        )
        report.add_row(row)
        rows.append(row)
    return rows, report


def _timestamp(iso: str | None) -> datetime | None:
    return datetime.fromisoformat(iso) if iso else None


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
) -> dict[str, Any]:
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
    planned = _execute([partial(_plan_or_reason, spec, options) for spec in specs], workers)
    quarantined: list[dict[str, Any]] = []
    units: list[tuple[geotiff.ScenePlan, list[tuple[int, int]]]] = []
    per_unit = _tiles_per_unit(options, shard_mb)
    scene_reports: list[dict[str, Any]] = []
    for spec, plan in zip(specs, planned, strict=True):
        if isinstance(plan, str):
            quarantined.append({"input": spec, "reason": plan, "captions": 0})
            log.warning("quarantined %s: %s", spec, plan)
            continue
        windows = plan.windows(options)
        first_unit = len(units)
        units.extend((plan, windows[i : i + per_unit]) for i in range(0, len(windows), per_unit))
        scene_reports.append({**plan.summary(), "windows": len(windows), "units": [first_unit, len(units)]})
    records = corpus.records
    used = {geotiff.tile_id(p.name, r, c) for p, w in units for r, c in w}
    quarantined.extend(_entry_rejections(corpus))
    quarantined.extend(
        {
            "input": name,
            "reason": "caption entry names no tile of these scenes",
            "captions": len(records[name].captions),
        }
        for name in sorted(set(records) - used)
    )
    parameters = {
        "kind": "scenes",
        "dataset": dataset,
        "paths": paths,
        "captions": captions,
        "split": split,
        "options": asdict(options),
        "shard_mb": shard_mb,
    }
    fingerprint = _fingerprint([parameters, [(p.summary(), len(w)) for p, w in units], quarantined])
    done = _prepare_output(root, fingerprint, overwrite)
    if done is not None:
        log.info("%s already holds this ingest; nothing to do", root)
        return done
    tasks = [
        partial(
            _run_unit,
            root,
            index,
            partial(
                _scene_unit,
                dataset,
                plan,
                options,
                windows,
                _records_for(records, plan, windows) if captions else None,
                split,
            ),
        )
        for index, (plan, windows) in enumerate(units)
    ]
    reports = _execute(tasks, workers)
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
    extra = {"fingerprint": fingerprint, "parameters": parameters, "scenes": scene_reports, **_caption_stats(corpus)}
    return _finish(root, reports, quarantined, len(quarantined) + sum(r.inputs for r in reports), extra, strict)


def _records_for(
    records: dict[str, CaptionRecord], plan: geotiff.ScenePlan, windows: list[tuple[int, int]]
) -> dict[str, CaptionRecord]:
    """Only the captions of these windows travel with a unit (keeps Ray task arguments small)."""
    names = (geotiff.tile_id(plan.name, r, c) for r, c in windows)
    return {name: records[name] for name in names if name in records}


def _caption_stats(corpus: CaptionCorpus) -> dict[str, Any]:
    return {
        "captions_seen": corpus.captions_seen,
        "captions_rejected": [{"input": r.input, "reason": r.reason} for r in corpus.rejected_captions],
        "caption_formats": corpus.formats,
    }


def _entry_rejections(corpus: CaptionCorpus) -> list[dict[str, Any]]:
    """Caption entries rejected while reading (duplicates), as quarantined inputs with their captions."""
    return [{"input": r.input, "reason": r.reason, "captions": r.captions} for r in corpus.duplicate_entries]


# ---------------------------------------------------------------------------------------------- corpus


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
    return {**described, **geo, "acquired_at": _timestamp(plan.acquired_at)}


def _corpus_unit(dataset: str, items: list[_CorpusItem]) -> tuple[list[dict[str, Any]], UnitReport]:
    report = UnitReport(inputs=len(items))
    rows: list[dict[str, Any]] = []
    for item in items:
        try:
            described = _decode_chip(item.name, storage.read_bytes(item.uri))
        except (ValueError, OSError) as err:
            report.quarantine(item.name, str(err), len(item.record.captions))
            continue
        row = _row(
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
) -> tuple[list[tuple[_CorpusItem, int]], list[dict[str, Any]]]:
    """Pair caption entries with image files; everything that cannot pair is quarantined with its reason."""
    by_base: dict[str, list[str]] = {}
    for file_rel in files:
        by_base.setdefault(PurePosixPath(file_rel).name, []).append(file_rel)
    quarantined = _entry_rejections(corpus)
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
            quarantined.append({"input": name, "reason": reason, "captions": len(record.captions)})
            continue
        assert rel is not None
        claimed[rel] = name
        ids[image_id] = rel
        items.append((_CorpusItem(rel, storage.join(images_uri, rel), image_id, record), files[rel]))
    for rel in sorted(set(files) - named):
        quarantined.append({"input": rel, "reason": "image has no caption in the caption files", "captions": 0})
    return items, quarantined


def _assign_splits(
    items: list[tuple[_CorpusItem, int]],
    table: dict[str, tuple[str, str | None]],
    default_split: str | None,
    seed: int,
) -> dict[str, Any]:
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
) -> dict[str, Any]:
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
    parameters = {
        "kind": "corpus",
        "dataset": dataset,
        "images": images_uri,
        "captions": [storage.resolve(s) for s in sources],
        "format": fmt,
        "split": split,
        "split_table": split_table,
        "seed": seed,
        "shard_mb": shard_mb,
    }
    plan = [parameters, [[(i.name, i.record.split, i.record.captions, i.record.label) for i in u] for u in units]]
    fingerprint = _fingerprint([plan, {rel: files[rel] for rel in sorted(files)}, quarantined])
    root = shards.dataset_root(out, dataset)
    done = _prepare_output(root, fingerprint, overwrite)
    if done is not None:
        log.info("%s already holds this ingest; nothing to do", root)
        return done
    reports = _execute(
        [partial(_run_unit, root, index, partial(_corpus_unit, dataset, unit)) for index, unit in enumerate(units)],
        workers,
    )
    extra = {
        "fingerprint": fingerprint,
        "parameters": parameters,
        **split_stats,
        **_caption_stats(corpus),
    }
    seen = len(quarantined) + sum(r.inputs for r in reports)
    return _finish(root, reports, quarantined, seen, extra, strict)


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


def ingest_folder(folder: str, dataset: str, out: str, tile_size: int = 128, workers: int | None = 1) -> dict[str, Any]:
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
