"""Raster scenes → RGB tiles read by windows, never whole, with their footprints in EPSG:4326.

A scene is one raster file, or several single-band files of one grid joined with commas
(``red.tif,green.tif,blue.tif``). Local paths and ``s3://`` URIs both work; remote files are read by byte ranges.

Display rule (recorded per scene in the manifest): uint8 bands are used as they are; any other dtype is stretched
linearly per band between its 2nd and 98th percentiles of valid pixels, computed once per scene from a read
decimated to ≤1024 px on the long side (GDAL serves it from overviews when the file has them). Pixels that are
nodata, masked, alpha-transparent or non-finite become black and count towards the tile's nodata fraction.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import rasterio
from PIL import Image
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window

from rsitr.errors import ConfigError, UserError
from rsitr.io import storage
from rsitr.io.georef import acquisition_time, footprint, georeference

BAND_PRESETS: dict[str, tuple[int, ...]] = {
    "rgb": (1, 2, 3),
    "landsat8": (4, 3, 2),
    "landsat9": (4, 3, 2),
    "landsat7": (3, 2, 1),
    "sentinel2": (4, 3, 2),
    "naip": (1, 2, 3),
}
EDGE_MODES = ("pad", "drop")
_STRETCH_PX = 1024


# the window side scenes are cut into unless told otherwise (CLI, flows and the nightly re-index agree on it)
SCENE_TILE_SIZE = 256


class SceneError(UserError, ValueError):
    """A scene that cannot be tiled: unreadable, bands that do not exist or do not align, no CRS when required."""


@dataclass(frozen=True)
class TileOptions:
    """How scenes are cut into tiles.

    Attributes:
        tile_size: window side in source pixels.
        out_size: side of the stored tile in pixels (``None``: same as ``tile_size``); smaller reads from overviews.
        overlap: pixels shared by neighbouring windows.
        bands: 1-based source bands that make R, G, B, or a preset name from ``BAND_PRESETS``; ``None`` picks
            1,2,3 for ≥3 bands and repeats band 1 otherwise. Stacked band files count bands across the files.
        max_nodata: tiles with a larger nodata fraction are skipped (and counted).
        edge: ``pad`` keeps partial windows at the right/bottom edge, filled as nodata; ``drop`` leaves them out.
        require_georef: a scene without a usable Earth CRS is rejected instead of ingested with a null footprint.
    """

    tile_size: int = SCENE_TILE_SIZE
    out_size: int | None = None
    overlap: int = 0
    bands: tuple[int, ...] | str | None = None
    max_nodata: float = 0.5
    edge: str = "pad"
    require_georef: bool = False

    def __post_init__(self) -> None:
        if self.tile_size < 8:
            raise ConfigError(f"tile size {self.tile_size} is too small (minimum 8)")
        if not 0 <= self.overlap < self.tile_size:
            raise ConfigError(f"overlap {self.overlap} must be in [0, tile size {self.tile_size})")
        if self.edge not in EDGE_MODES:
            raise ConfigError(f"edge mode {self.edge!r} is not one of {', '.join(EDGE_MODES)}")
        if not 0.0 <= self.max_nodata <= 1.0:
            raise ConfigError(f"max nodata fraction {self.max_nodata} must be within [0, 1]")
        if isinstance(self.bands, str) and self.bands not in BAND_PRESETS:
            raise ConfigError(f"unknown band preset {self.bands!r}; presets: {', '.join(BAND_PRESETS)}")

    @property
    def output_size(self) -> int:
        """Side of the stored tile."""
        return self.out_size or self.tile_size


def parse_bands(text: str | None) -> tuple[int, ...] | str | None:
    """``"4,3,2"`` → ``(4, 3, 2)``; a preset name stays a name; empty → ``None``."""
    if not text:
        return None
    if text in BAND_PRESETS:
        return text
    try:
        bands = tuple(int(part) for part in text.split(","))
    except ValueError as err:
        raise ConfigError(f"bands {text!r}: expected 1-based numbers like 4,3,2 or a preset") from err
    if len(bands) not in (1, 3) or min(bands) < 1:
        raise ConfigError(f"bands {text!r}: give one band (grey) or three (R,G,B), numbered from 1")
    return bands


@dataclass
class ScenePlan:
    """What one scene will become: its grid, bands, display rule and georeferencing, without any pixels."""

    source: str
    name: str
    width: int
    height: int
    count: int
    dtype: str
    bands: list[int]
    crs: str | None
    georef_reason: str | None
    acquired_at: str | None
    stretch_low: list[float] = field(default_factory=list)
    stretch_high: list[float] = field(default_factory=list)

    def windows(self, options: TileOptions) -> list[tuple[int, int]]:
        """``(row_off, col_off)`` of every window, row-major."""
        return [(r, c) for r in _offsets(self.height, options) for c in _offsets(self.width, options)]

    def summary(self) -> dict[str, Any]:
        """JSON-ready description for the manifest."""
        return asdict(self)


def _offsets(extent: int, options: TileOptions) -> range:
    stride = options.tile_size - options.overlap
    if options.edge == "drop":
        return range(0, extent - options.tile_size + 1, stride)
    # pad: keep starting windows until one would lie wholly inside the previous window's overlap
    return range(0, max(extent - options.overlap, 1), stride)


def tile_id(scene_name: str, row_off: int, col_off: int) -> str:
    """Stable id of the tile at pixel offsets ``(row_off, col_off)`` of a scene."""
    return f"{scene_name}_r{row_off:06d}_c{col_off:06d}"


def scene_files(spec: str) -> list[str]:
    """The file URIs of a scene spec: one path, or comma-joined single-band files."""
    return [storage.resolve(part.strip()) for part in spec.split(",") if part.strip()]


def scene_name(spec: str) -> str:
    """Name used in tile ids: the file stem, or the stems of stacked band files joined by ``+``."""
    stems = [uri.rsplit("/", 1)[-1].rsplit(".", 1)[0] for uri in scene_files(spec)]
    return "+".join(stems)


@contextmanager
def open_scene(spec: str) -> Iterator[list[rasterio.DatasetReader]]:
    """Open every file of a scene; remote files through fsspec so GDAL reads them by byte ranges.

    Raises:
        SceneError: a file is missing or is not a readable raster, or stacked files do not share one grid.
    """
    with ExitStack() as stack, warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        datasets = []
        for uri in scene_files(spec):
            try:
                if storage.is_remote(uri):
                    fs, path = storage.filesystem(uri, random_access=True)
                    datasets.append(stack.enter_context(rasterio.open(path, opener=fs)))
                else:
                    datasets.append(stack.enter_context(rasterio.open(uri)))
            except (RasterioError, OSError) as err:
                raise SceneError(f"{uri}: not a readable raster ({err})") from err
        first = datasets[0]
        for other in datasets[1:]:
            if (other.width, other.height, other.transform, other.crs) != (
                first.width,
                first.height,
                first.transform,
                first.crs,
            ):
                raise SceneError(f"{spec}: stacked band files do not share one grid (size, transform and CRS)")
        yield datasets


def _band_sources(datasets: list[rasterio.DatasetReader], bands: list[int]) -> list[tuple[int, int]]:
    """``(dataset index, band in that dataset)`` of each selected band, counting bands across stacked files."""
    flat = [(index, band) for index, ds in enumerate(datasets) for band in range(1, ds.count + 1)]
    return [flat[band - 1] for band in bands]


def _select_bands(requested: tuple[int, ...] | str | None, total: int, spec: str) -> list[int]:
    if isinstance(requested, str):
        requested = BAND_PRESETS[requested]
    if requested is None:
        requested = (1, 2, 3) if total >= 3 else (1,)
    if max(requested) > total:
        raise SceneError(f"{spec}: band {max(requested)} requested but the scene has {total} band(s)")
    return list(requested) * 3 if len(requested) == 1 else list(requested)


def plan_scene(spec: str, options: TileOptions) -> ScenePlan:
    """Read a scene's header (and a decimated view for the stretch) and plan its tiles.

    Raises:
        SceneError: unreadable, bad band selection, or no usable Earth CRS while ``require_georef`` is set.
    """
    with open_scene(spec) as datasets:
        first = datasets[0]
        bands = _select_bands(options.bands, sum(ds.count for ds in datasets), spec)
        crs, reason = georeference(first)
        if reason and options.require_georef:
            raise SceneError(f"{spec}: no usable Earth georeferencing ({reason}) and georeferenced tiles were required")
        acquired = acquisition_time(first)
        sources = _band_sources(datasets, bands)
        plan = ScenePlan(
            source=spec,
            name=scene_name(spec),
            width=first.width,
            height=first.height,
            count=sum(ds.count for ds in datasets),
            dtype=datasets[sources[0][0]].dtypes[sources[0][1] - 1],
            bands=bands,
            crs=crs,
            georef_reason=reason,
            acquired_at=acquired.isoformat() if acquired else None,
        )
        plan.stretch_low, plan.stretch_high = _stretch_limits(datasets, sources, plan.dtype)
        return plan


def _stretch_limits(
    datasets: list[rasterio.DatasetReader], sources: list[tuple[int, int]], dtype: str
) -> tuple[list[float], list[float]]:
    if dtype == "uint8":
        return [0.0] * len(sources), [255.0] * len(sources)
    first = datasets[0]
    factor = max(1, math.ceil(max(first.height, first.width) / _STRETCH_PX))
    shape = (max(1, first.height // factor), max(1, first.width // factor))
    low, high = [], []
    for index, band in sources:
        data = datasets[index].read(band, out_shape=shape, masked=True, resampling=Resampling.nearest)
        valid = np.asarray(data.compressed(), dtype=np.float64)
        valid = valid[np.isfinite(valid)]
        lo, hi = np.percentile(valid, [2, 98]) if valid.size else (0.0, 1.0)
        low.append(float(lo))
        high.append(float(hi))
    return low, high


@dataclass
class TileResult:
    """One window's outcome: a tile, a skip (too much nodata) or a failure (unreadable window)."""

    image_id: str
    window: dict[str, int]
    png: bytes | None = None
    pixels_sha256: str | None = None
    geometry: bytes | None = None
    bounds: list[float] | None = None
    skipped: str | None = None
    failed: str | None = None


