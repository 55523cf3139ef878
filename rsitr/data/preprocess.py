"""Decoding and tokenising shared by training (in Ray Data) and inference (embedding, search).

No Ray, and nothing imports torch or transformers until a text is tokenized: a Ray Data task that only decodes
starts in a fraction of a second instead of seconds of imports, beside the actors that are loading the model.
"""

from __future__ import annotations

import io
import zlib
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Encoded bytes → (size, size, 3) uint8 RGB."""
    with Image.open(io.BytesIO(data)) as img:
        rgb = img.convert("RGB")
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
        return np.asarray(rgb, dtype=np.uint8)


def augment_rs(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Remote-sensing augmentation: one of the 8 dihedral transforms (90° rotations × flip)."""
    image = np.rot90(image, k=int(rng.integers(4)))
    if rng.integers(2):
        image = image[:, ::-1]
    return np.ascontiguousarray(image)


def label_id(label: str | None) -> int:
    """A stable non-negative class id for a shard ``label`` (CRC-32), −1 when there is none."""
    return zlib.crc32(label.encode()) & 0x7FFFFFFF if label else -1


def tokenize(
    texts: list[str], text_model: str, max_tokens: int, tokenizer: Any = None, padding: str = "max_length"
) -> dict[str, np.ndarray]:
    """Token ids and attention mask, cut at ``max_tokens`` and padded to it (``padding="longest"``: only to the
    longest text; the masked pooling gives the same vectors for less work); ``tokenizer``: ``text_model``'s, loaded."""
    if tokenizer is None:
        from rsitr.models.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(text_model)
    tokens = tokenizer(texts, padding=padding, truncation=True, max_length=max_tokens, return_tensors="np")
    return {
        "input_ids": tokens["input_ids"].astype(np.int64),
        "attention_mask": tokens["attention_mask"].astype(np.int64),
    }


def decode_images(batch: pa.Table, image_size: int) -> dict[str, Any]:
    """Shard rows → ``image_id`` and ``image`` (uint8 NHWC), no augmentation."""
    return {
        "image_id": np.asarray(batch["image_id"].to_pylist(), dtype=object),
        "image": np.stack([decode_image(d, image_size) for d in batch["image"].to_pylist()]),
    }


def decode_with_paths(batch: pa.Table, image_size: int) -> dict[str, Any]:
    """:func:`decode_images` that keeps each row's shard path (the unit of resumption)."""
    return {**decode_images(batch, image_size), "path": np.asarray(batch["path"].to_pylist(), dtype=object)}


def caption_rows(batch: pa.Table) -> dict[str, Any]:
    """Shard rows → one row per caption: ``caption_id`` (``<image_id>#<n>``), ``caption`` and the shard path."""
    ids, texts, paths = [], [], []
    for image_id, captions, path in zip(
        batch["image_id"].to_pylist(), batch["captions"].to_pylist(), batch["path"].to_pylist(), strict=True
    ):
        for n, caption in enumerate(captions or []):
            ids.append(f"{image_id}#{n}")
            texts.append(caption)
            paths.append(path)
    return {
        "caption_id": np.asarray(ids, dtype=object),
        "caption": np.asarray(texts, dtype=object),
        "path": np.asarray(paths, dtype=object),
    }
