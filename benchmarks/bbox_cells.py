"""Bbox-filtered search at 10⁶ vectors: the product's cell grid against the bounds test alone, side by side.

The index files each tile under a coarse spatial cell (``rsitr.retrieval.index_meta.CellGrid``: the footprint's
south-west corner on a 10° grid, a bitmap index, rows in cell order), so a bbox search starts with ``cell IN (…)``
and tests the footprint bounds only on those cells' rows. Compared on the same rows: the index as it was before the
grid (no cell column, rows in the order they were embedded, the bounds scanned on every row); the cell column with
its bitmap but rows in that order; and the product (rows in cell order).

Vectors: frozen pretrained EfficientNet-Lite0 pooled scales of 512 RSICD images (packaged weights, no training),
centred and randomly projected to 512-d, then mixed into 10⁶ real-shaped vectors as ``benchmarks/index.py`` does, with
its footprints (scenes over the globe, a scene's tiles side by side). 400 query vectors, each sent through every
variant in turn (interleaved, so the variants share the machine's state), the product's ANN settings and query
(``rsitr.retrieval.search.nearest``). Recall@10 against exact numpy search over the rows that pass the same filter.

Prints a table, writes JSON, and ends with one JSON line: ``p99_ms`` and ``recall_at_10`` per variant.
Usage: ``python -m benchmarks.bbox_cells [--rows 1000000] [--queries 400]``  (≈ 8 min at 10⁶ on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import lancedb
import numpy as np
import torch

from benchmarks.common import RESULTS, RSICD, require
from benchmarks.index import real_shaped, tiles_table  # the same rows as the index benchmark
from rsitr.config import load_config
from rsitr.data.preprocess import decode_image
from rsitr.models.msa import build_model
from rsitr.retrieval.index import ANN, add_cell_index, add_vector_index, cell_grid
from rsitr.retrieval.index_meta import CELL_DEGREES
from rsitr.retrieval.search import nearest
from rsitr.retrieval.search_inputs import SearchFilter
from rsitr.retrieval.tile_rows import CELL_COLUMN, index_rows

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=400)
    parser.add_argument("--out", default=str(RESULTS / "bbox_cells.json"))
    args = parser.parse_args()
    require(RSICD / "images", "RSICD")
    rng = np.random.default_rng(0)
    real = pretrained_vectors(512, rng)
    vectors = real_shaped(real, args.rows, rng)
    queries = real_shaped(real, args.queries, np.random.default_rng(1))
    rows = index_rows(tiles_table(vectors, rng, "bench"))  # the product's rows: cell column, in cell order
    embedded_order = np.argsort([int(i.removeprefix("tile-")) for i in rows["image_id"].to_pylist()])
    unsorted = rows.take(embedded_order)
    lon, lat = float(unsorted["min_lon"][0].as_py()), float(unsorted["min_lat"][0].as_py())
    half = BBOX_DEGREES / 2
    box = SearchFilter(bbox=(lon - half, lat - half, lon + half, lat + half))
    with tempfile.TemporaryDirectory() as tmp:
        db = lancedb.connect(tmp)
        built: dict[str, Any] = {}
        for name, data in (
            ("bounds_only", unsorted.drop_columns([CELL_COLUMN])),
            ("cells_unsorted", unsorted),
            ("product", rows),
        ):
            started = time.perf_counter()
            table = db.create_table(name, data=data)
            add_vector_index(table, ANN)
            grid = None
            if CELL_COLUMN in data.column_names:
                add_cell_index(table)
                grid = cell_grid(table)
            built[name] = {"table": table, "rows": data, "grid": grid, "build_s": time.perf_counter() - started}

        def search(name: str, query: np.ndarray) -> list[dict[str, Any]]:
            return nearest(built[name]["table"], query, 10, box, ANN, built[name]["grid"])

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
        "cell_degrees": CELL_DEGREES,
        "bbox_degrees": BBOX_DEGREES,
        "variants": {},
    }
    assert box.bbox is not None
    for name, variant in built.items():
        data = variant["rows"]
        vecs = data["vector"].combine_chunks().flatten().to_numpy().reshape(data.num_rows, -1)
        passing = np.flatnonzero(
            (data["max_lon"].to_numpy() >= box.bbox[0]) & (data["min_lon"].to_numpy() <= box.bbox[2])
            & (data["max_lat"].to_numpy() >= box.bbox[1]) & (data["min_lat"].to_numpy() <= box.bbox[3])
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
    print(
        f"\n{args.rows} vectors, {BBOX_DEGREES:.0f}° bbox, {CELL_DEGREES:g}° cells, {args.queries} queries interleaved"
    )
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
