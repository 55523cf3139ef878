"""Retrieval metrics (R@1/5/10 both ways and mR), computed in chunks of images.

Ties count against the query: a candidate that scores *equal* to the best correct one ranks ahead of it, so a
constant (broken) model scores 0 rather than 100.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

KS = (1, 5, 10)
TIES = "against"
METRIC_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mR")


Ranks = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _ranks(
    block: Callable[[int, int], torch.Tensor],
    n_images: int,
    caption_image: torch.Tensor,
    own: torch.Tensor,
    chunk: int,
) -> tuple[Ranks, Ranks]:
    """Per image (its best correct caption) and per caption (its image): how many wrong candidates score higher,
    how many score exactly the same (a caption string two images share ties exactly), and how many correct ones
    share the best correct score."""
    n_captions = caption_image.shape[0]
    i2t = [torch.empty(n_images, dtype=torch.long) for _ in range(3)]
    t2i = [torch.zeros(n_captions, dtype=torch.long) for _ in range(2)]
    for start in range(0, n_images, chunk):
        stop = min(start + chunk, n_images)
        scores = block(start, stop).float()  # (c, n_captions)
        rows = torch.arange(start, stop).unsqueeze(1)
        is_own = caption_image.unsqueeze(0) == rows
        best_own = scores.masked_fill(~is_own, float("-inf")).max(dim=1).values.unsqueeze(1)
        i2t[0][start:stop] = ((scores > best_own) & ~is_own).sum(dim=1)
        i2t[1][start:stop] = ((scores == best_own) & ~is_own).sum(dim=1)
        i2t[2][start:stop] = ((scores == best_own) & is_own).sum(dim=1)
        t2i[0] += ((scores > own.unsqueeze(0)) & ~is_own).sum(dim=0)
        t2i[1] += ((scores == own.unsqueeze(0)) & ~is_own).sum(dim=0)
    return (i2t[0], i2t[1], i2t[2]), (t2i[0], t2i[1], torch.ones(n_captions, dtype=torch.long))


def _recall(ranks: Ranks, k: int, ties: str) -> float:
    """Percent of queries with a correct item in the top ``k``. ``against``: every wrong candidate that ties
    ranks ahead; ``random``: the expectation over a random order of the tied candidates (what a sort that breaks
    ties arbitrarily, as the published RSITR evaluation code does, gives on average)."""
    above, tied, own_tied = ranks
    if ties == "against":
        return 100.0 * float((above + tied < k).float().mean())
    if ties != "random":
        raise ValueError(f"ties {ties!r}: expected 'against' or 'random'")
    # the first correct item lands in the `slots` left after `above`: a miss needs every slot to go to a tied
    # wrong candidate, drawn without replacement from `tied` wrong and `own_tied` correct ones
    slots = (k - above).clamp(min=0)
    miss = torch.ones(above.shape, dtype=torch.float64)
    for j in range(k):
        step = ((tied - j).clamp(min=0) / (tied + own_tied - j).clamp(min=1)).double()
        miss = torch.where(j < slots, miss * step, miss)
    return 100.0 * float((1.0 - miss).mean())


def _summarise(i2t: Ranks, t2i: Ranks, ties: str) -> dict[str, float]:
    out = {f"i2t_r{k}": _recall(i2t, k, ties) for k in KS}
    out.update({f"t2i_r{k}": _recall(t2i, k, ties) for k in KS})
    out["mR"] = float(np.mean([out[key] for key in METRIC_KEYS[:-1]]))
    return out


def retrieval_metrics(
    sim: torch.Tensor | np.ndarray, caption_image: torch.Tensor | np.ndarray, chunk: int = 1024, ties: str = TIES
) -> dict[str, float]:
    """Recall@K in percent from an images × captions score matrix.

    Args:
        sim: (n_images, n_captions) scores.
        caption_image: (n_captions,) index of each caption's image.
        chunk: images per block.
        ties: how exact ties with the correct item count (see :func:`_recall`).
    """
    sim_t = torch.as_tensor(sim)
    cap = torch.as_tensor(caption_image, dtype=torch.long)
    own = sim_t[cap, torch.arange(cap.shape[0])].float()
    return _summarise(*_ranks(lambda a, b: sim_t[a:b], sim_t.shape[0], cap, own, chunk), ties)


def retrieval_metrics_from_embeddings(
    images: torch.Tensor,
    captions: torch.Tensor,
    caption_image: torch.Tensor | np.ndarray,
    chunk: int = 1024,
    ties: str = TIES,
) -> dict[str, float]:
    """Recall@K from image and caption embeddings (cosine = dot product of unit vectors), never holding the
    full score matrix: memory is ``chunk × n_captions``."""
    cap = torch.as_tensor(caption_image, dtype=torch.long)
    own = (images[cap] * captions).sum(dim=1).float()
    return _summarise(*_ranks(lambda a, b: images[a:b] @ captions.t(), images.shape[0], cap, own, chunk), ties)


def chance_metrics(n_images: int, captions_per_image: float) -> dict[str, float]:
    """Expected recall of a random ranking (what a model must beat)."""
    n_captions = n_images * captions_per_image
    out = {}
    for k in KS:
        # i→t: P(at least one of c correct captions in a random top-k of n_captions).
        miss = 1.0
        for j in range(k):
            miss *= max(0.0, (n_captions - captions_per_image - j) / (n_captions - j))
        out[f"i2t_r{k}"] = 100.0 * (1.0 - miss)
        out[f"t2i_r{k}"] = 100.0 * min(1.0, k / n_images)
    out["mR"] = float(np.mean([out[key] for key in METRIC_KEYS[:-1]]))
    return out


def format_metrics(metrics: dict[str, float], title: str) -> str:
    """A one-table text rendering of R@K and mR under ``title``."""
    head = " ".join(f"{k:>8}" for k in METRIC_KEYS)
    row = " ".join(f"{metrics[k]:8.2f}" for k in METRIC_KEYS)
    return f"{title}\n{head}\n{row}"
