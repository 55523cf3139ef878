"""Ray Data pipelines over shards: decode, augment and tokenise in Ray Data, never in the train loop."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray.data

from rsitr.data.preprocess import augment_rs, decode_image, decode_images, label_id, tokenize
from rsitr.data.run_rows import check_shuffle
from rsitr.errors import DatasetError
from rsitr.io import shards
from rsitr.models.tokenizers import process_tokenizer

# Fractional CPUs for Data stages: on a 2-core machine two training workers must not starve the reads
# and decodes that feed them (whole-CPU Data tasks there wait forever for a free CPU).
DATA_TASK_CPUS = 0.25


def read_shards(root: str, columns: list[str]) -> ray.data.Dataset:
    """The given columns of every shard of an ingested dataset, streamed."""
    return ray.data.read_parquet(shards.shard_uris(root), num_cpus=DATA_TASK_CPUS).select_columns(columns)


def read_split(root: str, split: str, columns: list[str]) -> ray.data.Dataset:
    """Rows of one split of an ingested dataset (``columns`` plus ``split``), streamed from its shards.

    Raises:
        shards.ShardsNotFoundError: ``root`` holds no ingested dataset.
        DatasetError: the dataset has no rows in ``split``.
    """
    manifest = shards.read_manifest(root)
    if split not in manifest["splits"]:
        raise DatasetError(f"dataset {root} has no {split!r} split (splits: {sorted(manifest['splits'])})")
    wanted = sorted(set(columns) | {"split"})
    ds = read_shards(root, wanted)
    return ds.filter(expr=f"split == '{split}'")


def train_rows(
    batch: pa.Table, image_size: int, text_model: str, max_tokens: int, augment: bool
) -> dict[str, np.ndarray]:
    """Shard rows → ``image`` (uint8 NHWC), ``input_ids``, ``attention_mask``, ``label``: one random caption per
    image (and with ``augment`` one random dihedral view).

    A task, not an actor: Ray Data starts a training stream's actors anew each epoch (a process and its imports,
    most of a small epoch's pipeline), while a task runs in a worker process Ray keeps, with the
    tokenizer it loaded (:func:`~rsitr.models.tokenizers.process_tokenizer`). Each batch draws from a fresh
    generator seeded by the OS, as the shuffle before it is.
    """
    rng = np.random.default_rng()
    images = []
    texts = []
    for data, captions in zip(batch["image"].to_pylist(), batch["captions"].to_pylist(), strict=True):
        image = decode_image(data, image_size)
        images.append(augment_rs(image, rng) if augment else image)
        texts.append(captions[int(rng.integers(len(captions)))])
    return {
        "image": np.stack(images),
        **tokenize(texts, text_model, max_tokens, process_tokenizer(text_model)),
        "label": np.asarray([label_id(x) for x in batch["label"].to_pylist()], dtype=np.int64),
    }


def caption_tokens(batch: pa.Table, text_model: str, max_tokens: int) -> dict[str, np.ndarray]:
    """Shard rows → one row per caption: ``image_id``, ``input_ids``, ``attention_mask``."""
    flat = pc.list_flatten(batch["captions"]).to_pylist()
    owners = pc.list_parent_indices(batch["captions"]).to_numpy()
    image_ids = np.asarray(batch["image_id"].to_pylist(), dtype=object)[owners]
    return {"image_id": image_ids, **tokenize(flat, text_model, max_tokens, process_tokenizer(text_model))}


def shuffled(ds: ray.data.Dataset, shuffle: str) -> ray.data.Dataset:
    """``ds`` in a new order each epoch: ``full`` (global shuffle), ``blocks`` (block order only) or ``none``.

    Raises:
        ConfigError: an unknown ``shuffle``.
    """
    check_shuffle(shuffle)
    if shuffle == "full":
        return ds.random_shuffle()
    return ds.randomize_block_order() if shuffle == "blocks" else ds


def shard_train_dataset(
    root: str, image_size: int, text_model: str, max_tokens: int, augment: bool, shuffle: str = "full"
) -> ray.data.Dataset:
    """The training split, shuffled anew each epoch, then decoded, augmented and tokenised.

    Shards keep ingest order (RSICD's is by class name), and in-batch negatives of one class teach a contrastive
    loss almost nothing, so rows are shuffled before batching: ``full`` (a global shuffle of the still-encoded rows;
    right for corpora up to a few GB), ``blocks`` (block order only: cheap, weaker) or ``none``.

    Raises:
        ConfigError: an unknown ``shuffle``.
    """
    ds = shuffled(read_split(root, "train", ["image", "captions", "label"]), shuffle)
    return ds.map_batches(
        train_rows,  # type: ignore[arg-type]
        fn_kwargs={"image_size": image_size, "text_model": text_model, "max_tokens": max_tokens, "augment": augment},
        batch_format="pyarrow",
        batch_size=64,
        compute=ray.data.TaskPoolStrategy(size=1),
        num_cpus=DATA_TASK_CPUS,
    )


def shard_eval_datasets(
    root: str, split: str, image_size: int, text_model: str, max_tokens: int
) -> tuple[ray.data.Dataset, ray.data.Dataset]:
    """Two streams for evaluation: every image once, and every caption with its image id."""
    images = read_split(root, split, ["image_id", "image"]).map_batches(
        decode_images,  # type: ignore[arg-type]
        fn_kwargs={"image_size": image_size},
        batch_format="pyarrow",
        batch_size=64,
        num_cpus=DATA_TASK_CPUS,
    )
    captions = read_split(root, split, ["image_id", "captions"]).map_batches(
        caption_tokens,  # type: ignore[arg-type]
        fn_kwargs={"text_model": text_model, "max_tokens": max_tokens},
        batch_format="pyarrow",
        batch_size=256,
        compute=ray.data.TaskPoolStrategy(size=1),
        num_cpus=DATA_TASK_CPUS,
    )
    return images, captions
