"""Embedding throughput against the bare image tower, and index query latency / recall at 10⁵ and 10⁶ vectors.

1. Embedding: ``rsitr.retrieval.embed.embed_archive`` (Ray Data decode + an actor pool, GeoParquet out) on N
   RSICD images vs the same model's ``encode_image`` over the same images pre-decoded in memory with all cores
   (the bound; half the tiles timed before the product and half after: it moves between runs here).
2. Search: real-shaped vectors — mixtures of the real RSICD image embeddings from step 1 plus small noise, so they
   keep the clusters and anisotropy real embeddings have — with footprints grouped in scenes around the globe,
   written as an embeddings file the way ``rsitr embed`` writes one, built by ``rsitr index build`` in a process of
   its own (its peak resident memory measured), then opened with its model by another process that answers the
   queries as a service replica does (its peak memory measured too). Queried one at a time with real RSICD caption
   embeddings through ``rsitr.retrieval.search.nearest``; recall@10 is against exact search (numpy over the same
   vectors and the same filter), with and without a 20° bbox. ``--variants`` compares ANN settings side by side on
   the same table ("product" is ``rsitr.retrieval.index.ANN``).

Prints tables and writes JSON. Usage: ``python -m benchmarks.index [--images 2048] [--sizes 100000 1000000]
[--variants product ivf_pq32 …] [--config PRESET | --checkpoint RUN]`` (``--checkpoint``: a trained one; default an
untrained model of ``--config``, the CPU default: the tower's cost and the vectors' width are the same, their
shape is not, so pass a trained one for the recall figures). ``--quick``: 256 images, 10⁶ vectors, 100 queries, the
product's settings only. Embedding has a fixed start-up (planning, each actor importing torch and loading the
model) that a few hundred tiles cannot amortise; the rate after start-up is printed beside it. The scratch folder
needs about three times the vectors' size on disk (18 GiB at 10⁶ × 1,536-d). The last line printed is one JSON
object: ``embed_vs_bound`` (the bare tower's tiles/s over the product's), and at the largest size
``index_build_peak_gib``, ``serving_peak_gib``, ``p99_ms``, ``recall_at_10``, ``p99_ms_bbox``, ``recall_at_10_bbox``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely
import torch

from benchmarks.common import RESULTS, RSICD, require
from rsitr.config import DEFAULT_PRESET, load_config
from rsitr.data.preprocess import decode_image, tokenize
from rsitr.ingest import ingest_corpus
from rsitr.io.captions import read_corpus
from rsitr.models import checkpoint as ckpt
from rsitr.models.msa import build_model
from rsitr.retrieval.embed import ROW_GROUP_ROWS, embed_archive
from rsitr.retrieval.index import (
    ANN,
    AnnSettings,
    add_filter_indices,
    add_vector_index,
    open_index,
    read_embeddings,
)
from rsitr.retrieval.index_meta import CellGrid
from rsitr.retrieval.search import Searcher, SearchFilter, nearest
from rsitr.runtime.precision import inference, use_bf16
from rsitr.runtime.raysession import init_ray
from rsitr.train.trainer import fit

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
    "sq_filter_ann": replace(ANN, exact_below=0),  # the product's, a narrow filter searched through the ANN index too
    "ivf_sq_p16": AnnSettings("IVF_SQ", nprobes=16, refine_factor=5),  # the product's before 1,536-d vectors
}
# tiles generated (and exact scores computed) at a time: 0.6 GiB of 1,536-d vectors
CHUNK_ROWS = 100_000


def ingest_images(images: list[Path], work: Path) -> str:
    """The picked RSICD images with their captions and official splits as an ingested dataset; returns it."""
    folder = work / "images"
    folder.mkdir()
    for path in images:
        (folder / path.name).symlink_to(path)
    # RSICD's caption file names every image; the ones not linked here are counted as missing and skipped
    ingest_corpus(str(folder), str(RSICD / "captions" / "vt-rsbs_RSICD.csv"), "bench", str(work / "shards"),
                  split_table=str(RSICD / "rsicd_splits.csv"), workers=1)  # fmt: skip
    return str(work / "shards" / "bench")


def _checkpoint(work: Path, given: str | None, preset: str, data: str, epochs: int) -> str:
    """The checkpoint whose vectors are searched: ``given``, else ``preset`` trained ``epochs`` on ``data`` (so the
    vectors spread as a trained model's do), else (``epochs`` 0) ``preset`` untrained."""
    if given:
        return ckpt.resolve_checkpoint(given)
    config = load_config(preset, [f"train.epochs={epochs}"] if epochs else [])
    if epochs:
        return fit(config, data, str(work / "runs"), evaluate_test=False).best_checkpoint
    torch.manual_seed(0)
    ckpt.save_checkpoint(work / "checkpoint", build_model(config.model), None, config, epoch=0, metrics={})
    return str(work / "checkpoint")


def embedding_throughput(
    checkpoint: str, images: list[Path], data: str, work: Path
) -> tuple[dict[str, Any], np.ndarray]:
    """tiles/s of the product's embedding of ``data`` (the ingested ``images``, into ``work``) vs the bare tower;
    returns the embeddings too."""
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


def tiles_table(vectors: np.ndarray, rng: np.random.Generator, model_version: str, first_id: int = 0) -> pa.Table:
    """Embeddings rows as ``rsitr.retrieval.embed`` writes them: 0.01° tiles in scenes of ~0.5° scattered over the land
    latitudes, dated over two years, a scene's tiles side by side (ingest writes a scene's tiles together); ids
    ``tile-<first_id>`` on."""
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
            "image_id": [f"tile-{i}" for i in range(first_id, first_id + n)],
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1]),
            "geometry": pa.array(shapely.to_wkb(boxes).tolist(), pa.binary()),
            "acquired_at": pa.array(
                [start + timedelta(days=int(d)) for d in rng.integers(730, size=n)], pa.timestamp("us", tz="UTC")
            ),
            "source_uri": [f"s3://archive/scene-{s}.tif" for s in scene],
            "model_version": [model_version] * n,
        }
    )


