"""MSA's losses (and CMPAGL's intra-class term) on a batch where image i and caption i are a matching pair.

L = w_tri·L_tri + w_MSCMA·L_MSCMA + w_CSMMC·L_CSMMC (MSA: 1, 15, 10) [+ w_NCE·InfoNCE + w_intra·L_intra].

Where this differs from the official code on purpose (each reachable by config):
- MSCMAT masks caption padding (``model.mscmat_mask_padding``; the official attention does not).
- L_MSCMA can also take the column (text→image) direction (``loss.mscma_both_directions``; official: rows only).
- InfoNCE and the intra-class term are additions, off unless weighted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rsitr.config import LossConfig
from rsitr.errors import ConfigError


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


def info_nce(sim: torch.Tensor, temperature: float | torch.Tensor = 0.05) -> torch.Tensor:
    """Symmetric InfoNCE (mean of image→text and text→image cross-entropy at ``temperature``)."""
    logits = sim / temperature
    target = torch.arange(sim.shape[0], device=sim.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def mscma_loss(scores: list[torch.Tensor], both_directions: bool = False) -> torch.Tensor:
    """L_MSCMA = Σ_s CE(rows of M_s, diagonal): each image should score its own caption highest.

    The rows' cross-entropy is averaged over the batch (PyTorch's default reduction); the scales are summed.
    ``both_directions`` adds the columns (each caption should score its own image highest).
    """
    target = torch.arange(scores[0].shape[0], device=scores[0].device)
    total = torch.stack([F.cross_entropy(m, target) for m in scores]).sum()
    if both_directions:
        total = total + torch.stack([F.cross_entropy(m.t(), target) for m in scores]).sum()
    return total


def csmmc_loss(scores: list[torch.Tensor], temperature: float = 2.0) -> torch.Tensor:
    """L_CSMMC = Σ_{s<S} KL(P_s ‖ Q): the largest scale teaches the smaller ones.

    P_s and Q are the column softmaxes (over images, for each caption: text→image) of M_s / T and of the detached
    M_S / T. Each KL is mean-reduced over the B² entries.
    """
    if len(scores) < 2:
        return scores[0].sum() * 0.0  # one scale has nobody to teach
    teacher = F.log_softmax(scores[-1].detach() / temperature, dim=0)
    terms = []
    for m in scores[:-1]:
        student = F.log_softmax(m / temperature, dim=0)
        terms.append((student.exp() * (student - teacher)).mean())
    return torch.stack(terms).sum()


def intra_class_loss(sim: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CMPAGL's intra-class distance: mean cosine distance 1 − s(i, k) over image i × caption k pairs of the batch
    that share a class label (k ≠ i; label −1 = unknown, never paired). Zero when no such pair exists.

    CMPAGL published only the idea (a triplet loss "with an added intra-class distance term"); this is our reading.
    """
    same = (labels[:, None] == labels[None, :]) & (labels[:, None] >= 0)
    same &= ~torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    if not same.any():
        return sim.sum() * 0.0
    return (1.0 - sim[same]).mean()


def total_loss(
    sim: torch.Tensor,
    config: LossConfig,
    mscmat: list[torch.Tensor] | None = None,
    labels: torch.Tensor | None = None,
    temperature: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The configured weighted sum and its terms (``loss`` plus one entry per active term).

    Args:
        sim: (B, B) image × caption cosines (B may be the batch gathered from every worker).
        config: weights and parameters.
        mscmat: M_s of the (local) batch, when the model computes MSCMAT.
        labels: class ids aligned with ``sim``'s rows (−1 unknown), for the intra-class term.
        temperature: a learned InfoNCE temperature, used instead of ``config.temperature``.

    Raises:
        ConfigError: every term has weight 0, or a weighted term lacks its input.
    """
    terms: dict[str, torch.Tensor] = {}
    if config.triplet_weight:
        terms["triplet"] = config.triplet_weight * triplet_loss(sim, config.triplet_margin)
    if config.infonce_weight:
        terms["infonce"] = config.infonce_weight * info_nce(
            sim, config.temperature if temperature is None else temperature
        )
    if config.mscma_weight or config.csmmc_weight:
        if not mscmat:
            raise ConfigError("loss config weights MSCMA/CSMMC but the model computes no MSCMAT (model.mscmat=false)")
        if config.mscma_weight:
            terms["mscma"] = config.mscma_weight * mscma_loss(mscmat, config.mscma_both_directions)
        if config.csmmc_weight:
            terms["csmmc"] = config.csmmc_weight * csmmc_loss(mscmat, config.csmmc_temperature)
    if config.intra_class_weight:
        if labels is None:
            raise ConfigError("loss config weights the intra-class term but the batch carries no labels")
        terms["intra"] = config.intra_class_weight * intra_class_loss(sim, labels)
    if not terms:
        raise ConfigError("loss config: every term has weight 0")
    terms["loss"] = torch.stack(list(terms.values())).sum()
    return terms
