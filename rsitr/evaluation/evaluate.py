"""Evaluation: encode each image once and each caption once, then chunked R@K (see :mod:`rsitr.evaluation.metrics`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from rsitr.errors import DatasetError
from rsitr.evaluation.metrics import retrieval_metrics_from_embeddings
from rsitr.evaluation.rerank import REVERSE_WEIGHT, reranked_metrics
from rsitr.models.msa import MSA


@torch.no_grad()
def embed_images(model: MSA, batches: Iterable[dict[str, Any]], device: torch.device) -> tuple[list[str], torch.Tensor]:
    """Image ids and embeddings from batches of ``image_id`` / ``image`` (or a cache's ``feature_map`` /
    ``frozen_scales``)."""
    ids: list[str] = []
    vectors = []
    for batch in batches:
        ids.extend(str(i) for i in batch["image_id"])
        if "frozen_scales" in batch:  # rows of a frozen-prefix cache (rsitr.data.frozen_cache)
            vector = model.encode_image_from_prefix(
                torch.as_tensor(batch["feature_map"]).to(device), torch.as_tensor(batch["frozen_scales"]).to(device)
            )
        else:
            vector = model.encode_image(torch.as_tensor(batch["image"]).to(device))
        vectors.append(vector.float().cpu())
    return ids, torch.cat(vectors) if vectors else torch.empty(0)


@torch.no_grad()
def embed_captions(
    model: MSA, batches: Iterable[dict[str, Any]], device: torch.device
) -> tuple[list[str], torch.Tensor]:
    """Owning image ids and embeddings from batches of ``image_id`` / ``input_ids`` (or a cache's ``text_states``) /
    ``attention_mask``."""
    owners: list[str] = []
    vectors = []
    for batch in batches:
        owners.extend(str(i) for i in batch["image_id"])
        mask = torch.as_tensor(batch["attention_mask"]).to(device)
        if "text_states" in batch:
            vector = model.encode_text_from_prefix(torch.as_tensor(batch["text_states"]).to(device), mask)
        else:
            vector = model.encode_text(torch.as_tensor(batch["input_ids"]).to(device), mask)
        vectors.append(vector.float().cpu())
    return owners, torch.cat(vectors) if vectors else torch.empty(0)


def evaluate_model(
    model: MSA,
    image_batches: Iterable[dict[str, Any]],
    caption_batches: Iterable[dict[str, Any]],
    device: torch.device,
    rerank_k: int = 0,
    reverse_weight: float = REVERSE_WEIGHT,
) -> dict[str, float]:
    """R@1/5/10 both ways and mR of ``model`` on one split; with ``rerank_k``, after re-ranking each query's top
    ``rerank_k`` (:mod:`rsitr.evaluation.rerank`, ``reverse_weight`` its reverse-rank weight), the plain mR kept as
    ``mR_plain``.

    Raises:
        DatasetError: a caption belongs to an image that is not in the image stream, or the split is empty.
    """
    was_training = model.training
    model.eval()
    try:
        image_ids, image_vecs = embed_images(model, image_batches, device)
        owners, caption_vecs = embed_captions(model, caption_batches, device)
    finally:
        model.train(was_training)
    if not image_ids or not owners:
        raise DatasetError("evaluation split has no images or no captions")
    index = {image_id: i for i, image_id in enumerate(image_ids)}
    missing = [o for o in owners if o not in index]
    if missing:
        raise DatasetError(f"{len(missing)} captions belong to images not in the split, e.g. {missing[0]}")
    caption_image = np.array([index[o] for o in owners])
    metrics = retrieval_metrics_from_embeddings(image_vecs, caption_vecs, caption_image)
    if rerank_k:
        plain = metrics["mR"]
        metrics = reranked_metrics(image_vecs @ caption_vecs.t(), caption_image, rerank_k, reverse_weight)
        metrics["mR_plain"] = plain
    metrics.update({"images": float(len(image_ids)), "captions": float(len(owners))})
    return metrics


def evaluate_checkpoint(
    checkpoint: str, data: str, split: str = "test", rerank_k: int | None = None, test_views: int | None = None
) -> dict[str, float]:
    """Metrics of a checkpoint (or finished run) on one split of an ingested dataset (``rerank_k``, ``test_views``:
    override the run's ``train.rerank_k``, ``model.test_views``)."""
    # Ray Data and checkpoint loading only here: importing the evaluation math stays light
    from rsitr.data.streams import shard_eval_datasets
    from rsitr.io import storage
    from rsitr.models import checkpoint as ckpt

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, config, _ = ckpt.load_checkpoint(checkpoint, map_location=device, test_views=test_views)
    images, captions = shard_eval_datasets(
        storage.resolve(data), split, config.model.image_size, config.model.text_model, config.model.max_tokens
    )
    return evaluate_model(
        model,
        images.iter_batches(batch_size=config.train.eval_batch_size),
        captions.iter_batches(batch_size=256),
        device,
        rerank_k=config.train.rerank_k if rerank_k is None else rerank_k,
        reverse_weight=config.train.rerank_reverse_weight,
    )
