"""A deterministic demo corpus: georeferenced GeoTIFF scenes with drawn land cover and matching captions.

Every scene is a grid of tile-sized cells. Each cell gets a land-cover background (forest, farmland, bare
ground, grassland), optionally a river or a lake, a road and a group of buildings with one roof colour, and
the five captions of the tile are written from exactly what was drawn there. Retrieval on this corpus is
learnable (captions name colours, shapes, counts and positions) but not trivial (attributes recur).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin

from rsitr.io.geotiff import tile_id

BACKGROUNDS = {
    "forest": ((34, 70, 30), "dense forest", "a forest"),
    "farmland": ((150, 160, 70), "farmland", "fields"),
    "bare": ((170, 140, 100), "bare ground", "bare land"),
    "grass": ((110, 170, 80), "grassland", "a meadow"),
}
ROOFS = {"red": (190, 50, 40), "white": (235, 235, 230), "blue": (60, 90, 190)}
POSITIONS = {"north": (0.25, 0.5), "south": (0.75, 0.5), "west": (0.5, 0.25), "east": (0.5, 0.75)}
NUMBERS = ["no", "one", "two", "three", "four", "five", "six"]


@dataclass
class Cell:
    """What is drawn in one tile."""

    background: str
    water: str  # "none", "river-ns", "river-ew", "lake-<position>"
    road: str  # "none", "ns", "ew"
    buildings: int
    roof: str
    building_side: str


def _random_cell(rng: np.random.Generator) -> Cell:
    water = rng.choice(["none", "none", "river-ns", "river-ew", "lake"])
    if water == "lake":
        water = f"lake-{rng.choice(list(POSITIONS))}"
    road = str(rng.choice(["none", "ns", "ew"]))
    buildings = int(rng.choice([0, 0, 1, 2, 3, 4, 5, 6]))
    side = str(rng.choice([p for p in POSITIONS if not water.endswith(p)]))
    return Cell(str(rng.choice(list(BACKGROUNDS))), str(water), road, buildings, str(rng.choice(list(ROOFS))), side)


def _smooth_noise(rng: np.random.Generator, size: int, scale: int) -> np.ndarray:
    coarse = rng.normal(size=(size // scale + 2, size // scale + 2))
    fine = np.kron(coarse, np.ones((scale, scale)))[:size, :size]
    return fine


def _draw_cell(cell: Cell, size: int, rng: np.random.Generator, tint: np.ndarray) -> np.ndarray:
    colour = np.array(BACKGROUNDS[cell.background][0], dtype=np.float64) + tint
    img = np.empty((size, size, 3))
    img[:] = colour
    if cell.background == "forest":
        img += _smooth_noise(rng, size, 3)[..., None] * 14
    elif cell.background == "farmland":
        stripes = rng.integers(3, 6)
        for k in range(stripes):
            lo, hi = k * size // stripes, (k + 1) * size // stripes
            img[lo:hi] += rng.normal(0, 22, size=3)
    else:
        img += _smooth_noise(rng, size, 8)[..., None] * 8
    yy, xx = np.mgrid[0:size, 0:size] / size
    water = np.array([40, 80, 160]) + tint * 0.5
    if cell.water.startswith("river"):
        phase, width = rng.uniform(0, 6.28), rng.uniform(0.07, 0.11)
        along, across = (yy, xx) if cell.water == "river-ns" else (xx, yy)
        centre = 0.5 + 0.15 * np.sin(along * 6.0 + phase)
        img[np.abs(across - centre) < width] = water
    elif cell.water.startswith("lake"):
        cy, cx = POSITIONS[cell.water.split("-")[1]]
        ry, rx = rng.uniform(0.14, 0.22, size=2)
        img[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1] = water
    if cell.road != "none":
        offset = rng.uniform(0.35, 0.65)
        coord = xx if cell.road == "ns" else yy
        img[np.abs(coord - offset) < 0.025] = (128, 128, 124)
    if cell.buildings:
        cy, cx = POSITIONS[cell.building_side]
        roof = np.array(ROOFS[cell.roof], dtype=np.float64)
        for k in range(cell.buildings):
            by = int((cy + (k // 3) * 0.13 - 0.07) * size)
            bx = int((cx + (k % 3 - 1) * 0.13) * size)
            half = max(2, size // 26)
            img[by - half + 2 : by + half + 2, bx - half + 2 : bx + half + 2] = (40, 40, 40)
            img[by - half : by + half, bx - half : bx + half] = roof
    img += rng.normal(0, 4, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def captions_for(cell: Cell, rng: np.random.Generator) -> list[str]:
    """Five captions that describe exactly what :func:`_draw_cell` drew."""
    _, name, alt = BACKGROUNDS[cell.background]
    parts: list[str] = []
    if cell.water.startswith("river"):
        direction = "from north to south" if cell.water == "river-ns" else "from west to east"
        water = f"a river runs {direction}"
        parts.append(f"a river crosses {name} {direction}")
    elif cell.water.startswith("lake"):
        side = cell.water.split("-")[1]
        water = f"a lake lies in the {side}"
        parts.append(f"a lake in the {side} of an area of {name}")
    else:
        water = "there is no water"
        parts.append(f"an area of {name} without water")
    road = {"none": "no road", "ns": "a road running north to south", "ew": "a road running west to east"}[cell.road]
    count = NUMBERS[cell.buildings]
    plural = "building" if cell.buildings == 1 else "buildings"
    if cell.buildings:
        built = f"{count} {plural} with {cell.roof} roofs in the {cell.building_side}"
        parts.append(f"{count} {cell.roof} roofed {plural} stand in the {cell.building_side} of {alt}")
    else:
        built = "no buildings"
        parts.append(f"{alt} with no buildings")
    parts.append(f"{name} with {road} and {built}")
    parts.append(f"{water} and there is {road} among the {name}")
    parts.append(f"an aerial view of {alt}: {built}, {road}")
    rng.shuffle(parts)
    return parts


def generate_demo_corpus(
    out_dir: str | Path,
    seed: int = 0,
    scenes: int = 12,
    cells_per_side: int = 6,
    tile_size: int = 128,
    split_fractions: tuple[float, float] = (0.7, 0.15),
) -> dict[str, object]:
    """Write ``scenes/*.tif`` and ``captions.json`` (Karpathy layout keyed by tile id) under ``out_dir``.

    Returns a summary with the number of scenes and tiles. The same seed always gives the same bytes.
    """
    out = Path(out_dir)
    (out / "scenes").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = []
    size = cells_per_side * tile_size
    base_date = datetime(2024, 3, 1, 10, 30, tzinfo=UTC)
    for s in range(scenes):
        stem = f"demo_scene_{s:03d}"
        tint = rng.normal(0, 10, size=3)
        pixels = np.zeros((size, size, 3), dtype=np.uint8)
        for r in range(cells_per_side):
            for c in range(cells_per_side):
                cell = _random_cell(rng)
                y, x = r * tile_size, c * tile_size
                pixels[y : y + tile_size, x : x + tile_size] = _draw_cell(cell, tile_size, rng, tint)
                draw = rng.uniform()
                split = "train" if draw < split_fractions[0] else "val" if draw < sum(split_fractions) else "test"
                images.append(
                    {
                        "filename": tile_id(stem, y, x),
                        "split": split,
                        "sentences": [{"raw": text} for text in captions_for(cell, rng)],
                    }
                )
        # UTM zone 33N around 15°E; scenes laid side by side, 10 m pixels.
        transform = from_origin(500_000 + s * size * 10, 5_000_000, 10, 10)
        profile = {
            "driver": "GTiff",
            "height": size,
            "width": size,
            "count": 3,
            "dtype": "uint8",
            "crs": "EPSG:32633",
            "transform": transform,
            "tiled": True,
            "blockxsize": 128,
            "blockysize": 128,
            "compress": "deflate",
        }
        with rasterio.open(out / "scenes" / f"{stem}.tif", "w", **profile) as dst:
            dst.write(pixels.transpose(2, 0, 1))
            acquired = base_date + timedelta(days=7 * s)
            dst.update_tags(TIFFTAG_DATETIME=acquired.strftime("%Y:%m:%d %H:%M:%S"))
    captions = {"dataset": "demo", "images": images}
    (out / "captions.json").write_text(json.dumps(captions, indent=1))
    return {"scenes": scenes, "tiles": len(images), "out": str(out)}
