"""Rows of the frozen-prefix cache (:mod:`rsitr.data.frozen_cache`) turned into training and evaluation batches.

numpy and pyarrow only: Ray Data's tasks import this module when their worker process first runs one, and importing
the model libraries there took seconds each time.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rsitr.data.preprocess import label_id


def feature_maps(batch: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """The rows' cached feature maps and frozen scales, as float32."""
    shape = tuple(batch["map_shape"][0].as_py())
    maps = np.stack([np.frombuffer(b, np.float16).reshape(shape) for b in batch["feature_map"].to_pylist()])
    scales = np.stack([np.frombuffer(b, np.float16) for b in batch["frozen_scales"].to_pylist()])
    return maps.astype(np.float32), scales.astype(np.float32)


def padded_states(states: list[bytes], width: int, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Cached caption token states (float16 bytes, ``width`` wide) padded to ``max_tokens``, and their mask."""
    padded = np.zeros((len(states), max_tokens, width), np.float32)
    mask = np.zeros((len(states), max_tokens), np.int64)
    for i, data in enumerate(states):
        values = np.frombuffer(data, np.float16).reshape(-1, width)
        padded[i, : len(values)] = values
        mask[i, : len(values)] = 1
    return padded, mask


def cached_train_rows(batch: pa.Table, max_tokens: int) -> dict[str, np.ndarray]:
    """Cache rows → ``feature_map``, ``frozen_scales``, ``text_states``, ``attention_mask``, ``label``: one random
    caption per image (a task, and a generator per batch, like :func:`rsitr.data.streams.train_rows`)."""
    rng = np.random.default_rng()
    maps, scales = feature_maps(batch)
    chosen = [c[int(rng.integers(len(c)))] for c in batch["captions"].to_pylist()]
    states, mask = padded_states(chosen, int(batch["text_width"][0].as_py()), max_tokens)
    labels = np.asarray([label_id(x) for x in batch["label"].to_pylist()], dtype=np.int64)
    return {
        "feature_map": maps,
        "frozen_scales": scales,
        "text_states": states,
        "attention_mask": mask,
        "label": labels,
    }


def eval_image_rows(batch: pa.Table) -> dict[str, Any]:
    """Cache rows → ``image_id``, ``feature_map``, ``frozen_scales`` (every image of a split once)."""
    maps, scales = feature_maps(batch)
    return {
        "image_id": np.asarray(batch["image_id"].to_pylist(), dtype=object),
        "feature_map": maps,
        "frozen_scales": scales,
    }


def eval_caption_rows(batch: pa.Table, max_tokens: int) -> dict[str, Any]:
    """Cache rows → one row per caption: ``image_id``, ``text_states``, ``attention_mask``."""
    flat = pc.list_flatten(batch["captions"]).to_pylist()
    owners = pc.list_parent_indices(batch["captions"]).to_numpy()
    states, mask = padded_states(flat, int(batch["text_width"][0].as_py()), max_tokens)
    image_ids = np.asarray(batch["image_id"].to_pylist(), dtype=object)[owners]
    return {"image_id": image_ids, "text_states": states, "attention_mask": mask}
