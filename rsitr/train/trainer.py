"""A training run: its datasets, a unique name, the Ray Train trainer, the best checkpoint and its test metrics."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.data
import ray.train
import ray.train.torch

from rsitr.config import Config, unique_run_name
from rsitr.data import frozen_cache
from rsitr.data.streams import shard_eval_datasets, shard_train_dataset
from rsitr.evaluation.evaluate import evaluate_checkpoint
from rsitr.io import shards, storage
from rsitr.models import checkpoint as ckpt
from rsitr.runtime.raysession import init_ray
from rsitr.train.loop import LoopSettings, train_loop


@dataclass
class FitResult:
    """Where a finished run put its outputs, and its metrics."""

    run_dir: str
    best_checkpoint: str
    val: dict[str, float]
    test: dict[str, float] | None
    history: list[dict[str, float]]


def training_datasets(config: Config, data: str, storage_path: str) -> dict[str, Any]:
    """``train`` (shuffled, decoded, tokenised) and the val streams, from shards or from the frozen-prefix cache
    (built first when ``train.cache_frozen`` and missing). From the cache, ``train`` holds every epoch of the run
    (``train.epochs``, in one stream); from shards, one epoch, which Ray Data executes again each epoch."""
    m, t = config.model, config.train
    if t.cache_frozen:
        cache = frozen_cache.build_cache(config, data, storage_path)
        tokens = frozen_cache.state_tokens(m)
        train_rows = frozen_cache.cached_train_dataset(cache, tokens, t.shuffle, epochs=t.epochs, seed=t.seed)
        val_images, val_captions = frozen_cache.cached_eval_datasets(cache, "val", tokens)
    else:
        train_rows = shard_train_dataset(data, m.image_size, m.text_model, m.max_tokens, t.augment, t.shuffle)
        val_images, val_captions = shard_eval_datasets(data, "val", m.image_size, m.text_model, m.max_tokens)
    return {"train": train_rows, "val_images": val_images, "val_captions": val_captions}


def fit(
    config: Config,
    data: str,
    storage_path: str = ".rsitr/runs",
    name: str | None = None,
    max_failures: int = 1,
    evaluate_test: bool = True,
) -> FitResult:
    """Train on an ingested dataset with Ray Train; a run with an existing ``name`` resumes.

    Raises:
        shards.ShardsNotFoundError: ``data`` holds no ingested dataset.
        StorageUnreachableError: the object store holding the run stopped answering; the same call, once it is back,
            resumes from the last checkpoint Ray Train recorded as saved (or starts over when there is none).
    """
    from ray.train import DataConfig
    from ray.train.torch import TorchTrainer

    data = storage.resolve(data)
    manifest = shards.read_manifest(data)  # fail before starting anything when the data is not there
    train_split = manifest["splits"].get("train")
    steps_per_epoch = (train_split["rows"] if train_split else 0) // config.train.batch_size
    storage_path = storage.resolve(storage_path)
    name = name or unique_run_name(config.name)
    init_ray()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=LoopSettings(
            config,
            steps_per_epoch,
            # TensorBoard events under a local run folder; with S3 storage the per-step log stays in the job log
            log_dir=None if storage.is_remote(storage_path) else storage.join(storage_path, name, "tensorboard"),
        ).to_dict(),
        scaling_config=_scaling(config),
        datasets=training_datasets(config, data, storage_path),
        dataset_config=DataConfig(datasets_to_split=["train"]),
        run_config=_run_config(name, storage_path, max_failures),
    )
    run_dir = storage.join(storage_path, name)
    # Ray Train uploads each checkpoint itself; an object store that stops answering surfaces as a worker error
    with storage.unreachable_store_named(run_dir, "saving the checkpoints of training run"):
        result = trainer.fit()
        if result.error is not None:
            raise result.error
    best_ckpt, best_metrics = max(result.best_checkpoints or [], key=lambda pair: pair[1]["val_mR"])
    history = _history(result.checkpoint)  # the latest checkpoint (Ray always keeps it)
    best_path = f"s3://{best_ckpt.path}" if storage_path.startswith("s3://") else best_ckpt.path
    test = evaluate_checkpoint(best_path, data, "test") if evaluate_test else None
    out = FitResult(
        run_dir=run_dir,
        best_checkpoint=best_path,
        val={k.removeprefix("val_"): v for k, v in best_metrics.items() if k.startswith("val_")},
        test=test,
        history=history,
    )
    storage.write_json_atomic(storage.join(run_dir, ckpt.RESULT), out.__dict__)
    storage.write_json_atomic(storage.join(storage_path, ckpt.LATEST), {"run": name, **out.__dict__})
    return out


def _scaling(config: Config) -> ray.train.ScalingConfig:
    t = config.train
    return ray.train.ScalingConfig(
        num_workers=t.num_workers,
        use_gpu=t.use_gpu,
        resources_per_worker={"CPU": t.cpus_per_worker},
        placement_strategy=t.placement_strategy,
    )


def _run_config(name: str, storage_path: str, max_failures: int) -> ray.train.RunConfig:
    """Where the run lives, and the one checkpoint kept: the best by val mR."""
    ray_path, ray_filesystem = storage.arrow_filesystem(storage_path)
    return ray.train.RunConfig(
        name=name,
        storage_path=ray_path,
        storage_filesystem=ray_filesystem,
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=1, checkpoint_score_attribute="val_mR", checkpoint_score_order="max"
        ),
        failure_config=ray.train.FailureConfig(max_failures=max_failures),
    )


def _history(latest: ray.train.Checkpoint | None) -> list[dict[str, float]]:
    """Per-epoch metrics, as the latest checkpoint recorded them (they survive restarts and resumes)."""
    if latest is None:
        return []
    with latest.as_directory() as folder:
        return list(json.loads((Path(folder) / ckpt.STATE).read_text()).get("history", []))
