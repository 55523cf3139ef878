"""Training runs whose checkpoints live on a real S3-compatible server, through the Ray job entry point."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors

from rsitr.io import storage
from rsitr.train.checkpoint import CONFIG, OPTIMIZER, RESULT, STATE, WEIGHTS, load_checkpoint

PROJECT = Path(__file__).resolve().parents[2]


def _train(demo_shards: Path, storage_uri: str, epochs: int) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RSITR_RAY_CLUSTER")}
    command = [
        sys.executable, "-m", "rsitr.train", "--config", "demo", "--data", str(demo_shards), "--storage",
        storage_uri, "--name", "s3-run", "--epochs", str(epochs), "train.num_workers=1", "train.cpus_per_worker=1",
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, cwd=PROJECT, env=env, timeout=600)


def test_checkpoints_round_trip_through_s3_and_a_run_resumes_there(s3_bucket: str, demo_shards: Path) -> None:
    runs = f"{s3_bucket}/runs"
    first = _train(demo_shards, runs, epochs=1)
    assert first.returncode == 0, first.stderr[-3000:]
    result = storage.read_json(f"{runs}/s3-run/{RESULT}")
    checkpoint = result["best_checkpoint"]
    assert checkpoint.startswith(f"{s3_bucket}/runs/s3-run/") and len(result["history"]) == 1
    model, config, state = load_checkpoint(f"{runs}/s3-run")
    assert config.name == "demo" and state["epoch"] == 0
    stored = load_safetensors(storage.read_bytes(f"{checkpoint}/{WEIGHTS}"))
    loaded = model.state_dict()
    assert set(stored) == set(loaded) and all(torch.equal(stored[k], loaded[k]) for k in stored)

    # the same name again with more epochs resumes from the checkpoint on S3 instead of starting over
    second = _train(demo_shards, runs, epochs=2)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming at epoch 1" in second.stderr + second.stdout
    history = storage.read_json(f"{runs}/s3-run/{RESULT}")["history"]
    assert [h["epoch"] for h in history] == [0, 1]
    assert storage.read_json(f"{storage.read_json(f'{runs}/s3-run/{RESULT}')['best_checkpoint']}/{STATE}")


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