def write_embeddings(
    work: Path, real: np.ndarray, size: int, rng: np.random.Generator, model_version: str
) -> tuple[Path, Path, np.ndarray]:
    """An embeddings GeoParquet file of ``size`` real-shaped tiles, written a chunk at a time as ``rsitr embed``
    writes one (row groups of ``ROW_GROUP_ROWS``); returns it, the same vectors as raw float32 (for exact search)
    and each tile's footprint bounds."""
    file, raw = work / f"embeddings-{size}.parquet", work / f"vectors-{size}.f32"
    bounds = np.empty((size, 4))
    writer: pq.ParquetWriter | None = None
    with open(raw, "wb") as vectors_out:
        for start in range(0, size, CHUNK_ROWS):
            vectors = real_shaped(real, min(CHUNK_ROWS, size - start), rng)
            table = tiles_table(vectors, rng, model_version, first_id=start)
            writer = writer or pq.ParquetWriter(file, table.schema, compression="zstd")
            writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
            vectors_out.write(vectors.tobytes())
            bounds[start : start + len(table)] = shapely.bounds(shapely.from_wkb(table["geometry"].to_numpy()))
    assert writer is not None
    writer.close()
    return file, raw, bounds


def exact_neighbours(raw: Path, dim: int, queries: np.ndarray, keep: np.ndarray) -> list[set[str]]:
    """The ids of the 10 tiles nearest each query by brute force over the raw vectors (those ``keep`` marks)."""
    rows = len(keep)
    best = np.full((len(queries), 10), -np.inf)
    best_rows = np.zeros((len(queries), 10), np.int64)
    for start in range(0, rows, CHUNK_ROWS):
        stop = min(rows, start + CHUNK_ROWS)
        chunk = np.memmap(raw, np.float32, "r", shape=(rows, dim))[start:stop]
        scores = queries @ chunk.T
        scores[:, ~keep[start:stop]] = -np.inf
        merged = np.concatenate([best, scores], axis=1)
        merged_rows = np.concatenate([best_rows, np.broadcast_to(np.arange(start, stop), scores.shape)], axis=1)
        top = np.argpartition(-merged, 9, axis=1)[:, :10]
        best, best_rows = np.take_along_axis(merged, top, 1), np.take_along_axis(merged_rows, top, 1)
    return [
        {f"tile-{row}" for row, score in zip(r, s, strict=True) if score > -np.inf}
        for r, s in zip(best_rows, best, strict=True)
    ]


