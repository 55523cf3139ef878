"""A search result sheet as one self-contained HTML file: the query, each hit's thumbnail and score, and the hits'
footprints on a small map (inline SVG, lon/lat). No scripts, fonts or tiles from the network: it opens offline."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow.parquet as pq
import shapely
from PIL import Image

from rsitr.io import shards, storage

MAP_WIDTH, MAP_HEIGHT = 640, 400


def read_thumbnails(data: str, image_ids: Iterable[str], size: int = 192) -> dict[str, bytes]:
    """JPEG thumbnails of the given tiles, read from the ingested dataset's shards (missing ids are left out)."""
    wanted = sorted(set(image_ids))
    found: dict[str, bytes] = {}
    for uri in shards.shard_uris(data):
        fs, path = storage.filesystem(uri)
        with fs.open(path, "rb") as handle:
            table = pq.read_table(handle, columns=["image_id", "image"], filters=[("image_id", "in", wanted)])
        for image_id, data_bytes in zip(table["image_id"].to_pylist(), table["image"].to_pylist(), strict=True):
            found[image_id] = thumbnail(data_bytes, size)
        if len(found) == len(wanted):
            break
    return found


def thumbnail(image: bytes, size: int = 192, image_format: str = "JPEG") -> bytes:
    """An encoded image shrunk to fit ``size``×``size`` pixels, encoded as ``image_format`` (JPEG, PNG)."""
    with Image.open(io.BytesIO(image)) as img:
        thumb = img.convert("RGB")
    thumb.thumbnail((size, size))
    sink = io.BytesIO()
    thumb.save(sink, format=image_format, **({"quality": 85} if image_format == "JPEG" else {}))
    return sink.getvalue()


def _footprint_map(hits: Sequence[dict[str, Any]]) -> str:
    shapes = [(hit["rank"], shapely.from_wkt(hit["footprint"])) for hit in hits if hit.get("footprint")]
    if not shapes:
        return "<p class='note'>No hit has a footprint (the tiles carry no georeference).</p>"
    minx, miny, maxx, maxy = shapely.GeometryCollection([s for _, s in shapes]).bounds
    pad_x, pad_y = max((maxx - minx) * 0.05, 1e-4), max((maxy - miny) * 0.05, 1e-4)
    minx, maxx, miny, maxy = minx - pad_x, maxx + pad_x, miny - pad_y, maxy + pad_y
    scale = min(MAP_WIDTH / (maxx - minx), MAP_HEIGHT / (maxy - miny))

    def point(x: float, y: float) -> str:
        return f"{(x - minx) * scale:.1f},{(maxy - y) * scale:.1f}"  # north up

    parts = []
    for rank, shape in reversed(shapes):  # best hit drawn last, on top
        polygons = getattr(shape, "geoms", [shape])
        for polygon in polygons:
            ring = " ".join(point(x, y) for x, y in getattr(polygon, "exterior", polygon).coords)
            parts.append(f"<polygon points='{ring}'><title>#{rank}</title></polygon>")
        x, y = point(shape.centroid.x, shape.centroid.y).split(",")
        parts.append(f"<text x='{x}' y='{y}'>{rank}</text>")
    width, height = (maxx - minx) * scale, (maxy - miny) * scale
    extent = f"lon {minx:.4f} … {maxx:.4f}, lat {miny:.4f} … {maxy:.4f} (EPSG:4326)"
    return (
        f"<svg class='map' viewBox='0 0 {width:.0f} {height:.0f}' width='{width:.0f}' height='{height:.0f}'>"
        + "".join(parts)
        + f"</svg><p class='note'>{html.escape(extent)}</p>"
    )


def render_html(query: str, hits: Sequence[dict[str, Any]], thumbnails: dict[str, bytes], context: str = "") -> str:
    """The result sheet for ``hits`` (as :func:`rsitr.retrieval.search.search` returns them)."""
    cards = []
    for hit in hits:
        thumb = thumbnails.get(hit["image_id"])
        alt = html.escape(hit["image_id"])
        image = (
            f"<img src='data:image/jpeg;base64,{base64.b64encode(thumb).decode()}' alt='{alt}'>"
            if thumb
            else "<div class='missing'>no thumbnail</div>"
        )
        details = [f"<b>#{hit['rank']}</b> score {hit['score']:.3f}", html.escape(hit["image_id"])]
        if hit.get("acquired_at"):
            details.append(f"acquired {html.escape(hit['acquired_at'])}")
        if hit.get("source_uri"):
            details.append(f"<span class='uri'>{html.escape(hit['source_uri'])}</span>")
        cards.append(f"<figure>{image}<figcaption>{'<br>'.join(details)}</figcaption></figure>")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>rsitr: {html.escape(query)}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ margin: 0; width: 200px; }} figure img, .missing {{ width: 192px; height: 192px; object-fit: cover; }}
.missing {{ background: #eee; display: flex; align-items: center; justify-content: center; color: #888; }}
figcaption {{ font-size: 12px; word-break: break-all; }} .uri {{ color: #666; }}
.map {{ border: 1px solid #ccc; background: #f4f7f4; max-width: 100%; height: auto; }}
.map polygon {{ fill: rgba(220, 60, 30, 0.25); stroke: #c33; stroke-width: 1; }}
.map text {{ font-size: 11px; text-anchor: middle; fill: #222; }} .note {{ color: #666; font-size: 12px; }}
</style></head><body>
<h1>“{html.escape(query)}”</h1><p class="note">{html.escape(context)}</p>
<div class="grid">{"".join(cards)}</div>
<h2>Footprints</h2>{_footprint_map(hits)}
</body></html>
"""


def write_html(out: str, query: str, hits: Sequence[dict[str, Any]], data: str | None, context: str = "") -> None:
    """Write the result sheet to ``out`` atomically (thumbnails from ``data``'s shards when it is known)."""
    thumbnails = read_thumbnails(data, (h["image_id"] for h in hits)) if data else {}
    storage.write_bytes_atomic(storage.resolve(out), render_html(query, hits, thumbnails, context).encode())
