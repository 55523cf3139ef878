"""Gswin: CMPAGL's global-local window block over one backbone stage's feature map.

CMPAGL released no code; this follows its description. The map is cut into w × w windows (padded at the
right/bottom edge; padding never attends or is attended to). Then, each with a pre-norm residual:

1. local-window self-attention among the tokens of each window;
2. global-local window cross-attention: every token queries the window summaries of its image (the mean token of
   each window), so each window sees the whole scene at window granularity;
3. an MLP.

The last projection of each residual branch starts at zero, so a Gswin block switched on over a pretrained
backbone begins as the identity and leaves the pretrained features intact until training moves it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _heads_for(channels: int, head_dim: int = 32) -> int:
    return channels // head_dim if channels % head_dim == 0 else 1


class GswinBlock(nn.Module):
    """(B, C, H, W) → (B, C, H, W).

    Args:
        channels: C of the stage.
        window: window side w in feature-map cells.
        heads: attention heads (default: C / 32 when that divides, else 1).
        mlp_ratio: hidden width of the MLP relative to C.
    """

    def __init__(self, channels: int, window: int = 7, heads: int | None = None, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.window = window
        heads = heads or _heads_for(channels)
        self.norm_local = nn.LayerNorm(channels)
        self.local_attn = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.norm_query = nn.LayerNorm(channels)
        self.norm_global = nn.LayerNorm(channels)
        self.global_attn = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(channels)
        hidden = int(channels * mlp_ratio)
        mlp_out = nn.Linear(hidden, channels)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), mlp_out)
        for projection in (self.local_attn.out_proj, self.global_attn.out_proj, mlp_out):
            nn.init.zeros_(projection.weight)
            nn.init.zeros_(projection.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        w = self.window
        pad_h, pad_w = -height % w, -width % w
        grid = F.pad(x, (0, pad_w, 0, pad_h)).permute(0, 2, 3, 1)  # (B, H', W', C)
        rows, cols = (height + pad_h) // w, (width + pad_w) // w
        valid = torch.zeros(height + pad_h, width + pad_w, dtype=torch.bool, device=x.device)
        valid[:height, :width] = True
        # (B·windows, w², C) and the matching validity (windows, w²)
        tokens = grid.reshape(batch, rows, w, cols, w, channels).permute(0, 1, 3, 2, 4, 5)
        tokens = tokens.reshape(batch * rows * cols, w * w, channels)
        valid_windows = valid.reshape(rows, w, cols, w).permute(0, 2, 1, 3).reshape(rows * cols, w * w)
        padding = (~valid_windows).repeat(batch, 1)

        normed = self.norm_local(tokens)
        attended, _ = self.local_attn(normed, normed, normed, key_padding_mask=padding, need_weights=False)
        tokens = tokens + attended

        counts = valid_windows.sum(1).clamp_min(1).to(tokens.dtype)  # (windows,)
        summaries = (tokens * (~padding).unsqueeze(-1)).sum(1) / counts.repeat(batch).unsqueeze(-1)
        summaries = self.norm_global(summaries.view(batch, rows * cols, channels))
        context = summaries.repeat_interleave(rows * cols, dim=0)  # each window sees all of its image's windows
        attended, _ = self.global_attn(self.norm_query(tokens), context, context, need_weights=False)
        tokens = tokens + attended
        tokens = tokens + self.mlp(self.norm_mlp(tokens))

        out = tokens.view(batch, rows, cols, w, w, channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(batch, channels, rows * w, cols * w)[:, :, :height, :width]