def in_bbox(bounds: np.ndarray, where: SearchFilter | None) -> np.ndarray:
    """Which tiles a filter keeps (all without a bbox)."""
    if where is None or where.bbox is None:
        return np.ones(len(bounds), bool)
    minx, miny, maxx, maxy = where.bbox
    return (bounds[:, 2] >= minx) & (bounds[:, 0] <= maxx) & (bounds[:, 3] >= miny) & (bounds[:, 1] <= maxy)


def search_benchmark(
    queries: np.ndarray,
    exact: list[set[str]],
    where: SearchFilter | None,
    db_table: Any,
    ann: AnnSettings | None,
    grid: CellGrid | None,
) -> dict[str, float]:
    """p50/p99 latency of the product's query path and its recall@10 against ``exact`` (each query's true 10)."""
    started = time.perf_counter()
    nearest(db_table, queries[0], 10, where, ann, grid)
    first_ms = 1000 * (time.perf_counter() - started)
    for query in queries[1:]:  # one pass to warm the caches a serving process has warm
        nearest(db_table, query, 10, where, ann, grid)
    latencies, found = [], []
    for query in queries:  # timed back to back; recall is counted afterwards
        started = time.perf_counter()
        hits = nearest(db_table, query, 10, where, ann, grid)
        latencies.append(1000 * (time.perf_counter() - started))
        found.append({h["image_id"] for h in hits})
    recalls = [len(truth & hits) / max(1, len(truth)) for truth, hits in zip(exact, found, strict=True)]
    return {
        "first_query_ms": first_ms,
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "recall_at_10": float(statistics.mean(recalls)),
    }


