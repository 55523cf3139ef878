"""Heads trained on frozen tower features in one process: the quality ablation's fast rows.

The towers are frozen, so every row that only trains heads can run from ``tower_features.py``'s saved features in
seconds per epoch instead of through Ray Train. The heads are the product's own (``rsitr.models.msa``: a
standardised linear layer into ``hidden``, then LayerNorm, GELU, dropout, Linear; one per side), trained with the
product's loss (``rsitr.train.losses``), schedule (``rsitr.train.make_scheduler``) and metrics
(``rsitr.evaluation.metrics``): one random caption per image per epoch, best epoch on val, test read once.
"""

from __future__ import annotations

import copy
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

from rsitr.evaluation.metrics import retrieval_metrics_from_embeddings
from rsitr.evaluation.rerank import reranked_metrics
from rsitr.models.msa import linear_in, mlp_tail
from rsitr.train import make_scheduler
from rsitr.train.losses import info_nce, intra_class_loss


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
    # K heads trained side by side, their cosines averaged (see Ensemble)
    ensemble: int = 1
    # the image features val and test read, when not ``image`` (e.g. the 8-view means of the same tower)
    test_image: str = ""
    # > 0: val and test read an exponential moving average of the heads' weights (this decay per step)
    ema: float = 0.0


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


class Ensemble(nn.Module):
    """Independently initialised heads trained side by side; their unit embeddings are concatenated and scaled by
    1/√K, so one cosine equals the mean of the members' cosines (an index stores one vector per item)."""

    def __init__(self, image_dim: int, text_dim: int, recipe: HeadsRecipe) -> None:
        super().__init__()
        self.members = nn.ModuleList(Heads(image_dim, text_dim, recipe) for _ in range(recipe.ensemble))

    def member_outputs(self, image: torch.Tensor, text: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, Any]]:
        return [(*m.encode(image, text), m.log_temperature.exp().clamp_min(0.01)) for m in self.members]

    def encode(self, image: torch.Tensor | None, text: torch.Tensor | None) -> tuple[Any, Any]:
        scale = 1.0 / math.sqrt(len(self.members))
        parts = [m.encode(image, text) for m in self.members]
        return (
            None if image is None else torch.cat([p[0] for p in parts], dim=1) * scale,
            None if text is None else torch.cat([p[1] for p in parts], dim=1) * scale,
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
        """A saved feature set, or several joined by ``+`` (concatenated feature-wise)."""
        if name not in self._cache:
            parts = [np.load(self.root / f"{part}.npz")["features"].astype(np.float32) for part in name.split("+")]
            self._cache[name] = torch.from_numpy(np.concatenate(parts, axis=1))
        return self._cache[name]

    def seconds(self, name: str) -> float:
        """Seconds the feature set(s) took to compute."""
        return sum(float(np.load(self.root / f"{part}.npz")["seconds"]) for part in name.split("+"))

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)


def _multi_positive_nce(sim: torch.Tensor, positive: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where each row may have several positives (log of their summed probability)."""
    logits = sim / temperature
    rows = torch.logsumexp(logits.masked_fill(~positive, float("-inf")), 1) - torch.logsumexp(logits, 1)
    cols = torch.logsumexp(logits.masked_fill(~positive, float("-inf")), 0) - torch.logsumexp(logits, 0)
    return -0.5 * (rows.mean() + cols.mean())


@torch.no_grad()
def encoded(heads: Ensemble, corpus: Corpus, recipe: HeadsRecipe, split: str) -> tuple[Any, Any, np.ndarray]:
    """A split's image and caption embeddings (each image once, each of its captions once) and the image each
    caption belongs to."""
    heads.eval()
    rows = corpus.rows(split)
    owners = np.concatenate([[i] * len(corpus.image_captions[r]) for i, r in enumerate(rows)])
    caption_ids = np.concatenate([corpus.image_captions[r] for r in rows])
    images, _ = heads.encode(corpus.features(recipe.test_image or recipe.image)[rows], None)
    _, texts = heads.encode(None, corpus.features(recipe.text)[caption_ids])
    return images, texts, owners


def evaluate(heads: Ensemble, corpus: Corpus, recipe: HeadsRecipe, split: str, rerank_k: int = 0) -> dict[str, float]:
    """R@K and mR of a split (``rerank_k``: after the SMR re-rank)."""
    images, texts, owners = encoded(heads, corpus, recipe, split)
    if rerank_k:
        return reranked_metrics(images @ texts.t(), owners, rerank_k)
    return retrieval_metrics_from_embeddings(images, texts, owners)


def train_heads(
    corpus: Corpus, recipe: HeadsRecipe, seed: int, rerank_k: int = 0, keep_heads: bool = False
) -> dict[str, Any]:
    """Train one row; the best val epoch's val and test metrics (test read once, for that epoch), and with
    ``rerank_k`` the same epoch's val and test after the SMR re-rank (``keep_heads``: that epoch's heads too, as
    ``heads``)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    image_features, text_features = corpus.features(recipe.image), corpus.features(recipe.text)
    heads = Ensemble(image_features.shape[1], text_features.shape[1], recipe)
    scored = copy.deepcopy(heads) if recipe.ema else heads  # what val and test read
    temperatures = [m.log_temperature for m in heads.members]
    decay = [p for n, p in heads.named_parameters() if not n.endswith("log_temperature")]
    optimizer = torch.optim.AdamW(
        [{"params": decay}, {"params": temperatures, "weight_decay": 0.0}],
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
            same = torch.as_tensor(captions[:, None] == captions[None, :])
            loss = torch.zeros(())
            for image, text, temperature in heads.member_outputs(image_features[chosen], text_features[captions]):
                sim = image @ text.t()
                if recipe.duplicate_aware:
                    loss = loss + _multi_positive_nce(sim, same, temperature)
                else:
                    loss = loss + info_nce(sim, temperature)
                if recipe.intra_class_weight:
                    loss = loss + recipe.intra_class_weight * intra_class_loss(sim, labels[chosen])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if scored is not heads:
                _average_into(scored, heads, recipe.ema)
        val = evaluate(scored, corpus, recipe, "val")
        history.append(round(val["mR"], 2))
        if val["mR"] > best["val"]["mR"]:
            best = {"epoch": epoch + 1, "val": val, "state": {k: v.clone() for k, v in scored.state_dict().items()}}
    scored.load_state_dict(best.pop("state"))
    best["test"] = evaluate(scored, corpus, recipe, "test")
    if rerank_k:
        best["val_rerank"] = evaluate(scored, corpus, recipe, "val", rerank_k)
        best["test_rerank"] = evaluate(scored, corpus, recipe, "test", rerank_k)
    if keep_heads:
        best["heads"] = scored
    best["train_s"] = time.monotonic() - started
    best["val_history"] = history
    best["recipe"] = asdict(recipe)
    best["seed"] = seed
    return best


@torch.no_grad()
def _average_into(average: nn.Module, live: nn.Module, decay: float) -> None:
    """One step of an exponential moving average of ``live``'s weights; buffers (BatchNorm's running statistics,
    already averages) are copied."""
    for mean, weight in zip(average.parameters(), live.parameters(), strict=True):
        mean.lerp_(weight, 1.0 - decay)
    for mean, buffer in zip(average.buffers(), live.buffers(), strict=True):
        mean.copy_(buffer)


def with_changes(recipe: HeadsRecipe, **changes: Any) -> HeadsRecipe:
    """A copy of ``recipe`` with some fields changed."""
    return replace(recipe, **changes)
