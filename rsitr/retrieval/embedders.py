"""The embedding actors of :mod:`rsitr.retrieval.embed`: one model per actor, batches in, unit vectors out.

Apart from the rest of ``embed`` so that an actor imports what it runs and no more: an image actor builds the image
side alone, and neither imports Ray Data's pipelines, the tokenizers or (for images) transformers. Those imports
were ~1 CPU-second per actor, paid before the first embeddings (2 actors on 2 cores).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rsitr.data.preprocess import tokenize
from rsitr.models import checkpoint as ckpt
from rsitr.runtime.precision import inference, unit_float32, use_bf16

if TYPE_CHECKING:
    from rsitr.models.msa import MSA


def _load_model(checkpoint: str, test_views: int | None = None, text: bool = True) -> tuple[MSA, Any, torch.device]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(1)  # one actor per core: threads inside an actor would only contend
    model, config, _ = ckpt.load_checkpoint(checkpoint, map_location=device, test_views=test_views, text=text)
    return model, config, device


class ImageEmbedder:
    """Holds one model's image side per actor; turns decoded image batches into embeddings."""

    def __init__(self, checkpoint: str, precision: str = "auto", test_views: int | None = None) -> None:
        self.model, _, self.device = _load_model(checkpoint, test_views, text=False)
        self.bf16 = use_bf16(precision, self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with inference(self.bf16):
            vectors = self.model.encode_image(torch.as_tensor(batch["image"]).to(self.device))
        return {"key": batch["image_id"], "path": batch["path"], "embedding": unit_float32(vectors).cpu().numpy()}


class CaptionEmbedder:
    """Holds one model per actor; tokenizes and embeds caption batches."""

    def __init__(self, checkpoint: str, precision: str = "auto") -> None:
        self.model, self.config, self.device = _load_model(checkpoint)
        self.bf16 = use_bf16(precision, self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tokens = tokenize(
            [str(c) for c in batch["caption"]], self.config.model.text_model, self.config.model.max_tokens
        )
        with inference(self.bf16):
            vectors = self.model.encode_text(
                torch.as_tensor(tokens["input_ids"]).to(self.device),
                torch.as_tensor(tokens["attention_mask"]).to(self.device),
            )
        return {"key": batch["caption_id"], "path": batch["path"], "embedding": unit_float32(vectors).cpu().numpy()}
