"""Text tower: any Hugging Face encoder; the default all-MiniLM-L6-v2 comes from a package, no hub needed."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, BertConfig, PretrainedConfig
from transformers.utils import logging as hf_logging

from rsitr.errors import ConfigError, WeightsError
from rsitr.models.naming import JOIN, resolve_text_model, tower_names

# architectures that can be built with no hub at all (their tokenizers: rsitr.models.naming.OFFLINE_VOCABULARIES)
OFFLINE_ARCHITECTURES: dict[str, Callable[[], PretrainedConfig]] = {"bert-base-uncased": BertConfig}


def text_layer_count(name: str) -> int | None:
    """How many transformer layers a text model has (joined towers: the most of any; None when a config cannot be
    read offline)."""
    if JOIN in name:
        counts = [text_layer_count(part) for part in tower_names(name)]
        return None if None in counts else max(c for c in counts if c is not None)
    try:
        return int(_architecture(name).num_hidden_layers)
    except (OSError, ValueError, AttributeError):
        return None


def _architecture(name: str) -> PretrainedConfig:
    if name in OFFLINE_ARCHITECTURES:
        return OFFLINE_ARCHITECTURES[name]()
    return AutoConfig.from_pretrained(resolve_text_model(name))


class TextEncoder(nn.Module):
    """Global caption vector (masked mean or CLS) plus token states with their mask.

    ``frozen_layers`` freezes the embeddings and the first that many transformer layers; ``pretrained=False``
    builds the architecture only (weights then come from a checkpoint).
    """

    def __init__(self, name: str, pooling: str = "mean", frozen_layers: int = 0, pretrained: bool = True) -> None:
        super().__init__()
        if pooling not in {"mean", "cls"}:
            raise ConfigError(f"text pooling {pooling!r}: expected 'mean' or 'cls'")
        hf_logging.disable_progress_bar()
        if pretrained:
            try:
                self.encoder = AutoModel.from_pretrained(resolve_text_model(name))
            except OSError as err:
                raise WeightsError(
                    f"text model {name!r}: weights not reachable ({err.__class__.__name__}); point model.text_model at "
                    "a local folder, or set model.text_pretrained=false to train from random initialisation"
                ) from err
        else:
            self.encoder = AutoModel.from_config(_architecture(name))
        self.pooling = pooling
        self.width: int = int(self.encoder.config.hidden_size)
        pooler = getattr(self.encoder, "pooler", None)
        if pooler is not None:
            # BERT's pooler head is never used (we pool ourselves); trainable unused weights break DDP.
            pooler.requires_grad_(False)
        self.frozen_layers = frozen_layers
        if frozen_layers:
            self.encoder.embeddings.requires_grad_(False)
            for layer in self.encoder.encoder.layer[:frozen_layers]:
                layer.requires_grad_(False)
            relative = getattr(self.encoder.encoder, "relative_attention_bias", None)
            if relative is not None:  # MPNet: frozen layers read it too, so it must not move
                relative.requires_grad_(False)

    def _layers(self) -> nn.ModuleList:
        layers = getattr(getattr(self.encoder, "encoder", None), "layer", None)
        if not isinstance(layers, nn.ModuleList):
            raise ConfigError(f"{type(self.encoder).__name__}: no encoder.layer list to split at")
        return layers

    def _additive_mask(self, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min

    def _run_layers(self, layers: nn.ModuleList, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = self._additive_mask(attention_mask, states.dtype)
        extra = {}
        encoder = self.encoder.encoder
        if hasattr(encoder, "relative_attention_bias"):  # MPNet's relative position bias, shared by every layer
            extra["position_bias"] = encoder.compute_position_bias(states)
        for layer in layers:
            states = _first(layer(states, attention_mask=mask, **extra))
        return states

    def frozen_prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token states after the embeddings and the frozen layers (they never change while training).

        Raises:
            ConfigError: no layer is frozen, or the encoder is not a BERT-style layer stack.
        """
        if not self.frozen_layers:
            raise ConfigError("a frozen text prefix needs model.freeze_text_layers >= 1")
        states = self.encoder.embeddings(input_ids=input_ids)
        return self._run_layers(self._layers()[: self.frozen_layers], states, attention_mask)

    def from_prefix(self, states: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward`'s outputs from :meth:`frozen_prefix`'s states."""
        states = self._run_layers(self._layers()[self.frozen_layers :], states, attention_mask)
        return self.pool(states, attention_mask), states

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.pool(states, attention_mask), states

    def frozen_pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The caption vector of a wholly frozen tower (what the cache stores when nothing above reads tokens)."""
        return self.pool(self.frozen_prefix(input_ids, attention_mask), attention_mask)

    def pool(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The global caption vector from token states: CLS, or the mean over unmasked tokens."""
        if self.pooling == "cls":
            return states[:, 0]
        weights = attention_mask.unsqueeze(-1).to(states.dtype)
        return (states * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class JoinedTextEncoder(nn.Module):
    """Several frozen text towers joined feature-wise: the caption vector is their pooled vectors concatenated.

    Input rows come from :class:`rsitr.models.tokenizers.JoinedTokenizer` (each tower's tokens side by side, equal
    widths). Every tower is wholly frozen, so the only "token state" it hands on is the joined vector itself (one
    token): MSCMAT, which reads a tower's real token states, needs a single tower.
    """

    def __init__(self, name: str, pooling: str = "mean", frozen_layers: int = 0, pretrained: bool = True) -> None:
        super().__init__()
        names = tower_names(name)
        needed = text_layer_count(name)
        if needed is None or frozen_layers < needed:
            raise ConfigError(
                f"model.text_model {name!r} joins towers, which stay frozen: set model.freeze_text_layers to at "
                f"least {needed if needed is not None else 'the deepest tower'}"
            )
        self.parts = [TextEncoder(n, pooling, frozen_layers, pretrained) for n in names]
        self.towers = nn.ModuleList(self.parts)  # registers the parts' weights
        self.width = sum(tower.width for tower in self.parts)

    def _split(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        ids, masks = input_ids.chunk(len(self.towers), dim=1), attention_mask.chunk(len(self.towers), dim=1)
        return list(zip(ids, masks, strict=True))

    def frozen_pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The joined caption vector."""
        parts = self._split(input_ids, attention_mask)
        return torch.cat([tower.frozen_pooled(i, m) for tower, (i, m) in zip(self.parts, parts, strict=True)], 1)

    def frozen_prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The joined vector as a one-token state (every layer is frozen)."""
        return self.frozen_pooled(input_ids, attention_mask).unsqueeze(1)

    def from_prefix(self, states: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward`'s outputs from :meth:`frozen_prefix`'s one-token states."""
        return states[:, 0], states

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.from_prefix(self.frozen_prefix(input_ids, attention_mask), attention_mask[:, :1])

    def pool(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The joined vector of one-token states."""
        return states[:, 0]


def build_text_encoder(
    name: str, pooling: str = "mean", frozen_layers: int = 0, pretrained: bool = True
) -> TextEncoder | JoinedTextEncoder:
    """The text tower a ``model.text_model`` names: one model, or several joined by ``+``."""
    if JOIN in name:
        return JoinedTextEncoder(name, pooling, frozen_layers, pretrained)
    return TextEncoder(name, pooling, frozen_layers, pretrained)


def _first(output: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """A layer's hidden states (older transformers return a tuple, newer the tensor)."""
    return output[0] if isinstance(output, tuple) else output
