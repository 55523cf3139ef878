"""The SMR re-rank's settings (top K, reverse-rank weight) chosen on val, in the heads analogue of msa-four-towers.

For each seed, the preset's heads analogue (``benchmarks/ablation.py``'s "four towers at 260 px, 8 test views": the
four frozen towers' features from ``tower_features.py``, three heads trained on one view, val and test on 8-view
means) is trained once with its epoch chosen on plain val; then every (K, weight) re-ranks that epoch's val and test
matrices (``rsitr.evaluation.rerank``). Settings are ranked by val mR over the seeds; test is printed beside it.
Each seed's results are saved as they finish (a stopped run resumes).

Usage: ``python benchmarks/rerank_grid.py --features .rsitr/quality/features [--seeds 0 1 2] [--ks 10 20 30 50 100]
[--weights 0.7 1.0 1.5 2.0]`` (≈ 5 min per seed for training, then ≈ 20 s per setting, on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from ablation import FOUR_TOWERS_260, JOINED
from heads import Corpus, encoded, train_heads, with_changes

from rsitr.evaluation.rerank import reranked_metrics

ROOT = Path(__file__).resolve().parents[1]
PRESET_ANALOGUE = with_changes(JOINED, image=FOUR_TOWERS_260, test_image=FOUR_TOWERS_260 + "-d8")


def seed_grid(corpus: Corpus, seed: int, ks: list[int], weights: list[float]) -> dict[str, Any]:
    """One seed: plain val/test mR of the chosen epoch and both after each (K, weight) re-rank."""
    trained = train_heads(corpus, PRESET_ANALOGUE, seed, keep_heads=True)
    out: dict[str, Any] = {"epoch": trained["epoch"], "val": trained["val"]["mR"], "test": trained["test"]["mR"]}
    matrices = {}
    for split in ("val", "test"):
        images, texts, owners = encoded(trained["heads"], corpus, PRESET_ANALOGUE, split)
        matrices[split] = (images @ texts.t(), owners)
    out["reranked"] = {
        f"{k},{weight}": {s: reranked_metrics(m, owners, k, weight)["mR"] for s, (m, owners) in matrices.items()}
        for k in ks
        for weight in weights
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", default=str(ROOT / ".rsitr" / "quality" / "features"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 20, 30, 50, 100])
    parser.add_argument("--weights", type=float, nargs="+", default=[0.7, 1.0, 1.5, 2.0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rerank_grid.json"))
    args = parser.parse_args()
    corpus, out = Corpus(Path(args.features)), Path(args.out)
    report: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    for seed in args.seeds:
        if str(seed) not in report:
            report[str(seed)] = seed_grid(corpus, seed, args.ks, args.weights)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=1) + "\n")
    seeds = [str(s) for s in args.seeds]
    settings = [("plain", lambda r: r)] + [
        (key, lambda r, key=key: r["reranked"][key]) for key in report[seeds[0]]["reranked"]
    ]
    rows = []
    for name, pick in settings:
        val = [pick(report[s])["val"] for s in seeds]
        test = [pick(report[s])["test"] for s in seeds]
        spread = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
        rows.append((statistics.mean(val), spread(val), statistics.mean(test), spread(test), name))
    print(f"\nseeds {', '.join(seeds)}; ranked by val mR")
    print(f"{'top K, weight':>14} {'val mR':>14} {'test mR':>14}")
    for val, val_sd, test, test_sd, name in sorted(rows, reverse=True):
        print(f"{name:>14} {val:7.2f} ± {val_sd:4.2f} {test:7.2f} ± {test_sd:4.2f}")


if __name__ == "__main__":
    main()
