"""Typed run configuration: dataclasses, YAML presets in ``rsitr/configs/`` and dotted overrides."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from rsitr.errors import ConfigError

CONFIG_DIR = Path(__file__).parent / "configs"
# the CPU default: the recipe with the best RSICD val mR that trains within 3 h on 2 cores (docs/results.md)
DEFAULT_PRESET = "msa-four-towers"
# inference precision (rsitr.runtime.precision): auto = bf16 autocast on CPUs with bf16 hardware, else float32
PRECISIONS = ("auto", "float32", "bfloat16")
# model.test_views: the image alone, with its flips and half turn, or with every flip and quarter turn
TEST_VIEW_COUNTS = (1, 4, 8)


def checked_test_views(views: int | None) -> int | None:
    """``views`` itself (None: the checkpoint's own setting).

    Raises:
        ConfigError: a count other than 1, 4 or 8.
    """
    if views is not None and views not in TEST_VIEW_COUNTS:
        raise ConfigError(f"test views {views}: expected one of {TEST_VIEW_COUNTS}")
    return views


@dataclass
class ModelConfig:
    """Architecture of the dual encoder."""

    image_backbone: str = "efficientnet_lite0"
    image_pretrained: bool = True
    # the side images are resized to, in training and inference alike (a property of the trained model)
    image_size: int = 224
    image_stages: tuple[int, ...] = (1, 2, 3, 4)
    freeze_image_stages: int = 3
    text_model: str = "all-MiniLM-L6-v2"
    text_pooling: str = "mean"
    freeze_text_layers: int = 4
    max_tokens: int = 32
    embed_dim: int = 512
    gate_hidden: int = 1024
    # a local .safetensors/.pth of the backbone's classifier weights (e.g. ResNet-50 on a machine without a hub)
    image_weights: str = ""
    text_pretrained: bool = True
    # MSCMAT (training only): width 0 = the text tower's width; mask_padding=False is the official behaviour
    mscmat: bool = False
    mscmat_dim: int = 0
    mscmat_heads: int = 12
    mscmat_mask_padding: bool = True
    # CMPAGL's Gswin block over these of the selected stages (1-based positions in image_stages)
    gswin_stages: tuple[int, ...] = ()
    gswin_window: int = 7
    # one more scale after the last stage: the classifier's 1x1 head convolution, average-pooled (EfficientNets)
    image_head_features: bool = False
    # scales from these modules of the backbone (e.g. blocks.2 … blocks.6) instead of image_stages; stage numbers
    # elsewhere (freezing, Gswin) then count taps
    image_taps: tuple[str, ...] = ()
    # msa: max-pool every scale but the last, which is averaged (MSA); avg: average every scale
    scale_pooling: str = "msa"
    # pixel statistics: imagenet (0.485…/0.229…) or backbone (what its weights were trained with, e.g. 0.5/0.5)
    image_normalization: str = "imagenet"
    # F in e_v = F(Σ_s W_s s_s): gated (MSA) or mlp (W_s into head_hidden, then LayerNorm, GELU, dropout, Linear;
    # the text side gets the same two-layer MLP); standardize puts a feature-wise BatchNorm (no affine) before each W
    fusion: str = "gated"
    head_hidden: int = 1024
    head_dropout: float = 0.5
    standardize: bool = False
    # learn the InfoNCE temperature (log-parametrised, starting at initial_temperature) instead of loss.temperature
    learn_temperature: bool = False
    initial_temperature: float = 0.07
    # K independently initialised heads trained side by side, each with its own loss; embeddings are the members'
    # unit vectors side by side / √K (one cosine = the mean of theirs), K × embed_dim wide
    head_ensemble: int = 1
    # inference only: the image's pooled scales averaged over this many of its dihedral views (1, 4: flips and the
    # half turn, 8: every flip and quarter turn) before the heads; an aerial tile has no "up", so the mean is the
    # same for every rotation or flip of the tile, at the cost of that many backbone passes per image
    test_views: int = 1


@dataclass
class LossConfig:
    """Loss terms and their weights."""

    triplet_margin: float = 0.5
    triplet_weight: float = 1.0
    infonce_weight: float = 0.0
    temperature: float = 0.05
    mscma_weight: float = 0.0
    mscma_both_directions: bool = False
    csmmc_weight: float = 0.0
    csmmc_temperature: float = 2.0
    # CMPAGL's intra-class distance term, on pairs of the batch that share a shard `label`
    intra_class_weight: float = 0.0


@dataclass
class TrainConfig:
    """Optimisation and scaling."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-4
    backbone_lr: float = 1e-5
    weight_decay: float = 0.1
    augment: bool = False
    num_workers: int = 2
    cpus_per_worker: float = 0.5
    use_gpu: bool = False
    seed: int = 0
    max_minutes: float = 0.0
    # stop once val mR has not improved for this many epochs (0: run every planned epoch)
    patience: int = 0
    eval_batch_size: int = 64
    # re-rank each query's top K in val/test evaluation (0: off, until it is shown to help on RSICD val)
    rerank_k: int = 0
    # the re-rank's reverse-rank weight (GaLR's 0.7); also what `rsitr search --rerank` uses with this model
    rerank_reverse_weight: float = 0.7
    # contrast each worker's batch against every worker's (the global batch) rather than its own slice only
    gather_negatives: bool = True
    # row order each epoch: full (global shuffle; from a cache: file order and rows within reads), blocks (block or
    # file order only) or none; see rsitr.data.streams and rsitr.data.run_rows
    shuffle: str = "full"
    # Ray placement of the train workers: PACK (fewest nodes) or SPREAD (one per node where possible)
    placement_strategy: str = "PACK"
    log_every_steps: int = 10
    # compute the frozen stages/layers once per dataset (rsitr.data.frozen_cache) and train the rest from that cache
    cache_frozen: bool = False
    # with a wholly frozen image tower: cache each tile's pooled scales averaged over this many dihedral views (as
    # model.test_views does at inference), so training and its val selection see what inference shows; that many
    # backbone passes per tile while the cache is built
    cache_views: int = 1

    def __post_init__(self) -> None:
        at_least = {"epochs": 1, "batch_size": 1, "num_workers": 1, "eval_batch_size": 1, "log_every_steps": 1}
        at_least.update(dict.fromkeys(("max_minutes", "patience", "rerank_k", "rerank_reverse_weight"), 0))
        for name, floor in at_least.items():
            value = getattr(self, name)
            if not math.isfinite(value) or value < floor:
                raise ConfigError(f"train.{name}={value!r}: expected a number ≥ {floor}")


@dataclass
class Config:
    """A whole run: model, loss and training settings."""

    name: str = "custom"  # presets set their own; runs are named after it
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """Build from a nested mapping, rejecting unknown keys (``train.image_size``, where checkpoints written
        before it moved to ``model.image_size`` keep it, is read as the latter)."""
        return _build(cls, _moved_image_size(data), "")


def _moved_image_size(data: dict[str, Any]) -> dict[str, Any]:
    train, model = data.get("train"), data.get("model")
    if not isinstance(train, dict) or "image_size" not in train:
        return data
    if isinstance(model, dict) and "image_size" in model:
        raise ConfigError(
            f"train.image_size={train['image_size']!r}: the image size is model.image_size now "
            f"(set here to {model['image_size']!r}); set that one"
        )
    train = dict(train)
    return {**data, "train": train, "model": {**(model or {}), "image_size": train.pop("image_size")}}


def _build(kind: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(kind)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown keys {sorted(unknown)}; known: {sorted(fields)}")
    values: dict[str, Any] = {}
    defaults = kind()
    hints = typing.get_type_hints(kind)
    for name, value in data.items():
        current = getattr(defaults, name)
        if dataclasses.is_dataclass(current):
            values[name] = _build(type(current), value, f"{where}{name}.")
        else:
            values[name] = _coerce(current, value, f"{where}{name}", hints[name])
    return kind(**values)


def _coerce(current: Any, value: Any, key: str, hint: Any) -> Any:
    """``value`` as the field's type: its default's type, and for tuples the element type of its hint."""
    try:
        if isinstance(current, bool):
            if isinstance(value, str):
                if value.lower() not in {"true", "false", "1", "0", "yes", "no"}:
                    raise ValueError(value)
                return value.lower() in {"true", "1", "yes"}
            return bool(value)
        if isinstance(current, tuple):
            if isinstance(value, str):
                items: list[Any] = [v for v in value.split(",") if v.strip()]
            else:
                items = list(value) if isinstance(value, (list, tuple)) else [value]
            element: Any = typing.get_args(hint)[0]  # tuple[int, ...] → int
            return tuple(element(v.strip() if isinstance(v, str) else v) for v in items)
        if isinstance(current, (int, float, str)):
            return type(current)(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{key}: cannot read {value!r} as {type(current).__name__}") from err
    return value


def unique_run_name(prefix: str) -> str:
    """``<prefix>-<UTC time>-<random>``: the one naming rule of the CLI, the flows and the Ray job, so a new run never
    collides with (and so never resumes) an old one."""
    return f"{prefix}-{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def available_presets() -> list[str]:
    """Names of the presets shipped in ``rsitr/configs``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config(preset_or_path: str = DEFAULT_PRESET, overrides: list[str] | None = None) -> Config:
    """Load a preset name or a YAML file and apply ``a.b=value`` overrides.

    Args:
        preset_or_path: a preset name (see :func:`available_presets`) or a path to a YAML file.
        overrides: dotted ``key=value`` strings, applied in order.

    Raises:
        ConfigError: unknown preset, unreadable file, unknown key or a value of the wrong type.
    """
    path = Path(preset_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{preset_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"config {preset_or_path!r}: no such preset or file; presets: {available_presets()}")
    data = yaml.safe_load(path.read_text()) or {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.epochs=5")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw else raw
    return Config.from_dict(data)
