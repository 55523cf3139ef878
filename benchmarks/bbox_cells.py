"""Bbox-filtered search at 10⁶ vectors: the product's prefilter against a coarse spatial cell column (exploration).

The product filters on the footprint bounds alone, so LanceDB scans the four bound columns of every row before the
vector search. Here a ``cell`` column (the footprint's south-west corner on a ``--cell``-degree grid) with a bitmap
index lets the predicate start with ``cell IN (…)`` — the cells a tile intersecting the bbox can start in, given the
widest footprint — followed by the exact bounds test, on the same rows; and once more with the rows stored in cell
order. Not in the product yet: this measures whether it is worth building.

Vectors: frozen pretrained EfficientNet-Lite0 pooled scales of 512 RSICD images (packaged weights, no training),
centred and randomly projected to 512-d, then mixed into 10⁶ real-shaped vectors as ``benchmarks/index.py`` does, with
its footprints (scenes over the globe, a scene's tiles side by side). 400 query vectors, each sent through every
variant in turn (interleaved, so the variants share the machine's state), the product's ANN settings and query
(``to_list`` of whole rows). Recall@10 against exact numpy search over the rows that pass the same filter.

Prints a table, writes JSON, and ends with one JSON line: ``p99_ms`` per variant and ``recall_at_10`` per variant.
Usage: ``python benchmarks/bbox_cells.py [--rows 1000000] [--cell 10] [--queries 400]``  (≈ 8 min at 10⁶ on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from lancedb.index import Bitmap

sys.path.insert(0, str(Path(__file__).resolve().parent))
from index import RSICD, real_shaped, tiles_table  # noqa: E402  (benchmarks/index.py: the same rows)

from rsitr.config import load_config  # noqa: E402
from rsitr.data.preprocess import decode_image  # noqa: E402
from rsitr.models.msa import build_model  # noqa: E402
from rsitr.retrieval.index import ANN, add_vector_index, index_rows  # noqa: E402
from rsitr.retrieval.query import SearchFilter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BBOX_DEGREES = 20.0


def pretrained_vectors(images: int, rng: np.random.Generator) -> np.ndarray:
    """Unit 512-d vectors from the frozen Lite0 tower's pooled scales of ``images`` RSICD images."""
    config = load_config("msa-lite0-minilm")
    model = build_model(config.model).eval()
    paths = sorted((RSICD / "images").iterdir())[:: max(1, 10_921 // images)][:images]
    pixels = np.stack([decode_image(p.read_bytes(), config.model.image_size) for p in paths])
    with torch.no_grad():
        pooled = [
            torch.cat(model.backbone(torch.as_tensor(pixels[i : i + 64])), dim=1) for i in range(0, len(pixels), 64)
        ]
    features = torch.cat(pooled).float().numpy()
    features -= features.mean(0)
    projected = features @ rng.normal(size=(features.shape[1], 512)).astype(np.float32)
    return projected / np.linalg.norm(projected, axis=1, keepdims=True)


def cell_ids(lon: np.ndarray, lat: np.ndarray, cell: float) -> np.ndarray:
    return (np.floor((lat + 90) / cell) * 1000 + np.floor((lon + 180) / cell)).astype(np.int32)


def bounds_predicate(box: tuple[float, float, float, float]) -> str:
    """The product's bbox predicate."""
    return str(SearchFilter(bbox=box).where())


def cells_predicate(box: tuple[float, float, float, float], cell: float, widest: float) -> str:
    """``cell IN (…)`` for every cell a footprint no wider than ``widest`` that meets ``box`` can start in."""
    lons = np.arange(np.floor((box[0] - widest + 180) / cell), np.floor((box[2] + 180) / cell) + 1)
    lats = np.arange(np.floor((box[1] - widest + 90) / cell), np.floor((box[3] + 90) / cell) + 1)
    cells = sorted(int(a * 1000 + o) for a in lats for o in lons)
    return f"cell IN ({', '.join(map(str, cells))}) AND {bounds_predicate(box)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--cell", type=float, default=10.0, help="grid cell size in degrees")
    parser.add_argument("--queries", type=int, default=400)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bbox_cells.json"))
    args = parser.parse_args()
    if not (RSICD / "images").is_dir():
        raise SystemExit(f"RSICD is absent at {RSICD} (see ../shared/data/README.md)")
    rng = np.random.default_rng(0)
    real = pretrained_vectors(512, rng)
    vectors = real_shaped(real, args.rows, rng)
    queries = real_shaped(real, args.queries, np.random.default_rng(1))
    rows = index_rows(tiles_table(vectors, rng, "bench"))
    min_lon, min_lat = rows["min_lon"].to_numpy(), rows["min_lat"].to_numpy()
    widest = float(max((rows["max_lon"].to_numpy() - min_lon).max(), (rows["max_lat"].to_numpy() - min_lat).max()))
    with_cells = rows.append_column("cell", pa.array(cell_ids(min_lon, min_lat, args.cell)))
    order = pc.sort_indices(with_cells, [("cell", "ascending")])
    lon, lat = float(min_lon[0]), float(min_lat[0])
    half = BBOX_DEGREES / 2
    box = (lon - half, lat - half, lon + half, lat + half)
    with tempfile.TemporaryDirectory() as tmp:
        db = lancedb.connect(tmp)
        built: dict[str, Any] = {}
        by_cells = cells_predicate(box, args.cell, widest)
        for name, data, vecs, predicate in (
            ("product", rows, vectors, bounds_predicate(box)),
            ("cell_bitmap", with_cells, vectors, by_cells),
            ("cell_bitmap_sorted", with_cells.take(order), vectors[order.to_numpy()], by_cells),
        ):
            started = time.perf_counter()
            table = db.create_table(name, data=data)
            add_vector_index(table, ANN)
            if "cell" in data.column_names:
                table.create_index("cell", config=Bitmap())
            built[name] = {"table": table, "rows": data, "vectors": vecs, "predicate": predicate,
                           "build_s": time.perf_counter() - started}  # fmt: skip

        def search(name: str, query: np.ndarray) -> list[dict[str, Any]]:
            request = built[name]["table"].search(query, vector_column_name="vector").distance_type("cosine")
            request = ANN.apply(request.limit(10), filtered=True)
            hits: list[dict[str, Any]] = request.where(built[name]["predicate"], prefilter=True).to_list()
            return hits

        for name in built:  # a serving process answers many queries per opened index
            for query in queries[:5]:
                search(name, query)
        latencies: dict[str, list[float]] = {name: [] for name in built}
        found: dict[str, list[set[str]]] = {name: [] for name in built}
        for query in queries:  # each query through every variant in turn
            for name in built:
                started = time.perf_counter()
                hits = search(name, query)
                latencies[name].append(1000 * (time.perf_counter() - started))
                found[name].append({h["image_id"] for h in hits})
    report: dict[str, Any] = {
        "rows": args.rows,
        "cell_degrees": args.cell,
        "bbox_degrees": BBOX_DEGREES,
        "variants": {},
    }
    for name, variant in built.items():
        data, vecs = variant["rows"], variant["vectors"]
        passing = np.flatnonzero(
            (data["max_lon"].to_numpy() >= box[0]) & (data["min_lon"].to_numpy() <= box[2])
            & (data["max_lat"].to_numpy() >= box[1]) & (data["min_lat"].to_numpy() <= box[3])
        )  # fmt: skip
        ids = data["image_id"].to_numpy(zero_copy_only=False)
        recalls = [
            len(set(ids[passing[np.argsort(-(vecs[passing] @ query))[:10]]].tolist()) & got) / 10
            for query, got in zip(queries, found[name], strict=True)
        ]
        report["variants"][name] = {
            "build_s": round(variant["build_s"], 1),
            "rows_in_bbox": int(len(passing)),
            **{f"p{q}_ms": round(float(np.percentile(latencies[name], q)), 1) for q in (50, 90, 99)},
            "recall_at_10": round(float(np.mean(recalls)), 3),
        }
    print(f"\n{args.rows} vectors, {BBOX_DEGREES:.0f}° bbox, {args.cell:g}° cells, {args.queries} queries interleaved")
    print(f"{'variant':>20} {'build s':>8} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'recall@10':>9}")
    for name, r in report["variants"].items():
        times = " ".join(f"{r[f'p{q}_ms']:7.1f}" for q in (50, 90, 99))
        print(f"{name:>20} {r['build_s']:8.1f} {times} {r['recall_at_10']:9.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(
        json.dumps(
            {name: {"p99_ms": r["p99_ms"], "recall_at_10": r["recall_at_10"]} for name, r in report["variants"].items()}
        )
    )


if __name__ == "__main__":
    main()
