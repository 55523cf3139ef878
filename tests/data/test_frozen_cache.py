"""The frozen-prefix cache: split forwards equal the whole model, and a run trains from a real cache."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from rsitr.config import ConfigError, LossConfig, load_config
from rsitr.data.frozen_cache import CACHE_META, FrozenPrefix, build_cache, cache_key, check_cacheable
from rsitr.data.preprocess import tokenize
from rsitr.data.run_rows import RunOfEpochs, read_run
from rsitr.evaluation.evaluate import evaluate_checkpoint
from rsitr.io import shards
from rsitr.models.msa import build_model
from rsitr.train.losses import total_loss
from rsitr.train.trainer import fit


@pytest.mark.parametrize(
    ("backbone", "frozen", "head"),
    [("efficientnet_lite0", 2, False), ("resnet18", 2, False), ("efficientnet_lite0", 3, True),
     ("efficientnet_lite0", 4, True)],
)  # fmt: skip
def test_split_forward_equals_the_whole_model(backbone: str, frozen: int, head: bool) -> None:
    overrides = [f"model.image_backbone={backbone}", f"model.freeze_image_stages={frozen}",
                 f"model.image_head_features={head}", "model.image_pretrained=false"]  # fmt: skip
    config = load_config("msa-lite0-minilm-mscmat", overrides)
    torch.manual_seed(0)
    model = build_model(config.model).eval()
    images = torch.randint(0, 256, (3, 96, 96, 3), dtype=torch.uint8)
    tokens = tokenize(
        ["two planes beside a terminal", "a river", "many green trees near a road"], "all-MiniLM-L6-v2", 16
    )
    ids, mask = torch.as_tensor(tokens["input_ids"]), torch.as_tensor(tokens["attention_mask"])
    with torch.no_grad():
        whole = model(images, ids, mask)
        scales, feature_map = model.backbone.frozen_prefix(images)
        states = model.text.frozen_prefix(ids, mask)
        split = model(feature_map, None, mask, frozen_scales=scales, text_states=states)
    everything = frozen == 4
    assert scales.shape[1] == sum(model.backbone.channels[: None if everything else frozen])
    assert len(whole.scales) == 4 + head and (feature_map.numel() == 0) == everything
    torch.testing.assert_close(split.image, whole.image)
    torch.testing.assert_close(split.text, whole.text)
    for a, b in zip(split.mscmat, whole.mscmat, strict=True):
        torch.testing.assert_close(a, b)
    # every MSA term (and CMPAGL's intra-class term) from the cache equals the same term from pixels
    weights = LossConfig(triplet_weight=1, infonce_weight=1, mscma_weight=15, csmmc_weight=10, intra_class_weight=1)
    labels = torch.tensor([0, 1, 0])
    from_pixels, from_cache = (total_loss(o.image @ o.text.t(), weights, o.mscmat, labels) for o in (whole, split))
    assert set(from_cache) == {"triplet", "infonce", "mscma", "csmmc", "intra", "loss"}
    for term, value in from_pixels.items():
        torch.testing.assert_close(from_cache[term], value, msg=term)


def test_settings_a_cache_cannot_honour_are_refused() -> None:
    refused = (
        ["train.augment=true"],
        ["model.freeze_text_layers=0"],
        ["model.gswin_stages=2"],
        ["model.image_pretrained=false"],
        ["train.cache_views=3"],
        # Lite0's last stage trains from a cached map, and a map has no mean over views
        ["train.cache_views=8", "model.freeze_image_stages=4"],
    )
    for overrides in refused:
        with pytest.raises(ConfigError):
            check_cacheable(load_config("msa-lite0-minilm", ["train.cache_frozen=true", *overrides]))
    four = load_config("msa-four-towers")
    check_cacheable(load_config("msa-four-towers", ["train.cache_views=4"]))
    with pytest.raises(ConfigError, match="cache_views 2: expected one of"):
        check_cacheable(load_config("msa-four-towers", ["train.cache_views=2"]))
    # a cache of view means is another cache; a one-view cache keeps the key it had before cache_views existed
    manifest: shards.Manifest = {"rows": 1}  # type: ignore[typeddict-item]
    keys = {cache_key(load_config("msa-four-towers", [f"train.cache_views={v}"]), manifest) for v in (1, 4, 8)}
    assert len(keys) == 3 and cache_key(four, manifest) in keys


@pytest.mark.ray
def test_a_run_trains_from_the_cache_and_its_checkpoint_embeds_raw_pixels_alike(
    ray_local: None, demo_shards: Path, tmp_path: Path
) -> None:
    overrides = ["train.cache_frozen=true", "train.epochs=1", "model.fusion=mlp", "model.standardize=true",
                 "model.learn_temperature=true", "model.mscmat=true", "loss.mscma_weight=1"]  # fmt: skip
    config = load_config("demo", overrides)
    result = fit(config, str(demo_shards), str(tmp_path / "runs"), name="cached", evaluate_test=False)
    (cache,) = (tmp_path / "runs" / "_cache").iterdir()
    assert (cache / CACHE_META).is_file()
    files = list((cache / "rows").rglob("*.parquet"))
    rows = sum(pq.read_metadata(f).num_rows for f in files)
    assert rows == shards.read_manifest(str(demo_shards))["rows"]
    assert len(files) >= 2  # written block by block (CACHE_BLOCK_BYTES), not as one block at the end
    # The same checkpoint on raw pixels and tokens (no cache): the val metrics agree up to float16 rounding.
    from_pixels = evaluate_checkpoint(result.best_checkpoint, str(demo_shards), "val")
    assert from_pixels["mR"] == pytest.approx(result.val["mR"], abs=1.5)
    assert result.val["mR"] > 10  # chance on 57 val images is ~ 3
    # Rows are written in random order: no file holds a run of the shards' (ingest) order.
    ingest_order = {row["image_id"]: i for i, row in enumerate(shards.iter_rows(str(demo_shards), ["image_id"]))}
    in_files = [[ingest_order[x] for x in pq.read_table(f)["image_id"].to_pylist()] for f in files]
    steps = [b - a for order in in_files for a, b in zip(order, order[1:], strict=False)]
    assert sum(step == 1 for step in steps) < 0.2 * len(steps)
    # Training reads it as one stream of the run's epochs: each train row once per epoch, files in a new order.
    train_ids = [r["image_id"] for r in shards.iter_rows(str(demo_shards), ["image_id"], split="train")]
    run = read_run(str(cache / "rows"), ["image_id"], "train", epochs=2, seed=0, order="full", num_cpus=0.25)
    assert sorted(run.to_pandas()["image_id"]) == sorted(train_ids * 2)
    source = RunOfEpochs({str(f): 1 for f in files}, ["image_id"], "train", epochs=2, seed=0)
    first, second = source.epoch_order(0), source.epoch_order(1)
    assert sorted(first) == sorted(second) and first != second
    # A second run of the same model on the same data reuses the finished cache.
    stamp = (cache / CACHE_META).stat().st_mtime_ns
    assert build_cache(config, str(demo_shards), str(tmp_path / "runs")) == str(cache)
    assert (cache / CACHE_META).stat().st_mtime_ns == stamp
    # an MSCMAT that no loss term reads: tests/train/test_loop.py (real DDP, without a training run)


@pytest.mark.ray
def test_a_fully_frozen_text_tower_caches_one_pooled_vector_per_caption(demo_shards: Path) -> None:
    from rsitr.data.cached_rows import eval_caption_rows
    from rsitr.data.frozen_cache import state_tokens

    overrides = ["model.freeze_text_layers=6", "model.image_pretrained=false", "model.fusion=mlp"]
    config = load_config("demo", overrides)
    (first,) = shards.shard_uris(str(demo_shards))[:1]
    rows = pq.read_table(first, columns=["image_id", "split", "label", "image", "captions"]).slice(0, 4)
    prefix = FrozenPrefix(config.to_dict()["model"], image_size=64, threads=1)
    cached = prefix(rows)
    width = prefix.model.text.width
    assert all(len(state) == width * 2 for caps in cached["captions"].to_pylist() for state in caps)  # float16
    captions = eval_caption_rows(cached, state_tokens(config.model))
    flat = [c for caps in rows["captions"].to_pylist() for c in caps]
    assert captions["text_states"].shape == (len(flat), 1, width)  # no padding rows travel to the trainer
    tokens = tokenize(flat, "all-MiniLM-L6-v2", config.model.max_tokens)
    model = prefix.model
    with torch.no_grad():
        from_cache = model.encode_text_from_prefix(
            torch.as_tensor(captions["text_states"]), torch.as_tensor(captions["attention_mask"])
        )
        from_tokens = model.encode_text(torch.as_tensor(tokens["input_ids"]), torch.as_tensor(tokens["attention_mask"]))
    torch.testing.assert_close(from_cache, from_tokens, atol=2e-3, rtol=0)  # float16 storage
    assert state_tokens(load_config("demo", ["model.freeze_text_layers=4"]).model) == config.model.max_tokens


JOINED = ["model.image_backbone=efficientnet_lite0+efficientnet_lite0", "model.image_pretrained=false",
          "model.freeze_image_stages=4", "model.text_model=all-MiniLM-L6-v2+all-MiniLM-L6-v2",
          "model.freeze_text_layers=6", "model.head_ensemble=3", "model.fusion=mlp", "model.standardize=true",
          "model.learn_temperature=true"]  # fmt: skip


def test_joined_towers_and_a_head_ensemble_split_like_the_whole_model() -> None:
    from rsitr.models.text import TextEncoder

    config = load_config("demo", JOINED)
    torch.manual_seed(0)
    model = build_model(config.model).eval()
    images = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)
    texts = ["two planes beside a terminal", "a river", "many green trees near a road"]
    joined = tokenize(texts, config.model.text_model, 16)
    ids, mask = torch.as_tensor(joined["input_ids"]), torch.as_tensor(joined["attention_mask"])
    single = {k: torch.as_tensor(v) for k, v in tokenize(texts, "all-MiniLM-L6-v2", 16).items()}
    with torch.no_grad():
        whole = model(images, ids, mask)
        scales, feature_map = model.backbone.frozen_prefix(images)
        states = model.text.frozen_prefix(ids, mask)
        split = model(feature_map, None, mask[:, :1], frozen_scales=scales, text_states=states)
        # the joined caption vector is each tower's vector, side by side
        alone, _ = TextEncoder("all-MiniLM-L6-v2", frozen_layers=6)(single["input_ids"], single["attention_mask"])
    assert ids.shape == (3, 32) and states.shape == (3, 1, 2 * 384) and feature_map.numel() == 0
    torch.testing.assert_close(states[:, 0, :384], alone)
    torch.testing.assert_close(states[:, 0, 384:], alone)
    assert scales.shape[1] == sum(model.backbone.channels) == 2 * sum(model.backbone.parts[0].channels)
    torch.testing.assert_close(split.image, whole.image)
    torch.testing.assert_close(split.text, whole.text)
    # one cosine of the ensemble's embeddings is the mean of its three members' cosines
    assert len(whole.members) == 3 and whole.image.shape[1] == 3 * config.model.embed_dim
    members = torch.stack([image @ text.t() for image, text, _ in whole.members]).mean(0)
    torch.testing.assert_close(whole.image @ whole.text.t(), members)
    torch.testing.assert_close(model.encode_image(images), whole.image)
    torch.testing.assert_close(model.encode_text(ids, mask), whole.text)


@pytest.mark.ray
def test_joined_towers_train_from_the_cache_and_embed_raw_pixels_alike(
    ray_local: None, demo_shards: Path, tmp_path: Path
) -> None:
    pretrained = ["model.image_backbone=efficientnet_lite0+efficientnet_lite2", "model.image_pretrained=true"]
    config = load_config("demo", [*JOINED, *pretrained, "train.cache_frozen=true", "train.epochs=1"])
    result = fit(config, str(demo_shards), str(tmp_path / "runs"), name="joined", evaluate_test=False)
    from_pixels = evaluate_checkpoint(result.best_checkpoint, str(demo_shards), "val")
    assert from_pixels["mR"] == pytest.approx(result.val["mR"], abs=1.5)
    assert result.val["mR"] > 10  # chance on 57 val images is ~ 3


@pytest.mark.ray
def test_a_cache_of_eight_views_holds_each_tiles_mean_over_its_flips_and_turns(demo_shards: Path) -> None:
    import numpy as np

    from rsitr.data.preprocess import decode_image
    from rsitr.models.msa import dihedral_views

    config = load_config("demo", JOINED)
    (first,) = shards.shard_uris(str(demo_shards))[:1]
    rows = pq.read_table(first, columns=["image_id", "split", "label", "image", "captions"]).slice(0, 3)
    torch.manual_seed(0)  # random towers; the one-view prefix below is given the same weights
    prefix = FrozenPrefix(config.to_dict()["model"], image_size=64, threads=1, views=8)
    cached = prefix(rows)
    scales = torch.as_tensor(np.stack([np.frombuffer(b, np.float16) for b in cached["frozen_scales"].to_pylist()]))
    pixels = [decode_image(b, 64) for b in rows["image"].to_pylist()]
    with torch.no_grad():
        by_hand = torch.stack(
            [prefix.model.backbone.frozen_prefix(v)[0] for v in dihedral_views(torch.as_tensor(np.stack(pixels)), 8)]
        ).mean(0)
    cosine = torch.nn.functional.cosine_similarity(scales.float(), by_hand, dim=1)
    assert bool((cosine > 0.999).all()), cosine  # float16 storage, bf16 passes where the CPU has bf16
    one_view = FrozenPrefix(config.to_dict()["model"], image_size=64, threads=1)
    one_view.model.load_state_dict(prefix.model.state_dict())
    single = one_view(rows)["frozen_scales"].to_pylist()
    assert single != cached["frozen_scales"].to_pylist()  # a view mean is not the tile as it is
