"""Frozen tower features of a whole ingested corpus, for the quality ablation's fast rows.

Each feature set is computed once by the product's own towers (``MultiScaleBackbone.frozen_prefix`` with every
scale frozen, ``TextEncoder`` mean pooling) and saved as ``<name>.npz`` as soon as it is done, so a stopped run
resumes with the sets it had not finished. Captions are encoded once per distinct string.

Usage: ``python benchmarks/tower_features.py --data .rsitr/quality/data/rsicd --out .rsitr/quality/features``
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from rsitr.data.preprocess import decode_image
from rsitr.io import shards
from rsitr.models.backbone import build_backbone
from rsitr.models.msa import dihedral_views
from rsitr.models.naming import JOIN
from rsitr.models.text import TextEncoder
from rsitr.models.tokenizers import load_tokenizer
from rsitr.runtime.precision import inference

LITE_TAPS = ("blocks.2", "blocks.3", "blocks.4", "blocks.5", "blocks.6")


@dataclass(frozen=True)
class ImageTower:
    """A frozen multi-scale image tower (or towers joined by ``+``): backbone, input size and pixel statistics."""

    backbone: str
    size: int
    normalization: str
    # also the pooled scales averaged over the 8 flips and quarter turns (``rsitr.models.msa.dihedral_views``),
    # saved as ``<name>-d8`` from the same backbone passes
    dihedral: bool = False
    bf16: bool = False  # the backbone in bf16 autocast (as ``rsitr embed`` runs on CPUs with bf16 hardware)

    @property
    def name(self) -> str:
        # "+" joins feature sets in a recipe (heads.Corpus), so joined towers are named with "-"
        backbone = self.backbone.replace(JOIN, "-")
        return f"img-{backbone}-{self.size}-{self.normalization}" + ("-bf16" if self.bf16 else "")

    @property
    def outputs(self) -> list[str]:
        """The feature sets one extraction writes."""
        return [self.name, f"{self.name}-d8"] if self.dihedral else [self.name]


@dataclass(frozen=True)
class TextTower:
    """A frozen text tower, mean-pooled."""

    model: str
    max_tokens: int = 32

    @property
    def name(self) -> str:
        return f"txt-{self.model}-{self.max_tokens}"


def read_corpus(data: str) -> tuple[list[str], list[str], list[str | None], list[bytes], list[list[str]]]:
    """Every row of an ingested dataset: ids, splits, labels, encoded images, captions."""
    ids: list[str] = []
    splits: list[str] = []
    labels: list[str | None] = []
    images: list[bytes] = []
    captions: list[list[str]] = []
    for uri in shards.shard_uris(data):
        table = pq.read_table(uri, columns=["image_id", "split", "label", "image", "captions"])
        ids += table["image_id"].to_pylist()
        splits += table["split"].to_pylist()
        labels += table["label"].to_pylist()
        images += table["image"].to_pylist()
        captions += table["captions"].to_pylist()
    return ids, splits, labels, images, captions


@torch.no_grad()
def image_features(tower: ImageTower, images: list[bytes], batch: int = 64) -> list[np.ndarray]:
    """(N, Σ C_s) pooled scales of blocks 2–6 and the 1x1 head, average-pooled, per tower output (see
    :attr:`ImageTower.outputs`)."""
    model = build_backbone(
        tower.backbone,
        frozen_stages=len(LITE_TAPS),
        taps=LITE_TAPS,
        head_features=True,
        pooling="avg",
        normalization=tower.normalization,
    ).eval()
    parts: list[list[np.ndarray]] = [[] for _ in tower.outputs]
    for start in range(0, len(images), batch):
        pixels = torch.as_tensor(np.stack([decode_image(b, tower.size) for b in images[start : start + batch]]))
        views = dihedral_views(pixels, 8) if tower.dihedral else [pixels]
        with inference(tower.bf16):
            pooled = torch.stack([model.frozen_prefix(v)[0].float() for v in views])
        parts[0].append(pooled[0].numpy())  # the tile as it is (the first view is the identity)
        if tower.dihedral:
            parts[1].append(pooled.mean(0).numpy())
    return [np.concatenate(p) for p in parts]


@torch.no_grad()
def text_features(tower: TextTower, texts: list[str], batch: int = 128) -> np.ndarray:
    """(N, width) mean-pooled caption vectors, in the order given (encoded shortest first, for less padding)."""
    encoder = TextEncoder(tower.model, pooling="mean").eval()
    tokenizer = load_tokenizer(tower.model)
    order = np.argsort([len(t) for t in texts])
    out = np.zeros((len(texts), encoder.width), np.float32)
    for start in range(0, len(texts), batch):
        chosen = order[start : start + batch]
        tokens = tokenizer(
            [texts[i] for i in chosen], padding=True, truncation=True, max_length=tower.max_tokens, return_tensors="pt"
        )
        pooled, _ = encoder(tokens["input_ids"], tokens["attention_mask"])
        out[chosen] = pooled.numpy()
    return out


def extract(data: str, out: Path, image_towers: list[ImageTower], text_towers: list[TextTower]) -> dict[str, float]:
    """Compute every missing feature set under ``out``; seconds per set computed now."""
    out.mkdir(parents=True, exist_ok=True)
    ids, splits, labels, images, captions = read_corpus(data)
    distinct = sorted({c for caps in captions for c in caps})
    index = {c: i for i, c in enumerate(distinct)}
    corpus = out / "corpus.json"
    if not corpus.exists():
        tmp = corpus.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "image_id": ids,
                    "split": splits,
                    "label": labels,
                    "captions": distinct,
                    "image_captions": [[index[c] for c in caps] for caps in captions],
                }
            )
        )
        tmp.replace(corpus)
    timings: dict[str, float] = {}
    jobs: list[TextTower | ImageTower] = [*text_towers, *image_towers]
    for tower in jobs:
        names = tower.outputs if isinstance(tower, ImageTower) else [tower.name]
        if all((out / f"{name}.npz").exists() for name in names):
            continue
        started = time.monotonic()
        sets = text_features(tower, distinct) if isinstance(tower, TextTower) else image_features(tower, images)
        seconds = time.monotonic() - started
        for name, values in zip(names, [sets] if isinstance(sets, np.ndarray) else sets, strict=True):
            timings[name] = seconds
            tmp = out / f"{name}.tmp.npz"
            np.savez(tmp, features=values.astype(np.float16), seconds=seconds)
            tmp.replace(out / f"{name}.npz")
            print(f"{name}: {values.shape} in {seconds:.0f} s", flush=True)
    return timings


DEFAULT_IMAGE_TOWERS = [
    ImageTower("efficientnet_lite2", 260, "backbone"),
    ImageTower("efficientnet_lite0", 224, "imagenet"),
    ImageTower("efficientnet_lite0", 224, "backbone"),
    # msa-four-towers' image side as rsitr embed computes it: both towers at 260 px, one view and the 8-view mean
    ImageTower("efficientnet_lite2+efficientnet_lite0", 260, "backbone", dihedral=True, bf16=True),
]
DEFAULT_TEXT_TOWERS = [TextTower("all-mpnet-base-v2"), TextTower("all-MiniLM-L6-v2")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    extract(args.data, Path(args.out), DEFAULT_IMAGE_TOWERS, DEFAULT_TEXT_TOWERS)


if __name__ == "__main__":
    main()
