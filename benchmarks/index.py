"""Embedding throughput against the bare image tower, and index query latency / recall at 10⁵ and 10⁶ vectors.

1. Embedding: ``rsitr.retrieval.embed.embed_archive`` (Ray Data decode + an actor pool, GeoParquet out) on N
   RSICD images vs the same model's ``encode_image`` over the same images pre-decoded in memory with all cores
   (the bound; half the tiles timed before the product and half after: it moves between runs here).
2. Search: real-shaped vectors — mixtures of the real RSICD image embeddings from step 1 plus small noise, so they
   keep the clusters and anisotropy real embeddings have — with footprints grouped in scenes around the globe,
   built into the product's index (LanceDB; ANN above ``rsitr.retrieval.index.ANN_THRESHOLD``) and queried one at a
   time with real RSICD caption embeddings through ``rsitr.retrieval.search.nearest``. Recall@10 is against exact
   search (numpy over the same vectors and the same filter). With and without a bbox filter. ``--variants``
   compares ANN settings side by side on the same table ("product" is ``rsitr.retrieval.index.ANN``).

Prints a table and writes JSON. Usage: ``python -m benchmarks.index [--images 2048] [--sizes 100000 1000000]
[--variants product ivf_pq32 …]`` (``--checkpoint``: a trained one; default an untrained CPU-default model — the
tower's cost is the same, the vectors' shape is not, so pass a trained one for the search numbers). ``--quick``:
2,048 images, 10⁶ vectors, 100 queries, the product's settings only (about 5 minutes). Embedding has a fixed
start-up (~9 s here: planning, each actor importing torch and loading the model) that a few hundred tiles cannot
amortise; 2,048 tiles is where it stops dominating the ratio, and the rate after start-up is printed beside it.
The last line printed is one JSON object: ``embed_vs_bound`` (the bare tower's tiles/s over the product's), and at
the largest size ``p99_ms``, ``recall_at_10``, ``p99_ms_bbox``, ``recall_at_10_bbox``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import lancedb
import numpy as np
import pyarrow as pa
import shapely
import torch

from benchmarks.common import RESULTS, RSICD, require
from rsitr.config import load_config
from rsitr.data.preprocess import decode_image, tokenize
from rsitr.ingest import ingest_corpus
from rsitr.io.captions import read_corpus
from rsitr.models import checkpoint as ckpt
from rsitr.models.msa import build_model
from rsitr.retrieval.embed import embed_archive
from rsitr.retrieval.index import (
    ANN,
    AnnSettings,
    add_filter_indices,
    add_vector_index,
    index_rows,
    publish,
    read_embeddings,
)
from rsitr.retrieval.index_meta import CellGrid
from rsitr.retrieval.search import SearchFilter, nearest
from rsitr.runtime.precision import inference, use_bf16
from rsitr.runtime.raysession import init_ray

log = logging.getLogger("benchmarks.index")
# ANN settings compared with --variants (the product's are rsitr.retrieval.index.ANN)
VARIANTS = {
    "product": ANN,
    "ivf_pq32": AnnSettings("IVF_PQ", sub_vectors=32, nprobes=24, refine_factor=10),  # the first product settings
    "ivf_pq64": AnnSettings("IVF_PQ", sub_vectors=64, nprobes=32, refine_factor=20),
    "ivf_sq_p32": AnnSettings("IVF_SQ", nprobes=32, refine_factor=5),
    "ivf_sq_p8": AnnSettings("IVF_SQ", nprobes=8, refine_factor=5),
    "ivf_flat": AnnSettings("IVF_FLAT", nprobes=16, refine_factor=None),
    "ivf_hnsw_sq": AnnSettings("IVF_HNSW_SQ", partitions_per_sqrt_rows=0.1, nprobes=8, refine_factor=5, ef=100),
    "sq_btree": replace(ANN, filter_indices=True),  # the product's plus B-trees on the filter columns
}
WARMUP_QUERIES = 5  # a serving process answers many queries per opened index: the first ones load its caches


def _checkpoint(work: Path, given: str | None) -> str:
    if given:
        return ckpt.resolve_checkpoint(given)
    torch.manual_seed(0)
    config = load_config("msa-lite0-minilm")
    ckpt.save_checkpoint(work / "checkpoint", build_model(config.model), None, config, epoch=0, metrics={})
    return str(work / "checkpoint")


def embedding_throughput(checkpoint: str, images: list[Path], work: Path) -> tuple[dict[str, Any], np.ndarray]:
    """tiles/s of the product's embedding vs the bare tower; returns the embeddings too."""
    folder = work / "images"
    folder.mkdir()
    for path in images:
        (folder / path.name).symlink_to(path)
    # RSICD's caption file names every image; the ones not linked here are counted as missing and skipped
    ingest_corpus(str(folder), str(RSICD / "captions" / "vt-rsbs_RSICD.csv"), "bench", str(work / "shards"), workers=1)
    data = str(work / "shards" / "bench")
    model, config, _ = ckpt.load_checkpoint(checkpoint)
    model.eval()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    decoded = np.stack([decode_image(p.read_bytes(), config.model.image_size) for p in images])

    def bound_seconds(tiles: np.ndarray) -> float:
        with inference(use_bf16("auto", torch.device("cpu"))):  # the precision the product embeds in
            model.encode_image(torch.as_tensor(tiles[:8]))  # warm-up
            started = time.perf_counter()
            for i in range(0, len(tiles), 64):
                model.encode_image(torch.as_tensor(tiles[i : i + 64]))
            return time.perf_counter() - started

    # the same loop moved by up to ±25 % between runs within an hour here: half the tiles are timed before the
    # product and half after (the same work as one pass)
    half = len(decoded) // 2
    bound_before = bound_seconds(decoded[:half])
    init_ray()  # a running cluster, as a nightly job finds it: startup is not embedding
    started = time.perf_counter()
    summary = embed_archive(checkpoint, data, str(work / "embedded"))
    product_s = time.perf_counter() - started
    vectors = np.stack(read_embeddings(summary["embeddings"])["embedding"].to_numpy(zero_copy_only=False))
    bound_after = bound_seconds(decoded[half:])
    bound_s = bound_before + bound_after
    startup_s = float(summary["first_batch_s"])  # planning + actors loading the model, until the first embeddings
    return {
        "tiles": float(len(images)),
        "product_s": product_s,
        "startup_s": startup_s,
        "product_tiles_per_s": len(images) / product_s,
        "after_startup_tiles_per_s": len(images) / (product_s - startup_s),
        "bound_tiles_per_s": len(images) / bound_s,
        "bound_tiles_per_s_before_after": [half / bound_before, (len(images) - half) / bound_after],
        "bound_over_product": product_s / bound_s,
        "bound_over_after_startup": (product_s - startup_s) / bound_s,
    }, vectors


