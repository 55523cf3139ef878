"""The checkpoint contract: a directory with safetensors weights, optimizer state, config, epoch and metrics.

Nothing here unpickles arbitrary objects: weights are safetensors, optimizer state loads with
``weights_only=True`` (anything else is refused), the rest is JSON.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rsitr.config import Config, checked_test_views
from rsitr.errors import CheckpointError
from rsitr.io import storage

if TYPE_CHECKING:  # torch and the model load where weights are read or written: reading metadata stays light
    import torch

    from rsitr.models.msa import MSA

WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.pt"
CONFIG = "config.json"
STATE = "state.json"
RESULT = "result.json"
LATEST = "latest.json"


def save_checkpoint(
    directory: str | Path,
    model: MSA,
    optimizer: torch.optim.Optimizer | None,
    config: Config,
    epoch: int,
    metrics: dict[str, float],
    scheduler: Any = None,
    history: list[dict[str, float]] | None = None,
) -> str:
    """Write a checkpoint into ``directory`` and return its model version (hash of the weights)."""
    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS))
    version = hashlib.sha256((directory / WEIGHTS).read_bytes()).hexdigest()[:16]
    if optimizer is not None:
        optim_state = {"optimizer": optimizer.state_dict()}
        if scheduler is not None:
            optim_state["scheduler"] = scheduler.state_dict()
        torch.save(optim_state, directory / OPTIMIZER)
    (directory / CONFIG).write_text(json.dumps(config.to_dict(), indent=2))
    state = {"epoch": epoch, "metrics": metrics, "model_version": version, "history": history or []}
    (directory / STATE).write_text(json.dumps(state, indent=2))
    return version


@contextmanager
def _local_copy(uri: str) -> Iterator[Path]:
    """A local folder holding what loading reads of the checkpoint at ``uri``: the folder itself when local; else
    its weights, config and state (not the optimizer state) downloaded into a temporary folder removed on exit."""
    if not storage.is_remote(uri):
        yield Path(storage.resolve(uri))
        return
    fs, path = storage.filesystem(uri)
    with tempfile.TemporaryDirectory(prefix="rsitr-ckpt-") as target:
        for name in (WEIGHTS, CONFIG, STATE):
            if fs.exists(f"{path.rstrip('/')}/{name}"):
                fs.get(f"{path.rstrip('/')}/{name}", str(Path(target) / name))
        yield Path(target)


def resolve_checkpoint(uri: str) -> str:
    """A checkpoint folder; a finished run folder (its ``result.json`` names the best checkpoint); or a runs
    folder (its ``latest.json`` names the latest finished run's best checkpoint).

    Raises:
        CheckpointError: neither a checkpoint nor a finished run lives at ``uri``.
    """
    uri = storage.resolve(uri)
    if storage.exists(storage.join(uri, WEIGHTS)):
        return uri
    for pointer in (RESULT, LATEST):
        if storage.exists(storage.join(uri, pointer)):
            return str(storage.read_json(storage.join(uri, pointer))["best_checkpoint"])
    raise CheckpointError(
        f"{uri}: not a checkpoint ({WEIGHTS}), a finished training run ({RESULT}) or a runs folder ({LATEST})"
    )


@dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint says about itself, read without building (or downloading) the model."""

    uri: str
    config: Config
    epoch: int
    model_version: str
    metrics: dict[str, float]


def read_meta(uri: str) -> CheckpointMeta:
    """The config and version of a checkpoint or run folder (see :func:`resolve_checkpoint`); reads two small JSON
    files, not the weights.

    Raises:
        CheckpointError: no checkpoint at ``uri``, or one without its config or state.
    """
    folder = resolve_checkpoint(uri)
    documents = []
    for name in (CONFIG, STATE):
        path = storage.join(folder, name)
        if not storage.exists(path):
            raise CheckpointError(f"checkpoint {uri}: missing {name}")
        documents.append(storage.read_json(path))
    config, state = documents
    return CheckpointMeta(
        uri=folder,
        config=Config.from_dict(config),
        epoch=int(state["epoch"]),
        model_version=str(state["model_version"]),
        metrics=dict(state.get("metrics", {})),
    )


def load_checkpoint(
    uri: str, map_location: str | torch.device = "cpu", test_views: int | None = None, text: bool = True
) -> tuple[MSA, Config, dict[str, Any]]:
    """Model (eval mode), config and state (epoch, metrics, model_version) of a checkpoint or run folder;
    ``test_views`` replaces the checkpoint's ``model.test_views`` (an inference setting: the weights are the same);
    ``text=False`` loads the image side alone (:func:`rsitr.models.msa.build_model`), reading only its weights.

    Raises:
        CheckpointError: missing files or weights that do not fit the configured architecture.
    """
    from safetensors import safe_open

    from rsitr.models.msa import build_model

    checked_test_views(test_views)
    with _local_copy(resolve_checkpoint(uri)) as folder:
        for name in (WEIGHTS, CONFIG, STATE):
            if not (folder / name).is_file():
                raise CheckpointError(f"checkpoint {uri}: missing {name}")
        config = Config.from_dict(json.loads((folder / CONFIG).read_text()))
        if test_views is not None:
            config.model.test_views = test_views
        state = json.loads((folder / STATE).read_text())
        model = build_model(config.model, pretrained=False, text=text)
        try:
            with safe_open(str(folder / WEIGHTS), framework="pt") as weights:
                stored = set(weights.keys())
                # a whole model's checkpoint holds more than an image side needs; a key it lacks fails below
                wanted = stored if text else stored & set(model.state_dict())
                model.load_state_dict({key: weights.get_tensor(key) for key in wanted}, strict=True)
        except RuntimeError as err:
            raise CheckpointError(f"checkpoint {uri}: weights do not fit the config ({err})") from err
    model.to(map_location).eval()
    return model, config, state


def load_training_state(
    folder: Path, model: MSA, optimizer: torch.optim.Optimizer, scheduler: Any = None
) -> dict[str, Any]:
    """Restore weights, optimizer and scheduler state in place for resuming; returns the saved state."""
    from safetensors.torch import load_file

    from rsitr.io.tensors import load_tensors_only

    model.load_state_dict(load_file(str(folder / WEIGHTS)), strict=True)
    if (folder / OPTIMIZER).is_file():
        optim_state = load_tensors_only(folder / OPTIMIZER)
        optimizer.load_state_dict(optim_state["optimizer"])
        if scheduler is not None and "scheduler" in optim_state:
            scheduler.load_state_dict(optim_state["scheduler"])
    state: dict[str, Any] = json.loads((folder / STATE).read_text())
    return state
