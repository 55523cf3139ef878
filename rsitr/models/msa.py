"""MSA as a dual encoder: multi-scale image embedding e_v = F(Σ_s W_s s_s) and a projected text embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rsitr.config import ModelConfig
from rsitr.models.backbone import MultiScaleBackbone
from rsitr.models.text import TextEncoder


class GatedFusion(nn.Module):
    """F(x) = W₃(u ⊙ σ(W₂u)), u = W₁x."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(hidden, hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.w1(x)
        return self.w3(u * torch.sigmoid(self.w2(u)))


class MSA(nn.Module):
    """Image and text towers whose L2-normalised embeddings are compared by cosine."""

    def __init__(self, config: ModelConfig, pretrained: bool | None = None) -> None:
        super().__init__()
        self.config = config
        self.backbone = MultiScaleBackbone(
            config.image_backbone,
            pretrained=config.image_pretrained if pretrained is None else pretrained,
            stages=tuple(config.image_stages),
            frozen_stages=config.freeze_image_stages,
        )
        self.scale_proj = nn.ModuleList(nn.Linear(c, config.embed_dim) for c in self.backbone.channels)
        self.fusion = GatedFusion(config.embed_dim, config.gate_hidden)
        self.text = TextEncoder(
            config.text_model,
            config.text_pooling,
            config.freeze_text_layers,
            pretrained=True if pretrained is None else pretrained,
        )
        self.text_proj = nn.Linear(self.text.width, config.embed_dim)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings from (N, H, W, 3) pixels in 0–255."""
        scales = self.backbone(images)
        summed = torch.stack([proj(s) for proj, s in zip(self.scale_proj, scales, strict=True)]).sum(0)
        return F.normalize(self.fusion(summed), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unit-norm caption embeddings."""
        pooled, _ = self.text(input_ids, attention_mask)
        return F.normalize(self.text_proj(pooled), dim=-1)

    def forward(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(images), self.encode_text(input_ids, attention_mask)


def build_model(config: ModelConfig, pretrained: bool | None = None) -> MSA:
    """The model a config describes; ``pretrained=False`` skips loading weights (for a checkpoint load)."""
    return MSA(config, pretrained=pretrained)
