"""RSICD retrieval quality of a preset trained on this machine within a wall-clock budget, beside published results.

Ingests RSICD from ``../shared/data/rsicd`` (VT-RSBS captions, official split), trains with Ray Train (best epoch
chosen on val), evaluates test once, and measures on val whether the SMR re-rank helps. Prints the table and
writes JSON.

Usage: ``python benchmarks/quality.py [--config msa-lite2-mpnet] [--budget-minutes 80] [--epochs 20] [key=value …]``

``--ablation`` instead runs the ablation table (``benchmarks/ablation.py``): every row, resumable, results in
``benchmarks/results/ablation.{json,md,png}``; ``--rows`` picks rows by name.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import ablation
import tower_features
from heads import Corpus
from tower_features import extract

from rsitr.config import DEFAULT_PRESET, load_config
from rsitr.evaluation.evaluate import evaluate_checkpoint
from rsitr.evaluation.metrics import METRIC_KEYS
from rsitr.ingest import ingest_corpus
from rsitr.train import fit

ROOT = Path(__file__).resolve().parents[1]
# Published RSICD test mR (see ../shared/data/README.md) and the floor measured here (DESIGN.md)
REFERENCES = {
    "floor as DESIGN.md measured it (frozen features + MLP heads)": 21.56,
    "MSA (ResNet-50 + BERT, GPU, 5 seeds)": 21.44,
    "GaLR": 18.96,
    "PIR": 24.46,
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


def pipeline_runner(data: str, work: Path, budget_minutes: float) -> Any:
    """Ablation rows that train through the product (Ray Train, the frozen-prefix cache): one ``fit`` per seed."""

    def run(row: ablation.Row, seed: int) -> dict[str, Any]:
        config = load_config(row.preset, [*row.overrides, f"train.seed={seed}", f"train.max_minutes={budget_minutes}"])
        started = time.monotonic()
        result = fit(config, data, str(work / "runs"))
        assert result.test is not None
        out: dict[str, Any] = {
            "val": result.val,
            "test": result.test,
            "epoch": len(result.history),
            "wall_s": time.monotonic() - started,
            "config": config.to_dict(),
            "checkpoint": result.best_checkpoint,
        }
        if row.rerank_k:
            out["val_rerank"] = evaluate_checkpoint(result.best_checkpoint, data, "val", row.rerank_k)
            out["test_rerank"] = evaluate_checkpoint(result.best_checkpoint, data, "test", row.rerank_k)
        return out

    return run


def run_ablation(
    data: str, work: Path, results: Path, names: list[str] | None, budget_minutes: float
) -> dict[str, Any]:
    """Every ablation row (or those named), resumable; writes ablation.json, .md and .png under ``results``."""
    rows = [r for r in ablation.ROWS if names is None or r.name in names]
    unknown = set(names or []) - {r.name for r in ablation.ROWS}
    if unknown:
        raise SystemExit(f"unknown ablation rows {sorted(unknown)}; rows: {[r.name for r in ablation.ROWS]}")
    corpus = None
    if any(r.heads is not None for r in rows):  # rows through the product need no tower features (≈ 65 min)
        features = work / "features"
        extract(data, features, tower_features.DEFAULT_IMAGE_TOWERS, tower_features.DEFAULT_TEXT_TOWERS)
        corpus = Corpus(features)
    runner = ablation.Ablation(results, corpus, pipeline_runner(data, work, budget_minutes))
    outcome = runner.run(rows)
    table = ablation.markdown(outcome)
    (results / "ablation.md").write_text(table)
    ablation.bar_chart(outcome, results / "ablation.png", REFERENCES)
    print(table)
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "rsicd"))
    parser.add_argument("--work", default=str(ROOT / ".rsitr" / "quality"))
    parser.add_argument("--config", default=DEFAULT_PRESET)
    parser.add_argument("--budget-minutes", type=float, default=80.0, help="training wall-clock budget")
    parser.add_argument("--epochs", type=int, default=20, help="planned epochs (the LR schedule's length)")
    parser.add_argument("--name", default=None, help="run name (an existing one resumes)")
    parser.add_argument("--rerank-k", type=int, default=None, help="default: the preset's train.rerank_k, else 10")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality.json"))
    parser.add_argument("--ablation", action="store_true", help="run the ablation table instead of one preset")
    parser.add_argument("--rows", nargs="*", default=None, help="ablation rows to run (default: all)")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rsicd, work = Path(args.data), Path(args.work)
    if not (rsicd / "images").is_dir():
        raise SystemExit(f"RSICD is absent at {rsicd} (see ../shared/data/README.md)")

    started = time.monotonic()
    manifest = ingest_rsicd(rsicd, work)
    ingest_s = time.monotonic() - started
    if args.ablation:
        run_ablation(str(work / "data" / "rsicd"), work, Path(args.results), args.rows, args.budget_minutes)
        return
    overrides = [f"train.epochs={args.epochs}", f"train.max_minutes={args.budget_minutes}", *args.overrides]
    config = load_config(args.config, overrides)
    args.rerank_k = args.rerank_k if args.rerank_k is not None else config.train.rerank_k or 10
    started = time.monotonic()
    result = fit(config, str(work / "data" / "rsicd"), str(work / "runs"), name=args.name)
    train_s = time.monotonic() - started
    assert result.test is not None
    val_plain = evaluate_checkpoint(result.best_checkpoint, str(work / "data" / "rsicd"), "val", rerank_k=0)
    val_rerank = evaluate_checkpoint(result.best_checkpoint, str(work / "data" / "rsicd"), "val", args.rerank_k)
    helps = val_rerank["mR"] > val_plain["mR"]
    test_rerank = (
        evaluate_checkpoint(result.best_checkpoint, str(work / "data" / "rsicd"), "test", args.rerank_k)
        if helps
        else None
    )

    report: dict[str, Any] = {
        "config": config.to_dict(),
        "budget_minutes": args.budget_minutes,
        "ingest_s": ingest_s,
        "train_and_test_s": train_s,
        "epochs_run": len(result.history),
        "best_checkpoint": result.best_checkpoint,
        "val": result.val,
        "test": result.test,
        "history": result.history,
        "rerank": {"k": args.rerank_k, "val_plain": val_plain, "val_rerank": val_rerank, "test": test_rerank},
        "references": REFERENCES,
        "rows": manifest["rows"],
    }
    keys = METRIC_KEYS
    print(f"\nRSICD test ({int(result.test['images'])} images, {int(result.test['captions'])} captions)")
    print(f"{'model':52} " + " ".join(f"{k:>7}" for k in keys))
    print(
        f"{'ours: ' + args.config + f' ({len(result.history)} epochs, {train_s / 60:.0f} min)':52} "
        + " ".join(f"{result.test[k]:7.2f}" for k in keys)
    )
    if test_rerank is not None:
        print(f"{'ours + re-rank (helped on val)':52} " + " ".join(f"{test_rerank[k]:7.2f}" for k in keys))
    for name, value in REFERENCES.items():
        print(f"{name:52} " + " ".join(f"{'':>7}" for _ in keys[:-1]) + f" {value:7.2f}")
    print(f"\nre-rank on val (k={args.rerank_k}): mR {val_plain['mR']:.2f} → {val_rerank['mR']:.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
