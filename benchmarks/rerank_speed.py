"""The SMR re-rank's cost at evaluation size: the product's reverse ranks (one sort per candidate column) against
the definition computed pair by pair (every query compared with each (query, candidate) pair), side by side.

The matrix has RSICD's test shape (1,093 images × 5,465 captions) with scores rounded to 1/1000 so that exact ties
occur, as RSICD's duplicate captions make them; both ways must give the same orders and scores. Prints a table and
writes JSON; the last line is one JSON object with ``speedup``.

Usage: ``python -m benchmarks.rerank_speed [--images 1093] [--captions 5465] [--k 50] [--weight 2.0] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS
from rsitr.evaluation import rerank


def pairwise_reverse_ranks(sim: torch.Tensor, k: int, weight: float, chunk: int = 256) -> torch.Tensor:
    """Re-ranked top-K order with each reverse rank counted by comparing the whole column with every pair (the
    definition; what the product did before its reverse ranks came from sorted columns)."""
    candidates = sim.topk(k, dim=1).indices
    column_sums = sim.sum(dim=0)
    forward = torch.exp(-rerank.DECAY * (torch.arange(k, dtype=sim.dtype) + 1))
    orders = []
    for start in range(0, sim.shape[0], chunk):
        rows = torch.arange(start, min(start + chunk, sim.shape[0]))
        picked = candidates[rows]
        scores = sim[rows[:, None], picked]
        columns = sim[:, picked.reshape(-1)].view(sim.shape[0], len(rows), k)
        reverse = (columns > scores[None]).sum(dim=0)
        position = reverse.argsort(dim=1, stable=True).argsort(dim=1)
        new = scores / column_sums[picked] + forward[None, :] + weight * forward[position]
        orders.append(picked.gather(1, new.argsort(dim=1, descending=True, stable=True)))
    return torch.cat(orders)


def timed(fn: Any, repeats: int) -> tuple[float, Any]:
    seconds, out = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1093)
    parser.add_argument("--captions", type=int, default=5465)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--weight", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "rerank_speed.json"))
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    sim = (torch.rand(args.images, args.captions, generator=gen) * 1000).round() / 1000
    rows = []
    for direction, matrix in (("image→text", sim), ("text→image", sim.t().contiguous())):
        product_s, (product_order, _) = timed(
            lambda m=matrix: rerank.rerank_topk(m, args.k, reverse_weight=args.weight), args.repeats
        )
        pairwise_s, pairwise_order = timed(
            lambda m=matrix: pairwise_reverse_ranks(m, args.k, args.weight), args.repeats
        )
        if not torch.equal(product_order, pairwise_order):
            raise SystemExit(f"{direction}: the two ways disagree")
        rows.append({"direction": direction, "pairwise_s": pairwise_s, "product_s": product_s})
    total_pairwise = sum(r["pairwise_s"] for r in rows)
    total_product = sum(r["product_s"] for r in rows)
    print(f"SMR re-rank, {args.images} × {args.captions}, top {args.k}, reverse weight {args.weight}, "
          f"median of {args.repeats}, torch threads {torch.get_num_threads()}")  # fmt: skip
    print(f"{'direction':12} {'pair by pair s':>15} {'sorted columns s':>17} {'×':>6}")
    for r in rows:
        ratio = r["pairwise_s"] / r["product_s"]
        print(f"{r['direction']:12} {r['pairwise_s']:15.2f} {r['product_s']:17.2f} {ratio:6.1f}")
    print(f"{'both':12} {total_pairwise:15.2f} {total_product:17.2f} {total_pairwise / total_product:6.1f}")
    report = {"args": vars(args), "rows": rows, "speedup": total_pairwise / total_product}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({"speedup": round(report["speedup"], 2), "product_s": round(total_product, 2)}))


if __name__ == "__main__":
    main()