def peak_memory(command: list[str]) -> dict[str, float]:
    """Wall seconds and peak resident memory (GiB) of ``command``, run in a process of its own."""
    probe = (
        "import resource, subprocess, sys, time; started = time.perf_counter(); "
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
        "print(time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    result = subprocess.run([sys.executable, "-c", probe, *command], check=True, capture_output=True, text=True)
    seconds, peak_kib = result.stdout.split()[-2:]
    return {"seconds": float(seconds), "peak_gib": int(peak_kib) / 2**20}


def answer_queries(index: str, queries_file: str) -> None:
    """What a service replica holds: the index opened with its model, answering text queries with and without a
    bbox (run by :func:`peak_memory` to measure serving's memory)."""
    texts = json.loads(Path(queries_file).read_text())
    searcher = Searcher(index)
    for i, text in enumerate(texts):
        searcher.search(text, 10, SearchFilter(bbox=(-10.0, -10.0, 10.0, 10.0)) if i % 2 else None)


def search_at(
    size: int,
    work: Path,
    real: np.ndarray,
    rng: np.random.Generator,
    checkpoint: str,
    queries: np.ndarray,
    texts: Path,
    variant_names: list[str],
) -> dict[str, Any]:
    """An index of ``size`` real-shaped tiles built by ``rsitr index build`` and served as a replica serves it (each
    in its own process, its peak memory measured), then searched with each ANN variant."""
    _, _, state = ckpt.load_checkpoint(checkpoint)
    file, raw, bounds = write_embeddings(work, real, size, rng, state["model_version"])
    out = work / f"index-{size}"
    rsitr = str(Path(sys.executable).with_name("rsitr"))
    build = peak_memory(
        [rsitr, "index", "build", "--embeddings", str(file), "--out", str(out), "--checkpoint", checkpoint]
    )
    serving = peak_memory(
        [
            sys.executable,
            "-c",
            f"from benchmarks.index import answer_queries; answer_queries({str(out)!r}, {str(texts)!r})",
        ]
    )
    db_table, meta = open_index(str(out))
    grid = CellGrid.from_meta(meta)
    lon, lat = bounds[0, :2]  # a 20° box around the first scene
    box = SearchFilter(bbox=(float(lon) - 10, float(lat) - 10, float(lon) + 10, float(lat) + 10))
    filters = {"no_filter": None, "bbox_filter": box}
    exact = {
        name: exact_neighbours(raw, queries.shape[1], queries, in_bbox(bounds, where))
        for name, where in filters.items()
    }
    result: dict[str, Any] = {
        "vectors_gib": raw.stat().st_size / 2**30,
        "embeddings_file_gib": file.stat().st_size / 2**30,
        "index_build": build,
        "serving": serving,
        "bbox_candidates": int(in_bbox(bounds, box).sum()),
        "variants": {},
    }
    raw.unlink()
    file.unlink()
    # variants with filter indices last: they stay once built
    for name in (
        sorted(variant_names, key=lambda name: VARIANTS[name].filter_indices) if meta["kind"] != "exact" else ["exact"]
    ):
        ann = VARIANTS.get(name)
        build_s = build["seconds"]
        if name != "product" and ann is not None and _built_alike(ann, ANN):
            build_s = 0.0  # the product's index, searched with other settings
        elif name != "product" and ann is not None:
            started = time.perf_counter()
            add_vector_index(db_table, ann)  # replaces the vector index
            if ann.filter_indices and not ANN.filter_indices:
                add_filter_indices(db_table)
            build_s = time.perf_counter() - started
        searched = ann if name != "exact" else None
        result["variants"][name] = {
            "kind": meta["kind"] if name in ("product", "exact") else ann.index_type.lower(),  # type: ignore[union-attr]
            "settings": str(ann),
            "build_s": build_s,
            **{
                key: search_benchmark(queries, exact[key], where, db_table, searched, grid)
                for key, where in filters.items()
            },
        }
    return result


def _built_alike(a: AnnSettings, b: AnnSettings) -> bool:
    return (a.index_type, a.partitions_per_sqrt_rows, a.sub_vectors, a.filter_indices) == (
        b.index_type,
        b.partitions_per_sqrt_rows,
        b.sub_vectors,
        b.filter_indices,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048, help="RSICD images to embed")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--checkpoint", default=None, help="a trained checkpoint (default: --config, untrained)")
    parser.add_argument("--config", default=DEFAULT_PRESET, help="the preset trained when no --checkpoint is given")
    parser.add_argument("--train-epochs", type=int, default=10, help="without --checkpoint (0: untrained)")
    parser.add_argument("--variants", nargs="+", default=["product"], choices=sorted(VARIANTS))
    parser.add_argument("--out", default=str(RESULTS / "index.json"))
    parser.add_argument("--quick", action="store_true", help="256 images, 10⁶ vectors, 100 queries, product only")
    args = parser.parse_args()
    if args.quick:
        args.images, args.sizes, args.queries, args.variants = 256, [1_000_000], 100, ["product"]
    logging.basicConfig(level=logging.WARNING)
    require(RSICD / "images", "RSICD")
    rng = np.random.default_rng(0)
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        images = sorted((RSICD / "images").iterdir())[:: max(1, 10_921 // args.images)][: args.images]
        data = ingest_images(images, work)
        checkpoint = _checkpoint(work, args.checkpoint, args.config, data, args.train_epochs)
        trained = (
            f"trained {args.train_epochs} epochs on the {len(images)} RSICD images"
            if args.train_epochs
            else "untrained"
        )
        report["checkpoint"] = args.checkpoint or f"{args.config}, {trained}"
        report["embedding"], real = embedding_throughput(checkpoint, images, data, work)
        model, config, state = ckpt.load_checkpoint(checkpoint)
        corpus = read_corpus([str(RSICD / "captions" / "vt-rsbs_RSICD.csv")])
        captions = sorted({c for record in corpus.records.values() for c in record.captions})
        picked = [captions[i] for i in rng.choice(len(captions), args.queries, replace=False)]
        tokens = tokenize(picked, config.model.text_model, config.model.max_tokens)
        with torch.no_grad():
            queries = model.encode_text(torch.as_tensor(tokens["input_ids"]), torch.as_tensor(tokens["attention_mask"]))
        queries_np = queries.numpy().astype(np.float32)
        report["search"] = {}
        texts = work / "queries.json"
        texts.write_text(json.dumps(picked))
        for size in args.sizes:
            report["search"][str(size)] = search_at(size, work, real, rng, checkpoint, queries_np, texts, args.variants)
    e = report["embedding"]
    print(f"\nEmbedding {int(e['tiles'])} RSICD images ({report['checkpoint']}, 2 cores)")
    print(f"  product (Ray Data + actors → GeoParquet) {e['product_tiles_per_s']:.1f} tiles/s; bare tower "
          f"{e['bound_tiles_per_s']:.1f} tiles/s (half the tiles before the product: "
          f"{e['bound_tiles_per_s_before_after'][0]:.1f}, half after: {e['bound_tiles_per_s_before_after'][1]:.1f}); "
          f"bound is {e['bound_over_product']:.2f}× faster")  # fmt: skip
    print(f"  of the product's {e['product_s']:.1f} s, {e['startup_s']:.1f} s went before the first embeddings; "
          f"after that {e['after_startup_tiles_per_s']:.1f} tiles/s "
          f"({e['bound_over_after_startup']:.2f}× from the bound)")  # fmt: skip
    print(f"\n{'vectors':>9} {'variant':>12} {'kind':>11} {'build s':>8} {'filter':>7} {'first ms':>8} {'p50 ms':>7} "
          f"{'p99 ms':>7} {'recall@10':>9}")  # fmt: skip
    for size, at_size in report["search"].items():
        for variant, row in at_size["variants"].items():
            for name in ("no_filter", "bbox_filter"):
                r = row[name]
                cells = f"{int(size):9d} {variant:>12} {row['kind']:>11} {row['build_s']:8.1f} {name.split('_')[0]:>7}"
                print(f"{cells} {r['first_query_ms']:8.1f} {r['p50_ms']:7.1f} {r['p99_ms']:7.1f} "
                      f"{r['recall_at_10']:9.3f}")  # fmt: skip
    print(f"(timed on a second pass over the queries; bbox = 20° × 20° around a scene; product = {ANN})")
    print(f"\n{'vectors':>9} {'vectors GiB':>11} {'build s':>8} {'build peak GiB':>14} {'serving peak GiB':>16}")
    for size, at_size in report["search"].items():
        built, served = at_size["index_build"], at_size["serving"]
        print(f"{int(size):9d} {at_size['vectors_gib']:11.2f} {built['seconds']:8.0f} {built['peak_gib']:14.2f} "
              f"{served['peak_gib']:16.2f}")  # fmt: skip
    print(
        "(peak resident memory of `rsitr index build`, and of a process holding the index and its model while it "
        "answers the queries)"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    largest = report["search"][str(max(args.sizes))]
    row = largest["variants"].get("product") or next(iter(largest["variants"].values()))
    summary = {
        "index_build_peak_gib": largest["index_build"]["peak_gib"],
        "serving_peak_gib": largest["serving"]["peak_gib"],
        "embed_vs_bound": e["bound_over_product"],
        "p99_ms": row["no_filter"]["p99_ms"],
        "recall_at_10": row["no_filter"]["recall_at_10"],
        "p99_ms_bbox": row["bbox_filter"]["p99_ms"],
        "recall_at_10_bbox": row["bbox_filter"]["recall_at_10"],
    }
    print(json.dumps({k: round(v, 3) for k, v in summary.items()}))


if __name__ == "__main__":
    main()
