"""Frozen-prefix cache: what the frozen image stages and text layers compute, once per dataset and model.

While only the upper stages train, the lower ones give the same outputs every epoch (frozen BatchNorm stays in
eval mode, and the cache is built without augmentation), so computing them once in Ray Data and training from the
cache makes an epoch cost only the trainable part. Rows are per image: the frozen stages' pooled scales, the
feature map the first trainable stage reads, and each caption's token states after the frozen text layers, all
float16. Checkpoints still hold the whole model, so what is trained this way embeds raw pixels and text as usual.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
import torch

from rsitr.config import TEST_VIEW_COUNTS, Config, ConfigError, ModelConfig
from rsitr.data.cached_rows import cached_train_rows, eval_caption_rows, eval_image_rows
from rsitr.data.preprocess import decode_image
from rsitr.data.run_rows import pausing_while_held_back, read_run
from rsitr.data.streams import DATA_TASK_CPUS, read_shards
from rsitr.io import shards, storage
from rsitr.models.msa import dihedral_views
from rsitr.models.text import text_layer_count
from rsitr.models.tokenizers import load_tokenizer
from rsitr.runtime.precision import inference, use_bf16

log = logging.getLogger("rsitr.data.frozen_cache")
# 2: rows written in a seeded random order (read in file order by rsitr.data.run_rows)
CACHE_FORMAT = 2
CACHE_META = "cache.json"
# block size while building a cache (each block's rows are written as soon as it is done): a few hundred tiles
CACHE_BLOCK_BYTES = 4 * 1024 * 1024
# the cache's rows are written in this seeded order, so that any one of its files is a random sample of the data
CACHE_ORDER_SEED = 0
# what a training batch reads from a cache row
TRAIN_COLUMNS = ["frozen_scales", "feature_map", "map_shape", "captions", "text_width", "label"]
# what the cached values depend on, besides the data
PREFIX_FIELDS = (
    "image_backbone",
    "image_pretrained",
    "image_weights",
    "image_stages",
    "freeze_image_stages",
    "image_head_features",
    "image_taps",
    "scale_pooling",
    "image_normalization",
    "text_model",
    "text_pretrained",
    "freeze_text_layers",
    "max_tokens",
    "mscmat",
)


def check_cacheable(config: Config) -> None:
    """Reject settings under which a frozen-prefix cache would train something else than the config says.

    Raises:
        ConfigError: augmentation on, nothing frozen, a Gswin block on a frozen stage, or a randomly initialised
            tower (each process would draw different frozen weights).
    """
    m = config.model
    if config.train.cache_views != 1:
        _check_cache_views(config)
    if config.train.augment:
        raise ConfigError("train.cache_frozen: the cache holds un-augmented features; set train.augment=false")
    if m.freeze_image_stages < 1 or m.freeze_text_layers < 1:
        raise ConfigError("train.cache_frozen needs model.freeze_image_stages >= 1 and model.freeze_text_layers >= 1")
    if any(p <= m.freeze_image_stages for p in m.gswin_stages):
        raise ConfigError("train.cache_frozen: a Gswin block on a frozen stage needs its feature map every epoch")
    if not (m.image_pretrained or m.image_weights) or not m.text_pretrained:
        # the cache's actors and the trainer would each draw their own random frozen weights
        raise ConfigError("train.cache_frozen needs pretrained towers: random frozen weights differ in every process")


def _check_cache_views(config: Config) -> None:
    m = config.model
    if config.train.cache_views not in TEST_VIEW_COUNTS:
        raise ConfigError(f"train.cache_views {config.train.cache_views}: expected one of {TEST_VIEW_COUNTS}")
    stages = len(m.image_taps or m.image_stages)
    if m.freeze_image_stages < stages:
        # a trainable stage reads one feature map per tile; a mean over views exists only for the pooled scales
        raise ConfigError(
            f"train.cache_views {config.train.cache_views} needs a wholly frozen image tower: set "
            f"model.freeze_image_stages to {stages} (it is {m.freeze_image_stages})"
        )


def text_fully_frozen(config: ModelConfig) -> bool:
    """Every text layer frozen and no MSCMAT reading token states: the cache needs only the pooled vector."""
    layers = text_layer_count(config.text_model)
    return layers is not None and config.freeze_text_layers >= layers and not config.mscmat


def state_tokens(config: ModelConfig) -> int:
    """Tokens per caption state that the cache's batches carry: 1 where the cache stores pooled vectors (padding
    them to ``max_tokens`` would ship 31 rows of zeros per caption to the trainer), else ``max_tokens``."""
    return 1 if text_fully_frozen(config) else config.max_tokens


def cache_key(config: Config, manifest: shards.Manifest) -> str:
    """A digest of the data's manifest and every setting the cached values depend on."""
    model = config.to_dict()["model"]
    material = {
        "format": CACHE_FORMAT,
        "model": {k: model[k] for k in PREFIX_FIELDS},
        "image_size": config.model.image_size,
        "manifest": manifest,
    }
    if config.train.cache_views != 1:  # keyed only when set, so the caches of one view keep their keys
        material["views"] = config.train.cache_views
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


