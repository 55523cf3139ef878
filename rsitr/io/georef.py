"""Where and when a scene was taken: its CRS (and why footprints may be impossible), acquisition time, and each
window's footprint in EPSG:4326."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import numpy as np
import rasterio
from rasterio._err import CPLE_BaseError  # GDAL's error base; rasterio exports no public alias
from rasterio.warp import transform as warp_transform
from rasterio.windows import Window
from shapely.geometry import Polygon

_SEMI_MAJOR = re.compile(r'(?:SPHEROID|ELLIPSOID)\["[^"]*",\s*([0-9.eE+-]+)')
_EARTH_SEMI_MAJOR_M = (6.3e6, 6.4e6)


def georeference(ds: rasterio.DatasetReader) -> tuple[str | None, str | None]:
    """The scene's CRS (``EPSG:n`` or WKT) and, when footprints cannot be computed, why not."""
    if ds.crs is None:
        if ds.gcps[0]:
            return None, "GCPs only, no map projection (rectify the scene to get footprints)"
        return None, "no CRS"
    epsg = ds.crs.to_epsg()
    crs = f"EPSG:{epsg}" if epsg else ds.crs.to_wkt()
    if ds.transform.is_identity:
        return crs, "no geotransform"
    match = _SEMI_MAJOR.search(ds.crs.to_wkt())
    if match and not _EARTH_SEMI_MAJOR_M[0] < float(match.group(1)) < _EARTH_SEMI_MAJOR_M[1]:
        return crs, f"not an Earth CRS (ellipsoid semi-major axis {float(match.group(1)):.0f} m)"
    return crs, None


def acquisition_time(ds: rasterio.DatasetReader) -> datetime | None:
    """``TIFFTAG_DATETIME`` (or ``ACQUISITION_TIME``) of the scene as UTC, when present and well-formed."""
    tags = ds.tags()
    raw = tags.get("TIFFTAG_DATETIME") or tags.get("ACQUISITION_TIME")
    if not raw:
        return None
    for fmt in ("%Y:%m:%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%d"):
        try:
            return datetime.strptime(raw.strip(), fmt).replace(tzinfo=UTC)
        except ValueError:
            continue
    return None


def footprint(ds: rasterio.DatasetReader, window: Window) -> tuple[bytes | None, list[float]]:
    """Bounds in the source CRS and the EPSG:4326 footprint (edges densified; ``None`` if not representable)."""
    left, bottom, right, top = rasterio.windows.bounds(window, ds.transform)
    steps = np.linspace(0.0, 1.0, 9)[:-1]
    xs = np.concatenate(
        [left + (right - left) * steps, np.full(8, right), right - (right - left) * steps, np.full(8, left)]
    )
    ys = np.concatenate(
        [np.full(8, top), top - (top - bottom) * steps, np.full(8, bottom), bottom + (top - bottom) * steps]
    )
    try:
        lons, lats = warp_transform(ds.crs, "EPSG:4326", xs.tolist(), ys.tolist())
    except CPLE_BaseError:  # corners off the Earth's disk (geostationary views) or outside the projection
        return None, [left, bottom, right, top]
    if not (np.all(np.isfinite(lons)) and np.all(np.isfinite(lats))):
        return None, [left, bottom, right, top]
    return Polygon(zip(lons, lats, strict=True)).wkb, [left, bottom, right, top]