def _to_uint8(data: np.ndarray, low: list[float], high: list[float]) -> np.ndarray:
    lo = np.asarray(low)[:, None, None]
    span = np.asarray(high)[:, None, None] - lo
    scale = np.where(span > 0, 255.0 / np.where(span > 0, span, 1.0), 0.0)
    out = (np.nan_to_num(data.astype(np.float64)) - lo) * scale
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def read_tiles(plan: ScenePlan, options: TileOptions, windows: list[tuple[int, int]]) -> Iterator[TileResult]:
    """Read the given windows of a planned scene into PNG tiles.

    Raises:
        SceneError: the scene cannot be opened any more.
    """
    size, out = options.tile_size, options.output_size
    with open_scene(plan.source) as datasets:
        first = datasets[0]
        sources = _band_sources(datasets, plan.bands)
        for row_off, col_off in windows:
            window_dict = {"col_off": col_off, "row_off": row_off, "width": size, "height": size}
            result = TileResult(tile_id(plan.name, row_off, col_off), window_dict)
            width, height = min(size, plan.width - col_off), min(size, plan.height - row_off)
            read_w, read_h = max(1, round(width * out / size)), max(1, round(height * out / size))
            window = Window(col_off, row_off, width, height)
            try:
                tile = _read_tile(datasets, sources, window, (read_h, read_w), out, plan, options.max_nodata)
            except RasterioError as err:
                result.failed = f"unreadable window {window_dict}: {err}"
                yield result
                continue
            if isinstance(tile, TooMuchNodata):
                result.skipped = f"nodata fraction {tile.fraction:.2f} > {options.max_nodata}"
                yield result
                continue
            encoded = io.BytesIO()
            Image.fromarray(tile).save(encoded, format="PNG")
            result.png = encoded.getvalue()
            result.pixels_sha256 = hashlib.sha256(tile.data).hexdigest()
            if plan.crs is not None and plan.georef_reason != "no geotransform":
                geometry, bounds = footprint(first, Window(col_off, row_off, size, size))
                result.bounds = bounds
                result.geometry = geometry if plan.georef_reason is None else None
            yield result


