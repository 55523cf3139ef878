"""MSA: multi-scale image embedding e_v = F(Σ_s W_s s_s), a projected text embedding, and MSCMAT for training."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from rsitr.config import TEST_VIEW_COUNTS, ModelConfig
from rsitr.errors import ConfigError
from rsitr.models.backbone import build_backbone
from rsitr.models.mscmat import MSCMAT
from rsitr.models.naming import JOIN

if TYPE_CHECKING:
    from rsitr.models.text import JoinedTextEncoder, TextEncoder

WITHOUT_TEXT = "this model was built without its text side (image embedding only): it cannot embed captions"


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


class HeadOutputs:
    """What one set of heads computes from its modules ``scale_proj``, ``fusion``, ``text_proj`` and
    ``log_temperature``: MSA holds the first set itself (under the names single-head checkpoints use), each further
    ensemble member is a :class:`Heads`."""

    scale_proj: nn.ModuleList
    fusion: nn.Module
    text_proj: nn.Module | None  # None in a model built without its text side
    log_temperature: nn.Parameter | None

    def embed_image(self, scales: list[torch.Tensor]) -> torch.Tensor:
        """Unit-norm e_v = F(Σ_s W_s s_s) from the pooled scales."""
        summed = torch.stack([proj(s) for proj, s in zip(self.scale_proj, scales, strict=True)]).sum(0)
        return F.normalize(self.fusion(summed), dim=-1)

    def embed_text(self, pooled: torch.Tensor) -> torch.Tensor:
        """Unit-norm e_t from the pooled caption vector."""
        if self.text_proj is None:
            raise RuntimeError(WITHOUT_TEXT)
        return F.normalize(self.text_proj(pooled), dim=-1)

    def temperature(self) -> torch.Tensor | None:
        """The learned InfoNCE temperature, never below 0.01 (CLIP's floor: logits at most ×100)."""
        return None if self.log_temperature is None else self.log_temperature.exp().clamp_min(0.01)


def head_modules(
    config: ModelConfig, channels: list[int], text_width: int | None
) -> tuple[nn.ModuleList, nn.Module, nn.Module | None, nn.Parameter | None]:
    """One set of heads: W_s per scale, F, the text projection (none without a ``text_width``) and
    (``model.learn_temperature``) a temperature.

    gated: W_s map to the joint space and F is MSA's gated map. mlp: W_s map to a hidden width and F = LayerNorm,
    GELU, dropout, Linear — together a two-layer MLP over all scales at once; the text side gets the same MLP.
    """
    fusion: nn.Module
    if config.fusion == "gated":
        width = config.embed_dim
        fusion = GatedFusion(config.embed_dim, config.gate_hidden)
    elif config.fusion == "mlp":
        width = config.head_hidden
        fusion = mlp_tail(width, config.embed_dim, config.head_dropout)
    else:
        raise ConfigError(f"model.fusion {config.fusion!r}: expected 'gated' or 'mlp'")
    scale_proj = nn.ModuleList(linear_in(c, width, config.standardize) for c in channels)
    text_proj: nn.Module | None = None if text_width is None else linear_in(text_width, width, config.standardize)
    if text_proj is not None and config.fusion == "mlp":
        text_proj = nn.Sequential(text_proj, mlp_tail(width, config.embed_dim, config.head_dropout))
    temperature = nn.Parameter(torch.tensor(math.log(config.initial_temperature))) if config.learn_temperature else None
    return scale_proj, fusion, text_proj, temperature


class Heads(HeadOutputs, nn.Module):
    """A further member of a head ensemble (``model.head_ensemble``)."""

    def __init__(self, config: ModelConfig, channels: list[int], text_width: int | None) -> None:
        super().__init__()
        self.scale_proj, self.fusion, self.text_proj, self.log_temperature = head_modules(config, channels, text_width)


def _joined(units: list[torch.Tensor]) -> torch.Tensor:
    """Members' unit embeddings side by side, scaled by 1/√K: one cosine is then the mean of the members' cosines,
    and an index still stores one unit vector per item."""
    if len(units) == 1:
        return units[0]
    return torch.cat(units, dim=-1) / math.sqrt(len(units))


def dihedral_views(images: torch.Tensor, count: int) -> list[torch.Tensor]:
    """The first ``count`` (1, 4 or 8) dihedral views of (N, H, W, C) images: the images; their two flips and half
    turn; then their quarter turns and transposes. The 4 and the 8 each form a group, so their set of views, and any
    mean over it, is the same for every flip or turn of the input within that group."""
    if count not in TEST_VIEW_COUNTS:
        raise ConfigError(f"test views {count}: expected one of {TEST_VIEW_COUNTS}")
    views = [images]
    if count >= 4:
        views += [images.flip(2), images.flip(1), images.flip(1).flip(2)]
    if count == 8:
        turned = images.transpose(1, 2)
        views += [turned, turned.flip(2), turned.flip(1), turned.flip(1).flip(2)]
    return [view.contiguous() for view in views]


@dataclass
class MSAOutput:
    """What a training step needs from one forward pass."""

    image: torch.Tensor  # (B, D) unit-norm e_v
    text: torch.Tensor  # (B, D) unit-norm e_t
    scales: list[torch.Tensor]  # pooled s_1..s_4, each (B, C_s)
    mscmat: list[torch.Tensor]  # M_s, each (B images, B captions); empty when MSCMAT is off
    temperature: torch.Tensor | None = None  # the learned InfoNCE temperature (model.learn_temperature)
    # each head's (image, text, temperature) of an ensemble (model.head_ensemble), trained with a loss each
    members: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = field(default_factory=list)


class MSA(HeadOutputs, nn.Module):
    """Image and text towers whose L2-normalised embeddings are compared by cosine; MSCMAT for training.

    At test time MSA is a dual encoder (``encode_image`` / ``encode_text``); MSCMAT scores pairs in ``forward``
    (training) only, so archives can be embedded once and indexed. ``use_pairwise_reference`` switches MSCMAT to
    its slow pair-by-pair reference (tests and benchmarks).
    """

    use_pairwise_reference: bool = False

    def __init__(self, config: ModelConfig, pretrained: bool | None = None, text: bool = True) -> None:
        super().__init__()
        self.config = config
        self.backbone = build_backbone(
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
        self.text: TextEncoder | JoinedTextEncoder | None = None
        if text:  # imported here: a model of the image side alone (tile embedding) never imports transformers
            from rsitr.models.text import build_text_encoder

            self.text = build_text_encoder(
                config.text_model,
                config.text_pooling,
                config.freeze_text_layers,
                pretrained=config.text_pretrained if pretrained is None else pretrained,
            )
        text_width = None if self.text is None else self.text.width
        if config.test_views not in TEST_VIEW_COUNTS:
            raise ConfigError(f"model.test_views {config.test_views}: expected one of {TEST_VIEW_COUNTS}")
        if config.head_ensemble < 1:
            raise ConfigError(f"model.head_ensemble {config.head_ensemble}: expected at least 1")
        if config.head_ensemble > 1 and config.mscmat:
            raise ConfigError("model.head_ensemble > 1 and model.mscmat do not combine: MSCMAT's terms have one head")
        # the first set of heads lives on MSA itself, under the names every single-head checkpoint uses
        self.scale_proj, self.fusion, self.text_proj, self.log_temperature = head_modules(
            config, self.backbone.channels, text_width
        )
        self.extra_heads = nn.ModuleList(
            Heads(config, self.backbone.channels, text_width) for _ in range(config.head_ensemble - 1)
        )
        self.mscmat: MSCMAT | None = None
        if config.mscmat and self.text is not None:  # MSCMAT scores image-caption pairs: training only
            if JOIN in config.text_model:
                raise ConfigError("model.mscmat reads one text tower's token states: it needs a single text_model")
            self.mscmat = MSCMAT(
                self.backbone.channels,
                self.text.width,
                config.mscmat_dim or self.text.width,
                heads=config.mscmat_heads,
                mask_padding=config.mscmat_mask_padding,
            )

    def text_tower(self) -> TextEncoder | JoinedTextEncoder:
        """The text tower.

        Raises:
            RuntimeError: the model was built without it (``text=False``).
        """
        if self.text is None:
            raise RuntimeError(WITHOUT_TEXT)
        return self.text

    def _members(self) -> list[HeadOutputs]:
        return [self, *(member for member in self.extra_heads if isinstance(member, Heads))]

    def _fuse(self, scales: list[torch.Tensor]) -> torch.Tensor:
        return _joined([head.embed_image(scales) for head in self._members()])

    def _project_text(self, pooled: torch.Tensor) -> torch.Tensor:
        return _joined([head.embed_text(pooled) for head in self._members()])

    def encode_image_from_prefix(self, feature_map: torch.Tensor, frozen_scales: torch.Tensor) -> torch.Tensor:
        """:meth:`encode_image` from the frozen stages' cached outputs (see ``rsitr.data.frozen_cache``)."""
        return self._fuse(self.backbone.from_prefix(frozen_scales, feature_map))

    def encode_text_from_prefix(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """:meth:`encode_text` from the frozen layers' cached token states."""
        pooled, _ = self.text_tower().from_prefix(states, attention_mask)
        return self._project_text(pooled)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings from (N, H, W, 3) pixels in 0–255; in eval mode with ``model.test_views`` > 1,
        from the pooled scales averaged over that many dihedral views (:func:`dihedral_views`)."""
        if self.training or self.config.test_views == 1:
            return self._fuse(self.backbone(images))
        per_view = [self.backbone(view) for view in dihedral_views(images, self.config.test_views)]
        return self._fuse([torch.stack(scale).mean(0) for scale in zip(*per_view, strict=True)])

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unit-norm caption embeddings."""
        pooled, _ = self.text_tower()(input_ids, attention_mask)
        return self._project_text(pooled)

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
        scales = self.backbone(images) if frozen_scales is None else self.backbone.from_prefix(frozen_scales, images)
        if text_states is not None:
            pooled, tokens = self.text_tower().from_prefix(text_states, attention_mask)
        elif input_ids is not None:
            pooled, tokens = self.text_tower()(input_ids, attention_mask)
        else:
            raise ValueError("forward needs input_ids or text_states")
        members = [(head.embed_image(scales), head.embed_text(pooled), head.temperature()) for head in self._members()]
        scores: list[torch.Tensor] = []
        if self.mscmat is not None:
            score = self.mscmat.pairwise_reference if self.use_pairwise_reference else self.mscmat
            scores = score(scales, tokens, attention_mask, pooled)
        image, text = _joined([m[0] for m in members]), _joined([m[1] for m in members])
        return MSAOutput(image, text, scales, scores, members[0][2], members)


def build_model(config: ModelConfig, pretrained: bool | None = None, text: bool = True) -> MSA:
    """The model a config describes; ``pretrained=False`` skips loading weights (for a checkpoint load);
    ``text=False`` builds the image side alone (backbone and image heads: what embedding tiles needs)."""
    return MSA(config, pretrained=pretrained, text=text)
