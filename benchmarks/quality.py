"""RSICD retrieval quality of a preset trained through the product, beside the floor and published results.

Ingests RSICD (VT-RSBS captions, the official split) from ``$RSITR_DATA/rsicd``, trains with Ray Train exactly as
``rsitr train`` does (the epoch chosen on val), reads test once, prints a table and writes one JSON file per
(preset, seed) to ``benchmarks/results/product-<preset>-seed<seed>.json``; ``docs/results.md`` is generated from
those files (``python -m benchmarks.report``).

Usage: ``python -m benchmarks.quality [--config msa-four-towers] [--seed 0] [--budget-minutes 60] [key=value …]``
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, ROOT, RSICD, require, write_result
from rsitr.config import DEFAULT_PRESET, load_config
from rsitr.evaluation.metrics import METRIC_KEYS
from rsitr.ingest import ingest_corpus
from rsitr.train.trainer import fit

# RSICD test mR: our floor (frozen Lite0 + MiniLM features, MLP heads; 3 seeds) and published results of methods
# that start from ImageNet weights
REFERENCES = {
    "floor: frozen Lite0 + MiniLM, MLP heads": 19.85,
    "MSA (ResNet-50 + BERT, GPU)": 21.44,
    "GaLR": 18.96,
    "PIR": 24.46,
    "Multilanguage Transformer": 27.42,
    "MTGFE": 30.68,
}


def ingest_rsicd(rsicd: Path, work: Path) -> dict[str, Any]:
    """RSICD (VT-RSBS captions, official split) as shards under ``work/data/rsicd`` (a finished ingest is kept)."""
    return ingest_corpus(
        str(rsicd / "images"),
        str(rsicd / "captions" / "vt-rsbs_RSICD.csv"),
        "rsicd",
        str(work / "data"),
        split_table=str(rsicd / "rsicd_splits.csv"),
        workers=1,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(RSICD), help="RSICD's folder (images/, captions/, rsicd_splits.csv)")
    parser.add_argument("--work", default=str(ROOT / ".rsitr" / "quality"), help="shards, caches and runs")
    parser.add_argument("--config", default=DEFAULT_PRESET)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-minutes", type=float, default=60.0, help="training wall-clock budget")
    parser.add_argument("--name", default=None, help="run name (an existing one resumes)")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/product-<config>-seed<seed>.json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rsicd, work = require(Path(args.data), "RSICD"), Path(args.work)

    started = time.monotonic()
    manifest = ingest_rsicd(rsicd, work)
    ingest_s = time.monotonic() - started
    overrides = [f"train.seed={args.seed}", f"train.max_minutes={args.budget_minutes}", *args.overrides]
    config = load_config(args.config, overrides)
    started = time.monotonic()
    result = fit(config, str(work / "data" / "rsicd"), str(work / "runs"), name=args.name)
    assert result.test is not None
    report: dict[str, Any] = {
        "preset": args.config,
        "seed": args.seed,
        "overrides": args.overrides,
        "rows": manifest["rows"],
        "ingest_s": ingest_s,
        "fit_s": time.monotonic() - started,
        "val_1view_selection": result.val,
        "test": result.test,
        "history": result.history,
        "checkpoint": result.best_checkpoint,
        "config": config.to_dict(),
    }
    print(f"\nRSICD test ({int(result.test['images'])} images, {int(result.test['captions'])} captions)")
    print(f"{'model':44} " + " ".join(f"{k:>7}" for k in METRIC_KEYS))
    print(f"{f'{args.config}, seed {args.seed}':44} " + " ".join(f"{result.test[k]:7.2f}" for k in METRIC_KEYS))
    for name, value in REFERENCES.items():
        print(f"{name:44} " + " ".join(f"{'':>7}" for _ in METRIC_KEYS[:-1]) + f" {value:7.2f}")
    write_result(args.out or RESULTS / f"product-{args.config}-seed{args.seed}.json", report)


if __name__ == "__main__":
    main()
