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
from rsitr.models.backbone import MultiScaleBackbone
from rsitr.models.text import TextEncoder, load_tokenizer

LITE_TAPS = ("blocks.2", "blocks.3", "blocks.4", "blocks.5", "blocks.6")


@dataclass(frozen=True)
class ImageTower:
    """A frozen multi-scale image tower: backbone, input size and pixel statistics."""

    backbone: str
    size: int
    normalization: str
    dihedral: bool = False  # also the mean feature over the 8 flips/90° rotations (test-time views)

    @property
    def name(self) -> str:
        return f"img-{self.backbone}-{self.size}-{self.normalization}" + ("-d8" if self.dihedral else "")


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


def _views(pixels: np.ndarray) -> list[np.ndarray]:
    out = []
    for k in range(4):
        rotated = np.rot90(pixels, k=k, axes=(1, 2))
        out += [rotated, rotated[:, :, ::-1]]
    return [np.ascontiguousarray(v) for v in out]


@torch.no_grad()
def image_features(tower: ImageTower, images: list[bytes], batch: int = 64) -> np.ndarray:
    """(N, Σ C_s) pooled scales of blocks 2–6 and the 1x1 head, average-pooled."""
    model = MultiScaleBackbone(
        tower.backbone,
        taps=LITE_TAPS,
        head_features=True,
        pooling="avg",
        frozen_stages=len(LITE_TAPS),
        normalization=tower.normalization,
    ).eval()
    parts = []
    for start in range(0, len(images), batch):
        pixels = np.stack([decode_image(b, tower.size) for b in images[start : start + batch]])
        views = _views(pixels) if tower.dihedral else [pixels]
        pooled = [model.frozen_prefix(torch.as_tensor(v))[0] for v in views]
        parts.append(torch.stack(pooled).mean(0).numpy().astype(np.float32))
    return np.concatenate(parts)


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
    jobs: list[tuple[str, object]] = [(t.name, t) for t in text_towers] + [(t.name, t) for t in image_towers]
    for name, tower in jobs:
        path = out / f"{name}.npz"
        if path.exists():
            continue
        started = time.monotonic()
        if isinstance(tower, TextTower):
            values = text_features(tower, distinct)
        else:
            assert isinstance(tower, ImageTower)
            values = image_features(tower, images)
        timings[name] = time.monotonic() - started
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, features=values.astype(np.float16), seconds=timings[name])
        tmp.replace(path)
        print(f"{name}: {values.shape} in {timings[name]:.0f} s", flush=True)
    return timings


DEFAULT_IMAGE_TOWERS = [
    ImageTower("efficientnet_lite2", 260, "backbone"),
    ImageTower("efficientnet_lite0", 224, "imagenet"),
    ImageTower("efficientnet_lite0", 224, "backbone"),
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
