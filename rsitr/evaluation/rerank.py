"""Similarity-matrix re-weighting re-rank (CMPAGL's SMR, in the published GaLR form).

For a query q (an image for image→text) and its top-K candidates c at forward ranks r = 0..K-1:

    s′(q, c) = s(q, c) / Σ_{q′} s(q′, c) + e^(−0.05 (r + 1)) + 0.7 · e^(−0.05 (r′ + 1))

where the sum runs over every query (the candidate's column of the matrix) and r′ is the candidate's position once
the K candidates are re-sorted by their reverse rank — the rank of q among all queries in the candidate's own
ordering. Text→image is the same on the transposed matrix. Candidates outside the top K keep their order below the
re-ranked ones. K and the reverse term's weight (0.7 above) are settings (``train.rerank_k``,
``train.rerank_reverse_weight``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from rsitr.evaluation.metrics import METRIC_KEYS, retrieval_metrics

DECAY = 0.05
REVERSE_WEIGHT = 0.7
# scores sorted at once when counting reverse ranks (64 MB of float32; the counts take twice that)
COLUMN_BLOCK_CELLS = 1 << 24


def rerank_topk(
    sim: torch.Tensor,
    k: int = 10,
    chunk: int = 256,
    candidates: torch.Tensor | None = None,
    queries: int | None = None,
    reverse_weight: float = REVERSE_WEIGHT,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-ranked top-K candidates of every query (row) of ``sim``.

    Args:
        sim: (queries, candidates) scores over the full collection (the column sums and reverse ranks need it).
        k: candidates re-ranked per query.
        chunk: queries processed at once (bounds memory at ``queries × chunk × k`` booleans).
        candidates: (queries, k') candidate indices to re-rank instead of each row's top k (e.g. from an ANN
            index); their forward ranks come from ``sim``.
        queries: re-rank only the first ``queries`` rows; the others are reference queries that only enter the
            column sums and reverse ranks (a search re-ranks one query against a reference set).
        reverse_weight: the reverse-rank term's weight (GaLR's 0.7; larger trusts the candidates' own rankings more).

    Returns:
        Candidate indices (queries, k) in their new order, and their re-ranked scores s′.
    """
    k = min(k, sim.shape[1])
    if candidates is None:
        candidates = sim.topk(k, dim=1).indices
    else:  # forward ranks are by score, whatever order the candidates came in
        candidates = candidates.gather(1, sim.gather(1, candidates).argsort(dim=1, descending=True, stable=True))
        k = candidates.shape[1]
    column_sums = sim.sum(dim=0)
    forward_bonus = torch.exp(-DECAY * (torch.arange(k, dtype=sim.dtype, device=sim.device) + 1))
    reverse_bonus = reverse_weight * forward_bonus
    ranked = sim.shape[0] if queries is None else queries
    above = _queries_above(sim, candidates[:ranked])
    order_out, score_out = [], []
    for start in range(0, ranked, chunk):
        rows = torch.arange(start, min(start + chunk, ranked), device=sim.device)
        picked = candidates[rows]  # (c, k)
        scores = sim[rows[:, None], picked]  # (c, k)
        reverse = above[rows]  # (c, k): the query's rank in its candidate's column
        reverse_position = reverse.argsort(dim=1, stable=True).argsort(dim=1)
        new = scores / column_sums[picked] + forward_bonus[None, :] + reverse_bonus[reverse_position]
        order = new.argsort(dim=1, descending=True, stable=True)
        order_out.append(picked.gather(1, order))
        score_out.append(new.gather(1, order))
    return torch.cat(order_out), torch.cat(score_out)


def _queries_above(sim: torch.Tensor, picked: torch.Tensor, cells: int = COLUMN_BLOCK_CELLS) -> torch.Tensor:
    """For each (query row, candidate) in ``picked`` (row i of ``picked`` belongs to query i): how many queries score
    strictly above that query in the candidate's column. Each column is sorted once, a block of columns at a time
    (about ``cells`` scores per block), instead of comparing the whole column with every pair."""
    rows, k = picked.shape
    flat = picked.reshape(-1)
    owners = torch.arange(rows, device=sim.device).repeat_interleave(k)
    by_column = flat.argsort(stable=True)
    sorted_columns = flat[by_column]
    columns = sorted_columns.unique_consecutive()
    out = torch.empty_like(flat)
    step = max(1, cells // sim.shape[0])
    for start in range(0, len(columns), step):
        block = columns[start : start + step]
        values = sim[:, block].t().contiguous()  # (block, queries)
        above = sim.shape[0] - torch.searchsorted(values.sort(dim=1).values, values, right=True)
        lo = int(torch.searchsorted(sorted_columns, block[:1]))
        hi = int(torch.searchsorted(sorted_columns, block[-1:], right=True))
        pairs = by_column[lo:hi]
        out[pairs] = above[torch.searchsorted(block, flat[pairs]), owners[pairs]]
    return out.view(rows, k)


def rerank_matrix(
    sim: torch.Tensor, k: int = 10, chunk: int = 256, reverse_weight: float = REVERSE_WEIGHT
) -> torch.Tensor:
    """``sim`` with each row's top-K re-ranked: those K are lifted above every other entry, in their new order.

    Ranking rows of the result gives the re-ranked order; use ``sim.t()`` for the other direction.
    """
    order, scores = rerank_topk(sim, k, chunk, reverse_weight=reverse_weight)
    lift = float(sim.max() - scores.min()) + 1.0 if math.isfinite(float(sim.max())) else 1e9
    out = sim.clone()
    out.scatter_(1, order, scores + lift)
    return out


def reranked_metrics(
    sim: torch.Tensor, caption_image: torch.Tensor | np.ndarray, k: int = 10, reverse_weight: float = REVERSE_WEIGHT
) -> dict[str, float]:
    """R@K and mR after re-ranking: image→text on the rows of ``sim`` (images × captions), text→image on its
    columns."""
    i2t = retrieval_metrics(rerank_matrix(sim, k, reverse_weight=reverse_weight), caption_image)
    t2i = retrieval_metrics(rerank_matrix(sim.t(), k, reverse_weight=reverse_weight).t(), caption_image)
    out = {key: i2t[key] for key in i2t if key.startswith("i2t")}
    out.update({key: t2i[key] for key in t2i if key.startswith("t2i")})
    out["mR"] = float(np.mean([out[key] for key in METRIC_KEYS[:-1]]))
    return out
