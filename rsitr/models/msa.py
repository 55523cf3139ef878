"""MSA: multi-scale image embedding e_v = F(Σ_s W_s s_s), a projected text embedding, and MSCMAT for training."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rsitr.config import ModelConfig
from rsitr.models.backbone import MultiScaleBackbone
from rsitr.models.mscmat import MSCMAT
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


@dataclass
class MSAOutput:
    """What a training step needs from one forward pass."""

    image: torch.Tensor  # (B, D) unit-norm e_v
    text: torch.Tensor  # (B, D) unit-norm e_t
    scales: list[torch.Tensor]  # pooled s_1..s_4, each (B, C_s)
    mscmat: list[torch.Tensor]  # M_s, each (B images, B captions); empty when MSCMAT is off


class MSA(nn.Module):
    """Image and text towers whose L2-normalised embeddings are compared by cosine; MSCMAT for training.

    At test time MSA is a dual encoder (``encode_image`` / ``encode_text``); MSCMAT scores pairs in ``forward``
    (training) only, so archives can be embedded once and indexed. ``use_pairwise_reference`` switches MSCMAT to
    its slow pair-by-pair reference (tests and benchmarks).
    """

    use_pairwise_reference: bool = False

    def __init__(self, config: ModelConfig, pretrained: bool | None = None) -> None:
        super().__init__()
        self.config = config
        self.backbone = MultiScaleBackbone(
            config.image_backbone,
            pretrained=config.image_pretrained if pretrained is None else pretrained,
            stages=tuple(config.image_stages),
            frozen_stages=config.freeze_image_stages,
            weights_file=config.image_weights if pretrained is not False else "",
            gswin_stages=tuple(config.gswin_stages),
            gswin_window=config.gswin_window,
        )
        self.scale_proj = nn.ModuleList(nn.Linear(c, config.embed_dim) for c in self.backbone.channels)
        self.fusion = GatedFusion(config.embed_dim, config.gate_hidden)
        self.text = TextEncoder(
            config.text_model,
            config.text_pooling,
            config.freeze_text_layers,
            pretrained=config.text_pretrained if pretrained is None else pretrained,
        )
        self.text_proj = nn.Linear(self.text.width, config.embed_dim)
        self.mscmat: MSCMAT | None = None
        if config.mscmat:
            self.mscmat = MSCMAT(
                self.backbone.channels,
                self.text.width,
                config.mscmat_dim or self.text.width,
                heads=config.mscmat_heads,
                mask_padding=config.mscmat_mask_padding,
            )

    def _image(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        scales = self.backbone(images)
        summed = torch.stack([proj(s) for proj, s in zip(self.scale_proj, scales, strict=True)]).sum(0)
        return F.normalize(self.fusion(summed), dim=-1), scales

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings from (N, H, W, 3) pixels in 0–255."""
        return self._image(images)[0]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unit-norm caption embeddings."""
        pooled, _ = self.text(input_ids, attention_mask)
        return F.normalize(self.text_proj(pooled), dim=-1)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> MSAOutput:
        """Both embeddings and, with MSCMAT on, the pair scores M_s of this batch (inside forward, for DDP)."""
        image, scales = self._image(images)
        pooled, tokens = self.text(input_ids, attention_mask)
        text = F.normalize(self.text_proj(pooled), dim=-1)
        scores: list[torch.Tensor] = []
        if self.mscmat is not None:
            score = self.mscmat.pairwise_reference if self.use_pairwise_reference else self.mscmat
            scores = score(scales, tokens, attention_mask, pooled)
        return MSAOutput(image, text, scales, scores)


def build_model(config: ModelConfig, pretrained: bool | None = None) -> MSA:
    """The model a config describes; ``pretrained=False`` skips loading weights (for a checkpoint load)."""
    return MSA(config, pretrained=pretrained)