def real_shaped(real: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` unit vectors mixed from pairs of real embeddings plus a little noise (keeps their clusters)."""
    out = np.empty((n, real.shape[1]), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        a, b = real[rng.integers(len(real), size=m)], real[rng.integers(len(real), size=m)]
        w = rng.uniform(0.0, 0.4, size=(m, 1)).astype(np.float32)
        mixed = (1 - w) * a + w * b + rng.normal(0, 0.02, size=(m, real.shape[1])).astype(np.float32)
        out[start : start + m] = mixed / np.linalg.norm(mixed, axis=1, keepdims=True)
    return out


def tiles_table(vectors: np.ndarray, rng: np.random.Generator, model_version: str) -> pa.Table:
    """Embeddings rows as ``rsitr.retrieval.embed`` writes them: 0.01° tiles in scenes of ~0.5° scattered over the land
    latitudes, dated over two years, a scene's tiles side by side (ingest writes a scene's tiles together)."""
    n = len(vectors)
    scenes = max(1, n // 1000)
    centers = np.column_stack([rng.uniform(-170, 170, scenes), rng.uniform(-55, 65, scenes)])
    scene = np.sort(rng.integers(scenes, size=n))
    lon = centers[scene, 0] + rng.uniform(-0.25, 0.25, n)
    lat = centers[scene, 1] + rng.uniform(-0.25, 0.25, n)
    boxes = shapely.box(lon, lat, lon + 0.01, lat + 0.01)
    start = datetime(2024, 1, 1, tzinfo=UTC)
    return pa.table(
        {
            "image_id": [f"tile-{i}" for i in range(n)],
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1]),
            "geometry": pa.array(shapely.to_wkb(boxes).tolist(), pa.binary()),
            "acquired_at": pa.array(
                [start + timedelta(days=int(d)) for d in rng.integers(730, size=n)], pa.timestamp("us", tz="UTC")
            ),
            "source_uri": [f"s3://archive/scene-{s}.tif" for s in scene],
            "model_version": [model_version] * n,
        }
    )


def search_benchmark(
    table: pa.Table,
    vectors: np.ndarray,
    queries: np.ndarray,
    where: SearchFilter | None,
    db_table: Any,
    ann: AnnSettings | None,
    grid: CellGrid | None,
) -> dict[str, float]:
    """p50/p99 latency of the product's query path and its recall@10 against exact search (``table``: index rows,
    in the order the index stores them; ``vectors``: their vectors as one array)."""
    ids = table["image_id"].to_numpy(zero_copy_only=False)
    mask = np.ones(len(vectors), bool)
    if where is not None and where.bbox is not None:
        rows = table
        minx, miny, maxx, maxy = where.bbox
        mask = (
            (rows["max_lon"].to_numpy() >= minx)
            & (rows["min_lon"].to_numpy() <= maxx)
            & (rows["max_lat"].to_numpy() >= miny)
            & (rows["min_lat"].to_numpy() <= maxy)
        )
    candidates = np.flatnonzero(mask)
    started = time.perf_counter()
    nearest(db_table, queries[0], 10, where, ann, grid)
    first_ms = 1000 * (time.perf_counter() - started)
    for query in queries[1:WARMUP_QUERIES]:
        nearest(db_table, query, 10, where, ann, grid)
    latencies, found = [], []
    for query in queries:  # timed back to back; the exact answers are computed afterwards
        started = time.perf_counter()
        hits = nearest(db_table, query, 10, where, ann, grid)
        latencies.append(1000 * (time.perf_counter() - started))
        found.append({h["image_id"] for h in hits})
    recalls = []
    for query, hits in zip(queries, found, strict=True):
        scores = vectors[candidates] @ query
        exact = set(ids[candidates[np.argsort(-scores)[:10]]].tolist())
        recalls.append(len(exact & hits) / max(1, min(10, len(candidates))))
    return {
        "first_query_ms": first_ms,
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "recall_at_10": float(statistics.mean(recalls)),
        "candidates": float(len(candidates)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048, help="RSICD images to embed")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--variants", nargs="+", default=["product"], choices=sorted(VARIANTS))
    parser.add_argument("--out", default=str(RESULTS / "index.json"))
    parser.add_argument("--quick", action="store_true", help="2,048 images, 10⁶ vectors, 100 queries, product only")
    args = parser.parse_args()
    if args.quick:
        args.images, args.sizes, args.queries, args.variants = 2048, [1_000_000], 100, ["product"]
    logging.basicConfig(level=logging.WARNING)
    require(RSICD / "images", "RSICD")
    rng = np.random.default_rng(0)
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint = _checkpoint(work, args.checkpoint)
        images = sorted((RSICD / "images").iterdir())[:: max(1, 10_921 // args.images)][: args.images]
        report["embedding"], real = embedding_throughput(checkpoint, images, work)
        model, config, state = ckpt.load_checkpoint(checkpoint)
        corpus = read_corpus([str(RSICD / "captions" / "vt-rsbs_RSICD.csv")])
        captions = sorted({c for record in corpus.records.values() for c in record.captions})
        picked = [captions[i] for i in rng.choice(len(captions), args.queries, replace=False)]
        tokens = tokenize(picked, config.model.text_model, config.model.max_tokens)
        with torch.no_grad():
            queries = model.encode_text(torch.as_tensor(tokens["input_ids"]), torch.as_tensor(tokens["attention_mask"]))
        queries_np = queries.numpy().astype(np.float32)
        report["search"] = {}
        for size in args.sizes:
            vectors = real_shaped(real, size, rng)
            table = tiles_table(vectors, rng, state["model_version"])
            rows = index_rows(table)
            started = time.perf_counter()
            db_table = lancedb.connect(str(work / f"index-{size}")).create_table("tiles", data=rows)
            meta = publish(str(work / f"index-{size}"), db_table, state["model_version"], checkpoint, {})
            first_build_s = time.perf_counter() - started  # the product's table + its indices, as `index build`
            grid = CellGrid.from_meta(meta)
            stored = rows["vector"].combine_chunks().flatten().to_numpy().reshape(rows.num_rows, -1)  # in index order
            first_tile = table.slice(0, 1)  # the bbox of earlier runs (rows were not in cell order then)
            lon, lat = shapely.from_wkb(first_tile["geometry"][0].as_py()).bounds[:2]
            box = SearchFilter(bbox=(lon - 10, lat - 10, lon + 10, lat + 10))
            report["search"][str(size)] = {}
            # variants with filter indices last: they stay once built
            variants = sorted(args.variants, key=lambda name: VARIANTS[name].filter_indices)
            for name in variants if meta["kind"] != "exact" else ["exact"]:
                ann = VARIANTS.get(name)
                build_s = first_build_s
                if name != "product" and ann is not None:
                    started = time.perf_counter()
                    add_vector_index(db_table, ann)  # replaces the vector index
                    if ann.filter_indices and not ANN.filter_indices:
                        add_filter_indices(db_table)
                    build_s = time.perf_counter() - started
                report["search"][str(size)][name] = {
                    "kind": meta["kind"] if name in ("product", "exact") else ann.index_type.lower(),  # type: ignore[union-attr]
                    "settings": str(ann),
                    "build_s": build_s,
                    "no_filter": search_benchmark(rows, stored, queries_np, None, db_table, ann, grid),
                    "bbox_filter": search_benchmark(rows, stored, queries_np, box, db_table, ann, grid),
                }
    e = report["embedding"]
    print(f"\nEmbedding {int(e['tiles'])} RSICD images (224 px, EfficientNet-Lite0 tower, 2 cores)")
    print(f"  product (Ray Data + actors → GeoParquet) {e['product_tiles_per_s']:.1f} tiles/s; bare tower "
          f"{e['bound_tiles_per_s']:.1f} tiles/s (half the tiles before the product: "
          f"{e['bound_tiles_per_s_before_after'][0]:.1f}, half after: {e['bound_tiles_per_s_before_after'][1]:.1f}); "
          f"bound is {e['bound_over_product']:.2f}× faster")  # fmt: skip
    print(f"  of the product's {e['product_s']:.1f} s, {e['startup_s']:.1f} s went before the first embeddings; "
          f"after that {e['after_startup_tiles_per_s']:.1f} tiles/s "
          f"({e['bound_over_after_startup']:.2f}× from the bound)")  # fmt: skip
    print(f"\n{'vectors':>9} {'variant':>12} {'kind':>11} {'build s':>8} {'filter':>7} {'first ms':>8} {'p50 ms':>7} "
          f"{'p99 ms':>7} {'recall@10':>9}")  # fmt: skip
    for size, variants in report["search"].items():
        for variant, row in variants.items():
            for name in ("no_filter", "bbox_filter"):
                r = row[name]
                cells = f"{int(size):9d} {variant:>12} {row['kind']:>11} {row['build_s']:8.1f} {name.split('_')[0]:>7}"
                print(f"{cells} {r['first_query_ms']:8.1f} {r['p50_ms']:7.1f} {r['p99_ms']:7.1f} "
                      f"{r['recall_at_10']:9.3f}")  # fmt: skip
    print(f"(after {WARMUP_QUERIES} warm-up queries; bbox = 20° × 20° around a scene; product = {ANN})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    largest = report["search"][str(max(args.sizes))]
    row = largest.get("product") or next(iter(largest.values()))
    summary = {
        "embed_vs_bound": e["bound_over_product"],
        "p99_ms": row["no_filter"]["p99_ms"],
        "recall_at_10": row["no_filter"]["recall_at_10"],
        "p99_ms_bbox": row["bbox_filter"]["p99_ms"],
        "recall_at_10_bbox": row["bbox_filter"]["recall_at_10"],
    }
    print(json.dumps({k: round(v, 3) for k, v in summary.items()}))


if __name__ == "__main__":
    main()
