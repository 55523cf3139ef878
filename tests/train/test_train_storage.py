"""Checkpoints read from a real S3-compatible server.

A run that saves its checkpoints there and resumes from them: ``tests/io/test_storage_faults.py``.
"""

import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors

from rsitr.io import storage
from rsitr.models.checkpoint import CONFIG, OPTIMIZER, STATE, WEIGHTS, load_checkpoint

pytestmark = [pytest.mark.s3]


def test_loading_a_checkpoint_from_s3_downloads_no_optimizer_and_leaves_no_temporary_folder(
    s3_bucket: str, untrained_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    remote = f"{s3_bucket}/loaded-checkpoint"
    fs, path = storage.filesystem(remote)
    for name in (WEIGHTS, CONFIG, STATE):
        fs.put(str(untrained_checkpoint / name), f"{path}/{name}")
    fs.pipe(f"{path}/{OPTIMIZER}", b"not read when only loading")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    model, config, state = load_checkpoint(remote)

    assert config.name == "demo" and state["epoch"] == 0
    stored = load_safetensors((untrained_checkpoint / WEIGHTS).read_bytes())
    assert all(torch.equal(stored[k], v) for k, v in model.state_dict().items())
    assert list(tmp_path.iterdir()) == []  # every load used to leave the whole checkpoint behind in /tmp
