"""MSCMAT: multi-scale cross-modal attention scores for every image × caption pair of a batch (training only).

For scale s, the image query q_i = W'_s s_s(i) attends over the token states T_j of caption j (multi-head):

    m_s(i, j) = σ( w_sᵀ [ (CA_s(q_i; T_j) + ĉ_j) ⊙ q_i ] + b_s )

with ĉ_j the L2-normalised global feature of caption j. ``forward`` computes all B × B pairs at once: the keys and
values of each caption are projected once per scale (not once per pair), and one batched attention covers every
pair, with the captions' padding masked. ``pairwise_reference`` loops over the pairs one at a time, projecting
K/V for each pair, exactly as the method is described (and as the official code runs); it exists for the tests and
the benchmark.

Deliberate difference from the official code, reachable by config: the official attention has no padding mask,
so [PAD] tokens take part in every softmax; ``mask_padding=False`` restores that.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from rsitr.errors import ConfigError


class ScaleAttention(nn.Module):
    """CA_s and the scoring head of one scale."""

    def __init__(self, image_channels: int, text_width: int, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"MSCMAT width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.query_in = nn.Linear(image_channels, dim)  # W'_s
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(text_width, dim)
        self.v = nn.Linear(text_width, dim)
        self.out = nn.Linear(dim, dim)
        self.score = nn.Linear(dim, 1)  # w_s, b_s


class MSCMAT(nn.Module):
    """Pairwise attention scores M_s ∈ (0, 1)^{B×B}, one matrix per scale.

    Args:
        image_channels: channels of each pooled scale vector s_s.
        text_width: width of the caption token states.
        dim: attention width (the paper: 768 with 12 heads). When it differs from ``text_width`` the global
            caption feature ĉ_j is mapped to it by a learned linear layer.
        heads: attention heads.
        mask_padding: mask the captions' padding tokens (``False``: the official behaviour).
    """

    def __init__(
        self, image_channels: list[int], text_width: int, dim: int, heads: int = 12, mask_padding: bool = True
    ) -> None:
        super().__init__()
        self.scales = nn.ModuleList(ScaleAttention(c, text_width, dim, heads) for c in image_channels)
        self.global_in: nn.Module = nn.Identity() if dim == text_width else nn.Linear(text_width, dim)
        self.mask_padding = mask_padding

    def _per_scale(self) -> list[ScaleAttention]:
        return [cast(ScaleAttention, scale) for scale in self.scales]

    def _global(self, text_global: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.global_in(text_global), dim=-1)

    def forward(
        self,
        image_scales: list[torch.Tensor],
        tokens: torch.Tensor,
        attention_mask: torch.Tensor,
        text_global: torch.Tensor,
    ) -> list[torch.Tensor]:
        """M_s for every scale, each (B_images, B_captions).

        Args:
            image_scales: pooled scale vectors, each (B_i, C_s).
            tokens: caption token states (B_j, L, text_width).
            attention_mask: (B_j, L), 1 for real tokens.
            text_global: global caption features (B_j, text_width), normalised here to ĉ_j.
        """
        c_hat = self._global(text_global)  # (J, D)
        masked = attention_mask == 0
        scores = []
        for scale, s in zip(self._per_scale(), image_scales, strict=True):
            heads = scale.heads
            query = scale.query_in(s)  # q_i: (I, D)
            n_i, dim = query.shape
            n_j, length, _ = tokens.shape
            head_dim = dim // heads
            q = scale.q(query).view(n_i, heads, head_dim)
            k = scale.k(tokens).view(n_j, length, heads, head_dim)  # once per caption, not per pair
            v = scale.v(tokens).view(n_j, length, heads, head_dim)
            logits = torch.einsum("ihd,jlhd->ijhl", q, k) / head_dim**0.5  # every pair in one product
            if self.mask_padding:
                logits = logits.masked_fill(masked[None, :, None, :], float("-inf"))
            weights = logits.softmax(dim=-1)
            attended = torch.einsum("ijhl,jlhd->ijhd", weights, v).reshape(n_i, n_j, dim)
            fused = (scale.out(attended) + c_hat[None, :, :]) * query[:, None, :]
            scores.append(torch.sigmoid(scale.score(fused).squeeze(-1)))
        return scores

    def pairwise_reference(
        self,
        image_scales: list[torch.Tensor],
        tokens: torch.Tensor,
        attention_mask: torch.Tensor,
        text_global: torch.Tensor,
    ) -> list[torch.Tensor]:
        """The same scores computed one pair at a time, K/V projected anew for each pair (slow; tests, benchmark)."""
        c_hat = self._global(text_global)
        scores = []
        for scale, s in zip(self._per_scale(), image_scales, strict=True):
            rows = []
            for i in range(s.shape[0]):
                query = scale.query_in(s[i])  # (D,)
                dim = query.shape[0]
                head_dim = dim // scale.heads
                row = []
                for j in range(tokens.shape[0]):
                    keep = attention_mask[j].bool() if self.mask_padding else torch.ones_like(attention_mask[j]).bool()
                    caption = tokens[j][keep]  # (L_j, width)
                    q = scale.q(query).view(scale.heads, 1, head_dim)
                    k = scale.k(caption).view(-1, scale.heads, head_dim).transpose(0, 1)
                    v = scale.v(caption).view(-1, scale.heads, head_dim).transpose(0, 1)
                    weights = (q @ k.transpose(1, 2) / head_dim**0.5).softmax(dim=-1)
                    attended = (weights @ v).reshape(dim)
                    fused = (scale.out(attended) + c_hat[j]) * query
                    row.append(torch.sigmoid(scale.score(fused)).squeeze(-1))
                rows.append(torch.stack(row))
            scores.append(torch.stack(rows))
        return scores
