"""MSA: multi-scale image embedding e_v = F(Σ_s W_s s_s), a projected text embedding, and MSCMAT for training."""

from __future__ import annotations

import math
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


def mlp_tail(hidden: int, out_dim: int, dropout: float) -> nn.Sequential:
    """LayerNorm → GELU → Dropout → Linear: the second half of a two-layer MLP whose first layer is elsewhere."""
    return nn.Sequential(nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))


def linear_in(in_dim: int, out_dim: int, standardize: bool) -> nn.Module:
    """Linear, optionally after a feature-wise standardisation (non-affine BatchNorm: running training statistics)."""
    if standardize:
        return nn.Sequential(nn.BatchNorm1d(in_dim, affine=False), nn.Linear(in_dim, out_dim))
    return nn.Linear(in_dim, out_dim)


@dataclass
class MSAOutput:
    """What a training step needs from one forward pass."""

    image: torch.Tensor  # (B, D) unit-norm e_v
    text: torch.Tensor  # (B, D) unit-norm e_t
    scales: list[torch.Tensor]  # pooled s_1..s_4, each (B, C_s)
    mscmat: list[torch.Tensor]  # M_s, each (B images, B captions); empty when MSCMAT is off
    temperature: torch.Tensor | None = None  # the learned InfoNCE temperature (model.learn_temperature)


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
            head_features=config.image_head_features,
            taps=tuple(config.image_taps),
            pooling=config.scale_pooling,
            normalization=config.image_normalization,
        )
        # e_v = F(Σ_s W_s s_s). gated: W_s map to the joint space and F is MSA's gated map. mlp: W_s map to a
        # hidden width and F = LayerNorm, GELU, dropout, Linear — together a two-layer MLP over all scales at once.
        fusion: nn.Module
        if config.fusion == "gated":
            width = config.embed_dim
            fusion = GatedFusion(config.embed_dim, config.gate_hidden)
        elif config.fusion == "mlp":
            width = config.head_hidden
            fusion = mlp_tail(width, config.embed_dim, config.head_dropout)
        else:
            raise ValueError(f"model.fusion {config.fusion!r}: expected 'gated' or 'mlp'")
        self.scale_proj = nn.ModuleList(linear_in(c, width, config.standardize) for c in self.backbone.channels)
        self.fusion = fusion
        self.text = TextEncoder(
            config.text_model,
            config.text_pooling,
            config.freeze_text_layers,
            pretrained=config.text_pretrained if pretrained is None else pretrained,
        )
        text_proj = linear_in(self.text.width, width, config.standardize)
        self.text_proj = (
            text_proj
            if config.fusion == "gated"
            else nn.Sequential(text_proj, mlp_tail(width, config.embed_dim, config.head_dropout))
        )
        self.log_temperature: nn.Parameter | None = None
        if config.learn_temperature:
            self.log_temperature = nn.Parameter(torch.tensor(math.log(config.initial_temperature)))
        self.mscmat: MSCMAT | None = None
        if config.mscmat:
            self.mscmat = MSCMAT(
                self.backbone.channels,
                self.text.width,
                config.mscmat_dim or self.text.width,
                heads=config.mscmat_heads,
                mask_padding=config.mscmat_mask_padding,
            )

    def _fuse(self, scales: list[torch.Tensor]) -> torch.Tensor:
        summed = torch.stack([proj(s) for proj, s in zip(self.scale_proj, scales, strict=True)]).sum(0)
        return F.normalize(self.fusion(summed), dim=-1)

    def _image(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        scales = self.backbone(images)
        return self._fuse(scales), scales

    def encode_image_from_prefix(self, feature_map: torch.Tensor, frozen_scales: torch.Tensor) -> torch.Tensor:
        """:meth:`encode_image` from the frozen stages' cached outputs (see ``rsitr.features``)."""
        return self._fuse(self.backbone.from_prefix(frozen_scales, feature_map))

    def encode_text_from_prefix(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """:meth:`encode_text` from the frozen layers' cached token states."""
        pooled, _ = self.text.from_prefix(states, attention_mask)
        return F.normalize(self.text_proj(pooled), dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings from (N, H, W, 3) pixels in 0–255."""
        return self._image(images)[0]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unit-norm caption embeddings."""
        pooled, _ = self.text(input_ids, attention_mask)
        return F.normalize(self.text_proj(pooled), dim=-1)

    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor,
        frozen_scales: torch.Tensor | None = None,
        text_states: torch.Tensor | None = None,
    ) -> MSAOutput:
        """Both embeddings and, with MSCMAT on, the pair scores M_s of this batch (inside forward, for DDP).

        From a frozen-prefix cache, ``images`` is the feature map the trainable stages read and ``frozen_scales``
        the frozen stages' pooled scales; ``text_states`` replaces ``input_ids`` with the frozen layers' states.
        """
        if frozen_scales is None:
            image, scales = self._image(images)
        else:
            scales = self.backbone.from_prefix(frozen_scales, images)
            image = self._fuse(scales)
        if text_states is not None:
            pooled, tokens = self.text.from_prefix(text_states, attention_mask)
        elif input_ids is not None:
            pooled, tokens = self.text(input_ids, attention_mask)
        else:
            raise ValueError("forward needs input_ids or text_states")
        text = F.normalize(self.text_proj(pooled), dim=-1)
        scores: list[torch.Tensor] = []
        if self.mscmat is not None:
            score = self.mscmat.pairwise_reference if self.use_pairwise_reference else self.mscmat
            scores = score(scales, tokens, attention_mask, pooled)
        # the floor CLIP uses: logits never sharper than ×100
        temperature = None if self.log_temperature is None else self.log_temperature.exp().clamp_min(0.01)
        return MSAOutput(image, text, scales, scores, temperature)


def build_model(config: ModelConfig, pretrained: bool | None = None) -> MSA:
    """The model a config describes; ``pretrained=False`` skips loading weights (for a checkpoint load)."""
    return MSA(config, pretrained=pretrained)
