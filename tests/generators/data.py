"""Generators of small real inputs for the broken and edge cases the shared data does not cover.

Each writes genuine files (GeoTIFFs through GDAL, images through Pillow); run as a script to write them all to a
folder for a look: ``python tests/generators/data.py /tmp/fixtures``.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import rasterio
from PIL import Image
from rasterio.control import GroundControlPoint
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import from_origin
from waiting import wait_for

UTM33N = CRS.from_epsg(32633)
MARS_WKT = (
    'GEOGCS["Mars 2000",DATUM["D_Mars_2000",SPHEROID["Mars_2000_IAU_IAG",3396190,169.894447223612]],'
    'PRIMEM["Greenwich",0],UNIT["Decimal_Degree",0.0174532925199433]]'
)


def gradient(height: int, width: int, bands: int = 3, dtype: str = "uint8", scale: float = 255.0) -> np.ndarray:
    """Distinct per-band ramps, so band order and windows are visible in the output."""
    rows, cols = np.mgrid[0:height, 0:width]
    planes = [((rows * (b + 1) + cols * (3 - b)) % 256) / 255.0 * scale for b in range(bands)]
    return np.stack(planes).astype(dtype)


def write_geotiff(
    path: Path,
    data: np.ndarray,
    crs: CRS | str | None = UTM33N,
    nodata: float | None = None,
    gcps: bool = False,
    tags: dict[str, str] | None = None,
) -> Path:
    """A GeoTIFF of ``data`` (bands, rows, cols), 10 m pixels near 15°E 45°N unless ``crs`` is None."""
    profile = {
        "driver": "GTiff",
        "height": data.shape[1],
        "width": data.shape[2],
        "count": data.shape[0],
        "dtype": data.dtype.name,
        "nodata": nodata,
    }
    if crs is not None and not gcps:
        profile.update(crs=crs, transform=from_origin(500000, 5000000, 10, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data)
            if gcps:
                points = [
                    GroundControlPoint(0, 0, 15.0, 45.0),
                    GroundControlPoint(0, data.shape[2], 15.1, 45.0),
                    GroundControlPoint(data.shape[1], 0, 15.0, 44.9),
                ]
                dst.gcps = (points, CRS.from_epsg(4326))
            if tags:
                dst.update_tags(**tags)
    return path


def jpeg_bytes(seed: int, size: int = 32) -> bytes:
    """A small noisy JPEG (distinct per seed)."""
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def broken_corpus(root: Path) -> tuple[Path, Path]:
    """An image folder and a Karpathy caption file with every kind of bad input, each named for what is wrong.

    Returns:
        The image folder and the caption file.
    """
    images = root / "images"
    images.mkdir(parents=True)
    (images / "good.jpg").write_bytes(jpeg_bytes(0))
    (images / "good2.png").write_bytes(_png(1))
    (images / "truncated.jpg").write_bytes(jpeg_bytes(2)[:200])
    (images / "empty.png").write_bytes(b"")
    (images / "not_an_image.jpg").write_bytes(b"this is a text file, not a JPEG\n")
    (images / "uncaptioned.jpg").write_bytes(jpeg_bytes(3))
    (images / "blank_caption.jpg").write_bytes(jpeg_bytes(4))
    (images / "twin.jpg").write_bytes(jpeg_bytes(5))
    (images / "twin.png").write_bytes(_png(6))
    (root / "outside.jpg").write_bytes(jpeg_bytes(7))
    entries = [
        {"filename": "good.jpg", "split": "train", "sentences": [{"raw": "A  green field ."}, {"raw": "@@BAD@@"}]},
        {"filename": "good2.png", "split": "val", "sentences": [{"raw": "a grey roof"}]},
        {"filename": "good.jpg", "split": "train", "sentences": [{"raw": "a second entry for good"}]},
        {"filename": "truncated.jpg", "split": "train", "sentences": [{"raw": "cut short"}]},
        {"filename": "empty.png", "split": "val", "sentences": [{"raw": "nothing"}]},
        {"filename": "not_an_image.jpg", "split": "val", "sentences": [{"raw": "words"}]},
        {"filename": "blank_caption.jpg", "split": "test", "sentences": [{"raw": "   "}, {"raw": " . "}]},
        {"filename": "missing.jpg", "split": "test", "sentences": [{"raw": "gone"}]},
        {"filename": "../outside.jpg", "split": "test", "sentences": [{"raw": "escape"}]},
        {"filename": "twin.jpg", "split": "train", "sentences": [{"raw": "twin one"}]},
        {"filename": "twin.png", "split": "train", "sentences": [{"raw": "twin two"}]},
    ]
    text = json.dumps({"images": entries}).encode()
    captions = root / "captions.json"
    # a caption that is not valid UTF-8: the raw bytes \xff\xfe where the placeholder was
    captions.write_bytes(text.replace(b"@@BAD@@", b"bad \xff\xfe bytes"))
    return images, captions


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(jpeg_bytes(seed))).save(buffer, format="PNG")
    return buffer.getvalue()


def odd_scenes(root: Path) -> dict[str, Path]:
    """Rasters that must ingest with a recorded reason, or be rejected clearly: no CRS, GCPs only, Mars,
    uint16, float with NaN, a corrupt file, a zero-byte file."""
    root.mkdir(parents=True, exist_ok=True)
    data = gradient(96, 80)
    scenes = {
        "no_crs": write_geotiff(root / "no_crs.tif", data, crs=None),
        "gcps_only": write_geotiff(root / "gcps_only.tif", data, gcps=True),
        "mars": write_geotiff(root / "mars.tif", data, crs=CRS.from_wkt(MARS_WKT)),
        "uint16": write_geotiff(root / "uint16.tif", gradient(96, 80, dtype="uint16", scale=4000.0) + 1000, nodata=0),
        "dated": write_geotiff(root / "dated.tif", data, tags={"TIFFTAG_DATETIME": "2021:06:01 10:30:00"}),
    }
    floats = gradient(96, 80, bands=1, dtype="float32", scale=1.0)
    floats[:, :48, :] = np.nan
    scenes["float_nan"] = write_geotiff(root / "float_nan.tif", floats)
    valid = scenes["dated"].read_bytes()
    (root / "corrupt.tif").write_bytes(valid[: len(valid) // 3])
    (root / "zero.tif").write_bytes(b"")
    scenes["corrupt"], scenes["zero"] = root / "corrupt.tif", root / "zero.tif"
    return scenes


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "fixtures")
    broken_corpus(target / "corpus")
    odd_scenes(target / "scenes")
    print(f"wrote fixtures under {target}")


def kill_when(command: list[str], ready: Callable[[], bool], what: str, cwd: Path, timeout: float = 300) -> None:
    """Run ``command`` in its own process group (starting its own Ray) and SIGKILL the whole group as soon as
    ``ready()`` holds — an interruption at a chosen point. Fails when it ends or times out before."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RSITR_RAY_CLUSTER")}
    child = subprocess.Popen(command, cwd=cwd, env=env, start_new_session=True)
    try:
        wait_for(what, ready, timeout, every=0.1, process=child)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()


def demo_index(out: Path, shards: Path, checkpoint: Path) -> Path:
    """A real index at ``out``: every tile of ``shards`` and their captions embedded by ``checkpoint`` (needs Ray)."""
    from rsitr.retrieval.embed import embed_archive
    from rsitr.retrieval.index import build_index

    summary = embed_archive(str(checkpoint), str(shards), str(out), captions=True)
    build_index(summary["embeddings"], str(out), summary["checkpoint"], captions=summary["captions"])
    return out