@dataclass(frozen=True)
class TooMuchNodata:
    """A window left out: its nodata fraction is over ``TileOptions.max_nodata``."""

    fraction: float


def _read_tile(
    datasets: list[rasterio.DatasetReader],
    sources: list[tuple[int, int]],
    window: Window,
    shape: tuple[int, int],
    out: int,
    plan: ScenePlan,
    max_nodata: float,
) -> np.ndarray | TooMuchNodata:
    """One window as a padded (out, out, 3) uint8 tile, or :class:`TooMuchNodata` when it is over ``max_nodata``.

    The masks are read first, so windows that will be skipped never have their bands read (floats excepted: their
    NaNs count as nodata, which takes the data).
    """
    resampling = Resampling.average if out < window.width or out < window.height else Resampling.nearest
    valid = np.ones(shape, dtype=bool)
    for index in sorted({i for i, _ in sources}):
        valid &= datasets[index].dataset_mask(window=window, out_shape=shape) > 0
    floating = np.dtype(plan.dtype).kind == "f"
    if not floating and 1.0 - valid.sum() / out**2 > max_nodata:
        return TooMuchNodata(1.0 - float(valid.sum()) / out**2)
    bands = np.stack([datasets[i].read(b, window=window, out_shape=shape, resampling=resampling) for i, b in sources])
    if floating:
        valid &= np.all(np.isfinite(bands), axis=0)
        if 1.0 - valid.sum() / out**2 > max_nodata:
            return TooMuchNodata(1.0 - float(valid.sum()) / out**2)
    identity = plan.dtype == "uint8" and plan.stretch_low == [0.0] * 3 and plan.stretch_high == [255.0] * 3
    pixels = bands if identity else _to_uint8(bands, plan.stretch_low, plan.stretch_high)
    tile = np.zeros((out, out, 3), dtype=np.uint8)
    tile[: shape[0], : shape[1]] = np.where(valid[..., None], pixels.transpose(1, 2, 0), 0)
    return tile
