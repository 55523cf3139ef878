"""GeoTIFF scenes → image tiles read by windows, with their footprints in EPSG:4326."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import rasterio
from PIL import Image
from rasterio.warp import transform as warp_transform
from rasterio.windows import Window
from shapely.geometry import Polygon


class SceneError(ValueError):
    """A scene that cannot be tiled (unreadable, no bands, …)."""


def tile_id(scene_stem: str, row_off: int, col_off: int) -> str:
    """Stable id of the tile at pixel offsets ``(row_off, col_off)`` of a scene."""
    return f"{scene_stem}_r{row_off:06d}_c{col_off:06d}"


@dataclass
class Tile:
    """One tile cut from a scene, ready to become a shard row."""

    image_id: str
    png: bytes
    window: dict[str, int]
    pixels_sha256: str
    geometry: bytes | None
    bounds: list[float] | None


def _to_uint8(data: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    scale = np.where(high > low, 255.0 / np.maximum(high - low, 1e-12), 0.0)
    out = (data.astype(np.float64) - low[:, None, None]) * scale[:, None, None]
    return np.clip(out, 0, 255).astype(np.uint8)


def _stretch_limits(src: rasterio.DatasetReader, bands: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-band 2nd/98th percentiles from a decimated read (overviews where present), never the full scene."""
    if src.dtypes[0] == "uint8":
        return np.zeros(len(bands)), np.full(len(bands), 255.0)
    factor = max(1, max(src.height, src.width) // 1024)
    shape = (len(bands), max(1, src.height // factor), max(1, src.width // factor))
    data = src.read(bands, out_shape=shape, masked=True).astype(np.float64)
    low, high = [], []
    for band in data:
        valid = band.compressed()
        valid = valid[np.isfinite(valid)]
        lo, hi = np.percentile(valid, [2, 98]) if valid.size else (0.0, 1.0)
        low.append(lo)
        high.append(hi)
    return np.array(low), np.array(high)


def acquisition_time(src: rasterio.DatasetReader) -> datetime | None:
    """``TIFFTAG_DATETIME`` of the scene as UTC, when present and well-formed."""
    raw = src.tags().get("TIFFTAG_DATETIME") or src.tags().get("ACQUISITION_TIME")
    if not raw:
        return None
    for fmt in ("%Y:%m:%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d"):
        try:
            return datetime.strptime(raw.strip(), fmt).replace(tzinfo=UTC)
        except ValueError:
            continue
    return None


def _footprint(src: rasterio.DatasetReader, window: Window) -> tuple[bytes | None, list[float] | None]:
    if src.crs is None:
        return None, None
    left, bottom, right, top = rasterio.windows.bounds(window, src.transform)
    xs = [left, right, right, left]
    ys = [top, top, bottom, bottom]
    lons, lats = warp_transform(src.crs, "EPSG:4326", xs, ys)
    return Polygon(zip(lons, lats, strict=True)).wkb, [left, bottom, right, top]


def iter_tiles(path: str, tile_size: int = 256, max_nodata: float = 0.5) -> Iterator[Tile]:
    """Cut a scene into ``tile_size`` squares by windowed reads.

    Edge remainders smaller than a tile are dropped (never shifted), tiles whose nodata fraction exceeds
    ``max_nodata`` are skipped. Bands 1–3 make RGB (a single band is repeated); non-uint8 rasters are
    stretched to 0–255 between their 2nd and 98th percentiles.

    Raises:
        SceneError: the file cannot be opened as a raster.
    """
    try:
        src = rasterio.open(path)
    except rasterio.errors.RasterioIOError as err:
        raise SceneError(f"{path}: not a readable raster ({err})") from err
    with src:
        bands = [1, 2, 3] if src.count >= 3 else [1, 1, 1]
        low, high = _stretch_limits(src, bands)
        stem = path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        for row_off in range(0, src.height - tile_size + 1, tile_size):
            for col_off in range(0, src.width - tile_size + 1, tile_size):
                window = Window(col_off, row_off, tile_size, tile_size)
                mask = src.dataset_mask(window=window)
                if float((mask == 0).mean()) > max_nodata:
                    continue
                pixels = _to_uint8(src.read(bands, window=window), low, high).transpose(1, 2, 0)
                encoded = io.BytesIO()
                Image.fromarray(np.ascontiguousarray(pixels)).save(encoded, format="PNG")
                geometry, bounds = _footprint(src, window)
                yield Tile(
                    image_id=tile_id(stem, row_off, col_off),
                    png=encoded.getvalue(),
                    window={"col_off": col_off, "row_off": row_off, "width": tile_size, "height": tile_size},
                    pixels_sha256=hashlib.sha256(pixels.tobytes()).hexdigest(),
                    geometry=geometry,
                    bounds=bounds,
                )


def scene_info(path: str) -> dict[str, Any]:
    """CRS (as EPSG code or WKT), dtype and acquisition time of a scene."""
    with rasterio.open(path) as src:
        crs = None
        if src.crs is not None:
            epsg = src.crs.to_epsg()
            crs = f"EPSG:{epsg}" if epsg else src.crs.to_wkt()
        return {"crs": crs, "dtype": src.dtypes[0], "bands": src.count, "acquired_at": acquisition_time(src)}