class FrozenPrefix:
    """Ray Data actor: shard rows → cache rows (one model load per actor)."""

    def __init__(self, model_config: dict[str, Any], image_size: int, threads: int, views: int = 1) -> None:
        from rsitr.models.msa import build_model

        torch.set_num_threads(max(1, threads))
        config = Config.from_dict({"model": model_config}).model
        self.model = build_model(config).eval()
        self.tokenizer = load_tokenizer(config.text_model)
        self.max_tokens = config.max_tokens
        self.image_size = image_size
        self.pooled_text = text_fully_frozen(config)
        self.views = views
        # several passes per tile: bf16 autocast on CPUs with bf16 hardware, as inference runs (rsitr embed)
        self.bf16 = views > 1 and use_bf16("auto", torch.device("cpu"))

    def _caption_states(self, texts: list[str]) -> dict[str, bytes]:
        """float16 states of each distinct caption (RSICD repeats captions within and across images)."""
        distinct = sorted(set(texts), key=len)
        if not distinct:
            return {}
        tokens = self.tokenizer(
            distinct, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        if self.pooled_text:
            # nothing above the cache reads tokens: one "token", the pooled vector (its mean pool is itself)
            prefix = self.model.text_tower().frozen_pooled(tokens["input_ids"], tokens["attention_mask"]).unsqueeze(1)
            lengths = [1] * len(distinct)
        else:
            prefix = self.model.text_tower().frozen_prefix(tokens["input_ids"], tokens["attention_mask"])
            lengths = tokens["attention_mask"].sum(1).tolist()
        states = prefix.half().numpy()
        return {text: state[:length].tobytes() for text, state, length in zip(distinct, states, lengths, strict=True)}

    @torch.no_grad()
    def __call__(self, batch: pa.Table) -> pa.Table:
        images = torch.as_tensor(np.stack([decode_image(d, self.image_size) for d in batch["image"].to_pylist()]))
        if self.views == 1:
            scales, feature_map = self.model.backbone.frozen_prefix(images)
        else:
            with inference(self.bf16):
                per_view = [self.model.backbone.frozen_prefix(view) for view in dihedral_views(images, self.views)]
            scales = torch.stack([s.float() for s, _ in per_view]).mean(0)
            feature_map = per_view[0][1]  # empty: the tower is wholly frozen (check_cacheable)
        owners = pc.list_parent_indices(batch["captions"]).to_numpy()
        flat = pc.list_flatten(batch["captions"]).to_pylist()
        states = self._caption_states(flat)
        captions: list[list[bytes]] = [[] for _ in range(batch.num_rows)]
        for owner, text in zip(owners, flat, strict=True):
            captions[owner].append(states[text])
        width = self.model.text_tower().width
        maps = feature_map.half().numpy()
        return pa.table(
            {
                "image_id": batch["image_id"],
                "split": batch["split"],
                "label": batch["label"],
                "frozen_scales": pa.array([s.tobytes() for s in scales.half().numpy()], pa.binary()),
                "feature_map": pa.array([m.tobytes() for m in maps], pa.binary()),
                "map_shape": pa.array([list(maps.shape[1:])] * batch.num_rows, pa.list_(pa.int32())),
                "captions": pa.array(captions, pa.list_(pa.binary())),
                "text_width": pa.array([width] * batch.num_rows, pa.int32()),
            }
        )


def build_cache(config: Config, data: str, storage_path: str) -> str:
    """The frozen-prefix cache of ``data`` under ``<storage_path>/_cache``, computed unless already complete.

    A cache is complete once its ``cache.json`` exists (written last); a half-written one is deleted and rebuilt.

    Raises:
        ConfigError: the config cannot train from a cache (:func:`check_cacheable`).
        shards.ShardsNotFoundError: ``data`` holds no ingested dataset.
    """
    check_cacheable(config)
    manifest = shards.read_manifest(data)
    root = storage.join(storage_path, "_cache", f"frozen-{cache_key(config, manifest)}")
    if storage.exists(storage.join(root, CACHE_META)):
        log.info("frozen-prefix cache %s is complete; reusing it", root)
        return root
    storage.remove_tree(root)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    if len(ray.nodes()) == 1:  # a local Ray declares more logical CPUs than there are cores (see raysession)
        cpus = min(cpus, os.cpu_count() or 1)
    # one model copy per two CPUs; each keeps a fraction of a CPU free for the reads that feed it
    actors = max(1, cpus // 2)
    log.info("building the frozen-prefix cache %s with %d actor(s)", root, actors)
    # Small blocks keep rows flowing: a whole 64 MB shard through heavy frozen towers on a few cores outlasts
    # Ray Data's no-progress timeout (30 min), which then aborts the build. A dataset keeps the context it was
    # created with, so the smaller block size applies to this build only.
    context = ray.data.DataContext.get_current()
    default_block_size = context.target_max_block_size
    context.target_max_block_size = CACHE_BLOCK_BYTES
    # Rows in random order: training reads whole files, in a new order each epoch (rsitr.data.run_rows), and
    # shards keep ingest order (RSICD's is by class name), whose batches would hold few classes.
    source = read_shards(data, ["image_id", "split", "label", "image", "captions"])
    rows = source.random_shuffle(seed=CACHE_ORDER_SEED).map_batches(
        FrozenPrefix,
        fn_constructor_kwargs={
            "model_config": config.to_dict()["model"],
            "image_size": config.model.image_size,
            "threads": max(1, cpus // actors),
            "views": config.train.cache_views,
        },
        batch_format="pyarrow",
        batch_size=64,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=max(DATA_TASK_CPUS, min(1.0, cpus / actors - DATA_TASK_CPUS)),
    )
    path, filesystem = storage.arrow_filesystem(storage.join(root, "rows"))
    try:
        rows.write_parquet(path, filesystem=filesystem)
    finally:
        context.target_max_block_size = default_block_size
    storage.write_json_atomic(
        storage.join(root, CACHE_META),
        {"format": CACHE_FORMAT, "data": data, "rows": int(manifest["rows"]), "model": config.to_dict()["model"]},
    )
    return root


def _read(root: str, split: str) -> ray.data.Dataset:
    path, filesystem = storage.arrow_filesystem(storage.join(root, "rows"))
    ds = ray.data.read_parquet(path, filesystem=filesystem, num_cpus=DATA_TASK_CPUS)
    return ds.filter(expr=f"split == '{split}'")


def cached_train_dataset(
    root: str, max_tokens: int, shuffle: str = "full", epochs: int = 1, seed: int = 0
) -> ray.data.Dataset:
    """The training split of a cache for a whole run: ``epochs`` epochs in one stream, each in a new order
    (:class:`rsitr.data.run_rows.RunOfEpochs`, ``shuffle`` its ``order``); caption states padded to ``max_tokens``
    (:func:`state_tokens`).

    Raises:
        ConfigError: an unknown ``shuffle``.
        FileNotFoundError: the cache holds no rows.
    """
    rows = read_run(storage.join(root, "rows"), TRAIN_COLUMNS, "train", epochs, seed, shuffle, DATA_TASK_CPUS)
    return pausing_while_held_back(
        rows.map_batches(
            cached_train_rows,  # type: ignore[arg-type]
            fn_kwargs={"max_tokens": max_tokens},
            batch_format="pyarrow",
            batch_size=64,
            compute=ray.data.TaskPoolStrategy(size=1),
            num_cpus=DATA_TASK_CPUS,
        )
    )


def cached_eval_datasets(root: str, split: str, max_tokens: int) -> tuple[ray.data.Dataset, ray.data.Dataset]:
    """Every image of a split once and every caption with its image id, from the cache (caption states padded to
    ``max_tokens``: :func:`state_tokens`)."""
    images = _read(root, split).map_batches(
        eval_image_rows,
        batch_format="pyarrow",
        batch_size=64,
        num_cpus=DATA_TASK_CPUS,
    )
    captions = _read(root, split).map_batches(
        eval_caption_rows,  # type: ignore[arg-type]
        fn_kwargs={"max_tokens": max_tokens},
        batch_format="pyarrow",
        batch_size=64,
        num_cpus=DATA_TASK_CPUS,
    )
    return images, captions
