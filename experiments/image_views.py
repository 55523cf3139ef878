"""Val and test mR of trained runs with each image seen once or averaged over its 4 or 8 flips and turns.

``model.test_views`` (``rsitr.models.msa.dihedral_views``) averages the pooled scales over the views; the embedding
mean (each view through the heads, then averaged) is measured beside it. The runs must share their frozen image
towers (seeds of one frozen-tower preset, such as ``msa-four-towers``): the towers run once per view and batch, and
each run's heads read the result. The towers run in bf16 autocast where the CPU has bf16 hardware (as
``rsitr embed`` does), so "1 view" is measured in the same arithmetic as the others.

Writes JSON (default ``benchmarks/results/image_views.json``) and prints a table. Usage:
``python -m experiments.image_views --data .rsitr/data/rsicd --runs RUN [RUN …] [--rerank K] [--out FILE]``; with
``--rerank K`` each variant is also measured after the SMR re-rank of its top K (``rsitr.evaluation.rerank``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsitr.data.preprocess import decode_image, tokenize
from rsitr.evaluation.metrics import retrieval_metrics_from_embeddings
from rsitr.evaluation.rerank import reranked_metrics
from rsitr.io import shards
from rsitr.models import checkpoint as ckpt
from rsitr.models.msa import MSA, dihedral_views
from rsitr.runtime.precision import inference, use_bf16

Scales = list[torch.Tensor]


def _per_view_scales(model: MSA, rows: list[dict], image_size: int, bf16: bool) -> list[Scales]:
    """Each of the 8 views' pooled scales for every image (views in ``dihedral_views`` order)."""
    batches: list[list[Scales]] = []
    for start in range(0, len(rows), 32):
        pixels = np.stack([decode_image(r["image"], image_size) for r in rows[start : start + 32]])
        with inference(bf16):
            batches.append([[s.float() for s in model.backbone(v)] for v in dihedral_views(torch.as_tensor(pixels), 8)])
    return [[torch.cat([b[view][k] for b in batches]) for k in range(len(batches[0][0]))] for view in range(8)]


def _variants(views: list[Scales]) -> dict[str, Callable[[MSA], torch.Tensor]]:
    def feature_mean(count: int) -> Callable[[MSA], torch.Tensor]:
        return lambda m: m._fuse([torch.stack(s).mean(0) for s in zip(*views[:count], strict=True)])

    def embedding_mean(count: int) -> Callable[[MSA], torch.Tensor]:
        return lambda m: torch.stack([m._fuse(v) for v in views[:count]]).mean(0)

    return {
        "1 view": feature_mean(1),
        "4 views, feature mean": feature_mean(4),
        "8 views, feature mean (model.test_views=8)": feature_mean(8),
        "4 views, embedding mean": embedding_mean(4),
        "8 views, embedding mean": embedding_mean(8),
    }


def summary(scores: list[float]) -> dict[str, Any]:
    """Per-run mR, their mean and sample std (the mean ± sample std over seeds)."""
    std = statistics.stdev(scores) if len(scores) > 1 else 0.0
    return {"per_run": scores, "mean": statistics.fmean(scores), "std": std}


def _mean_recall(images: torch.Tensor, texts: torch.Tensor, owner: np.ndarray, rerank_k: int) -> float:
    images = torch.nn.functional.normalize(images, dim=-1)
    if rerank_k:
        return reranked_metrics(images @ texts.t(), owner, rerank_k)["mR"]
    return retrieval_metrics_from_embeddings(images, texts, owner)["mR"]


@torch.no_grad()
def measure(
    runs: list[str], data: str, splits: tuple[str, ...] = ("val", "test"), rerank_k: int = 0
) -> dict[str, dict]:
    """``{variant: {split: {per_run, mean, std}}}`` for the runs' best checkpoints (with ``rerank_k``, each variant
    again after the SMR re-rank, as ``"<variant> + re-rank k=K"``)."""
    models = [ckpt.load_checkpoint(run)[0] for run in runs]
    config = ckpt.read_meta(runs[0]).config.model
    bf16 = use_bf16("auto", torch.device("cpu"))
    results: dict[str, dict] = {}
    for split in splits:
        rows = list(shards.iter_rows(data, ["image_id", "image", "captions"], split=split))
        captions = [(i, c) for i, r in enumerate(rows) for c in r["captions"]]
        owner = np.asarray([i for i, _ in captions])
        pooled = []
        for start in range(0, len(captions), 256):
            tokens = tokenize([c for _, c in captions[start : start + 256]], config.text_model, config.max_tokens)
            ids, mask = torch.as_tensor(tokens["input_ids"]), torch.as_tensor(tokens["attention_mask"])
            pooled.append(models[0].text(ids, mask)[0])
        texts = [m._project_text(torch.cat(pooled)) for m in models]
        started = time.time()
        views = _per_view_scales(models[0], rows, config.image_size, bf16)
        print(f"{split}: {len(rows)} images × 8 views in {time.time() - started:.0f} s", flush=True)
        for name, embed in _variants(views).items():
            images = [embed(m) for m in models]
            for k in (0, rerank_k) if rerank_k else (0,):
                scores = [_mean_recall(i, t, owner, k) for i, t in zip(images, texts, strict=True)]
                results.setdefault(f"{name} + re-rank k={k}" if k else name, {})[split] = summary(scores)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="an ingested RSICD (rsitr ingest corpus)")
    parser.add_argument("--runs", nargs="+", required=True, help="finished runs or checkpoints of one preset")
    parser.add_argument("--rerank", type=int, default=0, help="also measure each variant after the SMR re-rank of K")
    parser.add_argument("--out", default="benchmarks/results/image_views.json")
    args = parser.parse_args()
    results = measure(args.runs, args.data, rerank_k=args.rerank)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"runs": args.runs, "rerank_k": args.rerank, "results": results}, indent=2))
    print("| views | val mR | test mR |\n|---|---|---|")
    for name, by_split in results.items():
        val, test = by_split["val"], by_split["test"]
        print(f"| {name} | {val['mean']:.2f} ± {val['std']:.2f} | {test['mean']:.2f} ± {test['std']:.2f} |")


if __name__ == "__main__":
    main()
