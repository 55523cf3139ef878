"""Ingest speed and memory beside their bounds, measured in one run.

- scenes: tiles/s of ``ingest_scenes`` over the shared GeoTIFFs vs the bound: the same windows read with rasterio
  (bands + mask) and the kept ones PNG-encoded, in one plain loop;
- corpus: images/s of ``ingest_corpus`` on RSICD vs the bound: every image file read and decoded once;
- 1 vs 2 workers (Ray tasks; the Ray start-up is excluded, the cluster is warmed first);
- peak memory (max RSS) of ingesting ``cog_world.tif`` (36000 × 18000) in a fresh process, beside the RSS of a
  process that only imports the same modules.

Usage: ``python -m benchmarks.ingest [--quick] [--data $RSITR_DATA] [--out benchmarks/results/ingest.json]``
(``--quick``: the corpus with one worker only, well under a minute). The last line printed is one JSON object with
``corpus_vs_bound``: the one-worker corpus ingest's seconds over the bound's.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from PIL import Image

from benchmarks.common import DATA, RESULTS, ROOT
from rsitr.ingest import IMAGE_SUFFIXES, ingest_corpus, ingest_scenes
from rsitr.io.geotiff import TileOptions, plan_scene

TILE = 256
SHARD_MB = 16  # several units per run, so two workers have work to share


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def scene_specs(folder: Path) -> list[str]:
    """Every shared GeoTIFF, plus red/green/blue stacked as one scene."""
    specs = [str(p) for p in sorted(folder.glob("*.tif"))]
    return specs + [",".join(str(folder / f"{band}.tif") for band in ("red", "green", "blue"))]


def scenes_bound(specs: list[str], options: TileOptions) -> int:
    """Read every window (bands + mask) and PNG-encode the kept ones: the work no tiler can avoid."""
    kept = 0
    for spec in specs:
        plan = plan_scene(spec, options)
        files = spec.split(",")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            datasets = [rasterio.open(f) for f in files]
        bands = [(0, b) for b in plan.bands] if len(files) == 1 else [(i, 1) for i in range(len(files))]
        for row, col in plan.windows(options):
            window = rasterio.windows.Window(col, row, options.tile_size, options.tile_size)
            data = np.stack([datasets[i].read(b, window=window) for i, b in bands])
            mask = datasets[0].dataset_mask(window=window)
            valid = (mask > 0).sum() / options.tile_size**2
            if 1.0 - valid > options.max_nodata:
                continue
            with np.errstate(invalid="ignore"):  # NaNs of float scenes: the bound only needs some bytes to encode
                pixels = np.ascontiguousarray(data.transpose(1, 2, 0)).astype(np.uint8)
            Image.fromarray(pixels).save(io.BytesIO(), format="PNG")
            kept += 1
        for ds in datasets:
            ds.close()
    return kept


def corpus_bound(images: Path) -> int:
    """Read and decode every image once (what validating a corpus cannot skip)."""
    count = 0
    for path in sorted(images.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            with Image.open(io.BytesIO(path.read_bytes())) as img:
                np.asarray(img.convert("RGB"))
            count += 1
    return count


def peak_memory(spec: str) -> dict[str, float]:
    """Max RSS (MB) of a fresh process ingesting ``spec``, and of one that only imports the same modules."""
    setup = "import rsitr.ingest, rsitr.io.geotiff as g, pyarrow.parquet"
    work = (
        f"; from rsitr.ingest import ingest_scenes; import tempfile; "
        f"ingest_scenes([{spec!r}], 'world', tempfile.mkdtemp(), g.TileOptions({TILE}), workers=1)"
    )
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the (large) benchmark process
    report = "; print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024)"
    result = {}
    for name, code in (("imports_only_mb", setup + report), ("ingest_mb", setup + work + report)):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
        result[name] = float(out.stdout.strip().splitlines()[-1])
    with rasterio.open(spec) as ds:
        result["decoded_scene_mb"] = ds.width * ds.height * ds.count * np.dtype(ds.dtypes[0]).itemsize / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--out", default=str(RESULTS / "ingest.json"))
    parser.add_argument("--quick", action="store_true", help="the corpus with one worker only")
    args = parser.parse_args()
    data = Path(args.data)
    if not (data / "geotiff").is_dir() or not (data / "rsicd" / "images").is_dir():
        sys.exit(f"benchmark needs the real data at {data} (geotiff/ and rsicd/); it is absent")
    logging.basicConfig(level=logging.ERROR)
    options = TileOptions(TILE)
    specs = scene_specs(data / "geotiff")
    rsicd = data / "rsicd"
    captions = str(rsicd / "captions" / "vt-rsbs_RSICD.csv")
    work = Path(tempfile.mkdtemp(prefix="rsitr-bench-"))

    import ray

    from rsitr.runtime.raysession import init_ray

    init_ray()
    ray.get([ray.remote(lambda: 0).remote() for _ in range(4)])  # warm the workers before timing

    rows: list[dict[str, Any]] = []
    bound_s, kept = (0.0, 0) if args.quick else _timed(lambda: scenes_bound(specs, options))
    for workers in () if args.quick else (1, 2):
        seconds, manifest = _timed(
            partial(
                ingest_scenes, specs, "s", str(work / f"scenes{workers}"), options, workers=workers, shard_mb=SHARD_MB
            )
        )
        assert manifest["rows"] == kept, (manifest["rows"], kept)
        rows.append({"stage": "scenes", "workers": workers, "items": kept, "seconds": seconds, "bound_s": bound_s})
    bound_s, count = _timed(lambda: corpus_bound(rsicd / "images"))
    for workers in (1,) if args.quick else (1, 2):
        seconds, manifest = _timed(
            partial(
                ingest_corpus,
                str(rsicd / "images"),
                captions,
                "c",
                str(work / f"corpus{workers}"),
                workers=workers,
                shard_mb=SHARD_MB,
            )
        )
        assert manifest["rows"] == count
        rows.append({"stage": "corpus", "workers": workers, "items": count, "seconds": seconds, "bound_s": bound_s})
    ray.shutdown()
    for row in rows:
        row["per_s"] = row["items"] / row["seconds"]
        row["bound_per_s"] = row["items"] / row["bound_s"]
        row["x_bound_per_core"] = row["seconds"] * row["workers"] / row["bound_s"]
        single = next(r for r in rows if r["stage"] == row["stage"] and r["workers"] == 1)
        row["speedup_vs_1"] = single["seconds"] / row["seconds"]
    memory = {} if args.quick else peak_memory(str(data / "geotiff" / "cog_world.tif"))

    print(f"{'stage':8} {'workers':>7} {'items':>7} {'items/s':>9} {'bound/s':>9} {'×bound·core':>11} {'speed-up':>9}")
    for r in rows:
        print(
            f"{r['stage']:8} {r['workers']:7d} {r['items']:7d} {r['per_s']:9.1f} {r['bound_per_s']:9.1f} "
            f"{r['x_bound_per_core']:11.2f} {r['speedup_vs_1']:9.2f}"
        )
    if memory:
        print(
            f"cog_world.tif ({memory['decoded_scene_mb']:.0f} MB decoded): peak RSS {memory['ingest_mb']:.0f} MB, "
            f"of which {memory['imports_only_mb']:.0f} MB is the imported libraries"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    host = {"cpus": len(__import__("os").sched_getaffinity(0)), "python": sys.version.split()[0]}
    out.write_text(
        json.dumps({"tile_size": TILE, "shard_mb": SHARD_MB, "host": host, "rows": rows, "memory": memory}, indent=2)
    )
    print(f"wrote {out}")
    corpus = next(r for r in rows if r["stage"] == "corpus" and r["workers"] == 1)
    print(json.dumps({"corpus_vs_bound": round(corpus["x_bound_per_core"], 3)}))


if __name__ == "__main__":
    main()
