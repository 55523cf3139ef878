"""Heads trained on frozen tower features in one process: the quality ablation's fast rows.

The towers are frozen, so every row that only trains heads can run from ``tower_features.py``'s saved features in
seconds per epoch instead of through Ray Train. The heads are the product's own (``rsitr.models.msa``: a
standardised linear layer into ``hidden``, then LayerNorm, GELU, dropout, Linear; one per side), trained with the
product's loss (``rsitr.losses``), schedule (``rsitr.train.make_scheduler``) and metrics (``rsitr.metrics``):
one random caption per image per epoch, best epoch on val, test read once.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rsitr.losses import info_nce, intra_class_loss
from rsitr.metrics import retrieval_metrics_from_embeddings
from rsitr.models.msa import linear_in, mlp_tail
from rsitr.rerank import reranked_metrics
from rsitr.train import make_scheduler


@dataclass(frozen=True)
class HeadsRecipe:
    """What a heads-only row trains: features, head shape and optimisation."""

    image: str = "img-efficientnet_lite0-224-imagenet"
    text: str = "txt-all-MiniLM-L6-v2-32"
    hidden: int = 1024
    embed_dim: int = 512
    dropout: float = 0.5
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_epochs: float = 1.0
    initial_temperature: float = 0.07
    # a caption string that several images share is a positive for each of them (not a false negative)
    duplicate_aware: bool = False
    intra_class_weight: float = 0.0


class Heads(nn.Module):
    """Image and text heads over frozen features, with a learned InfoNCE temperature."""

    def __init__(self, image_dim: int, text_dim: int, recipe: HeadsRecipe) -> None:
        super().__init__()
        self.image = nn.Sequential(
            linear_in(image_dim, recipe.hidden, True), mlp_tail(recipe.hidden, recipe.embed_dim, recipe.dropout)
        )
        self.text = nn.Sequential(
            linear_in(text_dim, recipe.hidden, True), mlp_tail(recipe.hidden, recipe.embed_dim, recipe.dropout)
        )
        self.log_temperature = nn.Parameter(torch.tensor(math.log(recipe.initial_temperature)))

    def encode(self, image: torch.Tensor | None, text: torch.Tensor | None) -> tuple[Any, Any]:
        return (
            None if image is None else F.normalize(self.image(image), dim=-1),
            None if text is None else F.normalize(self.text(text), dim=-1),
        )


class Corpus:
    """Saved features and the corpus layout (``tower_features.py``'s ``corpus.json``)."""

    def __init__(self, root: Path) -> None:
        meta = json.loads((root / "corpus.json").read_text())
        self.root = root
        self.split = np.asarray(meta["split"])
        self.image_captions: list[list[int]] = meta["image_captions"]
        labels = sorted({x for x in meta["label"] if x})
        self.label = np.asarray([labels.index(x) if x else -1 for x in meta["label"]])
        self._cache: dict[str, torch.Tensor] = {}

    def features(self, name: str) -> torch.Tensor:
        if name not in self._cache:
            self._cache[name] = torch.from_numpy(np.load(self.root / f"{name}.npz")["features"].astype(np.float32))
        return self._cache[name]

    def seconds(self, name: str) -> float:
        return float(np.load(self.root / f"{name}.npz")["seconds"])

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)


def _multi_positive_nce(sim: torch.Tensor, positive: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where each row may have several positives (log of their summed probability)."""
    logits = sim / temperature
    rows = torch.logsumexp(logits.masked_fill(~positive, float("-inf")), 1) - torch.logsumexp(logits, 1)
    cols = torch.logsumexp(logits.masked_fill(~positive, float("-inf")), 0) - torch.logsumexp(logits, 0)
    return -0.5 * (rows.mean() + cols.mean())


@torch.no_grad()
def evaluate(heads: Heads, corpus: Corpus, recipe: HeadsRecipe, split: str, rerank_k: int = 0) -> dict[str, float]:
    """R@K and mR of a split: each image once, each of its captions once (``rerank_k``: after the SMR re-rank)."""
    heads.eval()
    rows = corpus.rows(split)
    owners = np.concatenate([[i] * len(corpus.image_captions[r]) for i, r in enumerate(rows)])
    caption_ids = np.concatenate([corpus.image_captions[r] for r in rows])
    images, _ = heads.encode(corpus.features(recipe.image)[rows], None)
    _, texts = heads.encode(None, corpus.features(recipe.text)[caption_ids])
    if rerank_k:
        return reranked_metrics(images @ texts.t(), owners, rerank_k)
    return retrieval_metrics_from_embeddings(images, texts, owners)


def train_heads(corpus: Corpus, recipe: HeadsRecipe, seed: int, rerank_k: int = 0) -> dict[str, Any]:
    """Train one row; the best val epoch's val and test metrics (test read once, for that epoch), and with
    ``rerank_k`` the same epoch's val and test after the SMR re-rank."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    image_features, text_features = corpus.features(recipe.image), corpus.features(recipe.text)
    heads = Heads(image_features.shape[1], text_features.shape[1], recipe)
    decay = [p for n, p in heads.named_parameters() if n != "log_temperature"]
    optimizer = torch.optim.AdamW(
        [{"params": decay}, {"params": [heads.log_temperature], "weight_decay": 0.0}],
        lr=recipe.lr,
        weight_decay=recipe.weight_decay,
    )
    train_rows = corpus.rows("train")
    steps = len(train_rows) // recipe.batch_size
    scheduler = make_scheduler(optimizer, steps * recipe.epochs, int(steps * recipe.warmup_epochs))
    best: dict[str, Any] = {"val": {"mR": -1.0}}
    history = []
    started = time.monotonic()
    labels = torch.as_tensor(corpus.label)
    for epoch in range(recipe.epochs):
        heads.train()
        order = rng.permutation(train_rows)
        for step in range(steps):
            chosen = order[step * recipe.batch_size : (step + 1) * recipe.batch_size]
            captions = np.asarray([rng.choice(corpus.image_captions[r]) for r in chosen])
            image, text = heads.encode(image_features[chosen], text_features[captions])
            sim = image @ text.t()
            temperature = heads.log_temperature.exp().clamp_min(0.01)
            if recipe.duplicate_aware:
                same = torch.as_tensor(captions[:, None] == captions[None, :])
                loss = _multi_positive_nce(sim, same, temperature)
            else:
                loss = info_nce(sim, temperature)
            if recipe.intra_class_weight:
                loss = loss + recipe.intra_class_weight * intra_class_loss(sim, labels[chosen])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        val = evaluate(heads, corpus, recipe, "val")
        history.append(round(val["mR"], 2))
        if val["mR"] > best["val"]["mR"]:
            best = {"epoch": epoch + 1, "val": val, "state": {k: v.clone() for k, v in heads.state_dict().items()}}
    heads.load_state_dict(best.pop("state"))
    best["test"] = evaluate(heads, corpus, recipe, "test")
    if rerank_k:
        best["val_rerank"] = evaluate(heads, corpus, recipe, "val", rerank_k)
        best["test_rerank"] = evaluate(heads, corpus, recipe, "test", rerank_k)
    best["train_s"] = time.monotonic() - started
    best["val_history"] = history
    best["recipe"] = asdict(recipe)
    best["seed"] = seed
    return best


def with_changes(recipe: HeadsRecipe, **changes: Any) -> HeadsRecipe:
    """A copy of ``recipe`` with some fields changed."""
    return replace(recipe, **changes)
