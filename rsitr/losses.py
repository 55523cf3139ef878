"""Contrastive losses on a batch's image × caption cosine matrix (row i and column i are a matching pair)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rsitr.config import LossConfig


def triplet_loss(sim: torch.Tensor, margin: float = 0.5) -> torch.Tensor:
    """Bidirectional hinge triplet loss with the hardest in-batch negative, summed over the batch (MSA's L_tri).

    Args:
        sim: (B, B) cosine similarities, images × captions, positives on the diagonal.
        margin: the hinge margin.
    """
    positives = sim.diagonal()
    eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    masked = sim.masked_fill(eye, float("-inf"))
    hardest_caption = masked.max(dim=1).values
    hardest_image = masked.max(dim=0).values
    return (F.relu(margin + hardest_caption - positives) + F.relu(margin + hardest_image - positives)).sum()


def info_nce(sim: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """Symmetric InfoNCE (mean of image→text and text→image cross-entropy at ``temperature``)."""
    logits = sim / temperature
    target = torch.arange(sim.shape[0], device=sim.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def total_loss(sim: torch.Tensor, config: LossConfig) -> dict[str, torch.Tensor]:
    """The configured weighted sum and its terms (``loss`` plus one entry per active term)."""
    terms: dict[str, torch.Tensor] = {}
    if config.triplet_weight:
        terms["triplet"] = config.triplet_weight * triplet_loss(sim, config.triplet_margin)
    if config.infonce_weight:
        terms["infonce"] = config.infonce_weight * info_nce(sim, config.temperature)
    if not terms:
        raise ValueError("loss config: every term has weight 0")
    terms["loss"] = torch.stack(list(terms.values())).sum()
    return terms
