"""The GPU path end to end on one CUDA device, in a few minutes; ends with one JSON line.

1. ``msa-lite0-minilm-mscmat`` and ``msa-resnet50-bert`` (random init: no hub needed) each train a few hundred
   steps through Ray Train with mixed precision on the generated corpus; the loss must fall and stay finite;
   samples/s is printed.
2. ~10k generated tiles are embedded by :func:`rsitr.retrieval.embed.embed_archive` and by the bare image tower on
   the same tiles, decoded beforehand into GPU-sized batches; tiles/s of both and their ratio are printed.

Usage: ``python -m benchmarks.gpu_check [work folder]`` (or ``benchmarks/gpu_check.sh``). Environment:
``GPU_CHECK_SCALE=0.05`` shrinks every size (a dry run, also on CPU with ``GPU_CHECK_ALLOW_CPU=1``);
``GPU_CHECK_PRESETS`` (comma-separated), ``GPU_CHECK_EPOCHS`` and ``GPU_CHECK_EMBED_SCENES`` make a shorter check;
``GPU_CHECK_TEXT_DIR`` names a folder holding ``minilm/`` and ``bert-base-uncased/`` (each a config.json with its
tokenizer files, no weights) for a machine without the weight packages.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from rsitr.config import load_config
from rsitr.data.preprocess import decode_image
from rsitr.ingest import ingest_folder
from rsitr.io import shards
from rsitr.models import checkpoint as ckpt
from rsitr.retrieval.embed import embed_archive
from rsitr.synthetic import generate_demo_corpus
from rsitr.train.trainer import fit

EMBEDDING_PRESET = "msa-lite0-minilm-mscmat"  # its checkpoint embeds the archive in step 2


def corpus(work: Path, name: str, scenes: int) -> str:
    """A generated corpus of ``scenes`` scenes, ingested; its dataset URI."""
    generate_demo_corpus(work / name, seed=1, scenes=scenes)
    ingest_folder(str(work / name), name, str(work / "data"), tile_size=128, workers=None)
    return str(work / "data" / name)


def presets() -> dict[str, list[str]]:
    """The presets to train and their overrides (random init; text architectures from GPU_CHECK_TEXT_DIR)."""
    random_init = ["model.image_pretrained=false", "model.text_pretrained=false"]
    text_dir = os.environ.get("GPU_CHECK_TEXT_DIR")
    runs = {
        EMBEDDING_PRESET: [*random_init, f"model.text_model={text_dir}/minilm"] if text_dir else [],
        "msa-resnet50-bert": [*random_init, *([f"model.text_model={text_dir}/bert-base-uncased"] if text_dir else [])],
    }
    if os.environ.get("GPU_CHECK_PRESETS"):  # a shorter check: only these presets
        asked = os.environ["GPU_CHECK_PRESETS"].split(",")
        if unknown := [name for name in asked if name not in runs]:
            sys.exit(f"gpu_check: GPU_CHECK_PRESETS names {', '.join(unknown)}: expected some of {', '.join(runs)}")
        runs = {name: runs[name] for name in asked}
    return runs


def check_training(work: Path, data: str, cuda: bool, epochs: int, problems: list[str]) -> dict[str, Any]:
    """Train each preset; its loss curve, samples/s and val mR. A failure is recorded and the next preset runs."""
    results = {}
    for preset, extra in presets().items():
        sizes = ["train.batch_size=32", f"train.epochs={epochs}", "model.image_size=128"]
        workers = ["train.num_workers=1", f"train.use_gpu={str(cuda).lower()}", "train.cpus_per_worker=2"]
        overrides = [*extra, *sizes, *workers]
        started = time.monotonic()
        try:
            result = fit(load_config(preset, overrides), data, str(work / "runs"), name=preset, evaluate_test=False)
        except Exception as err:  # noqa: BLE001 - report it and go on to the next check
            problems.append(f"{preset}: {type(err).__name__}: {err}")
            print(preset, "FAILED", repr(err), flush=True)
            continue
        losses = [row["train_loss"] for row in result.history]
        results[preset] = {
            "epochs": len(losses), "loss_first": losses[0], "loss_last": losses[-1],
            "finite": all(math.isfinite(x) for x in losses), "falls": losses[-1] < losses[0],
            "samples_per_s": float(np.median([row["samples_per_s"] for row in result.history])),
            "val_mR": result.val["mR"], "wall_s": time.monotonic() - started, "amp": cuda,
        }  # fmt: skip
        print(preset, json.dumps(results[preset]), flush=True)
        if not results[preset]["finite"]:
            problems.append(f"{preset}: non-finite loss {losses}")
        if not results[preset]["falls"]:
            problems.append(f"{preset}: loss did not fall {losses}")
    return results


def check_embedding(checkpoint: str, data: str, work: Path, cuda: bool) -> dict[str, Any]:
    """Tiles/s of the product's embedding against the bare image tower on the same, pre-decoded tiles."""
    started = time.monotonic()
    summary = embed_archive(checkpoint, data, str(work / "embeddings"))
    product_s = time.monotonic() - started
    device = torch.device("cuda" if cuda else "cpu")
    model, config, _ = ckpt.load_checkpoint(checkpoint, map_location=device.type)
    model.eval()
    tiles = [decode_image(b, config.model.image_size) for uri in shards.shard_uris(data)
             for b in pq.read_table(uri, columns=["image"])["image"].to_pylist()]  # fmt: skip
    batches = [torch.as_tensor(np.stack(tiles[i : i + 256])) for i in range(0, len(tiles), 256)]
    with torch.no_grad(), torch.autocast(device.type, enabled=cuda):
        model.encode_image(batches[0].to(device))  # warm-up (cuDNN autotune, allocator)
        if cuda:
            torch.cuda.synchronize()
        started = time.monotonic()
        for batch in batches:
            model.encode_image(batch.to(device, non_blocking=True))
        if cuda:
            torch.cuda.synchronize()
        bare_s = time.monotonic() - started
    return {
        "tiles": len(tiles), "rows_written": summary.get("rows"), "product_tiles_per_s": len(tiles) / product_s,
        "bare_tiles_per_s": len(tiles) / bare_s, "embed_vs_bound": product_s / bare_s,
    }  # fmt: skip


def main() -> None:
    work = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="gpu-check-"))
    scale = float(os.environ.get("GPU_CHECK_SCALE", "1"))
    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("GPU_CHECK_ALLOW_CPU") != "1":
        sys.exit("gpu_check: no CUDA device (GPU_CHECK_ALLOW_CPU=1 runs it on CPU as a dry run)")
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    print("device:", device, "| torch", torch.__version__, flush=True)
    started = time.monotonic()
    problems: list[str] = []  # every check runs; the script fails at the end if any failed
    epochs = int(os.environ.get("GPU_CHECK_EPOCHS", max(2, round(10 * scale))))
    # 1. training: ~24 steps per epoch at batch 32 on 24 scenes (864 tiles)
    train_data = corpus(work, "train-corpus", max(2, round(24 * scale)))
    out: dict[str, Any] = {"device": device, "train": check_training(work, train_data, cuda, epochs, problems)}
    # 2. embedding ~10k tiles (280 scenes × 36) with the first preset's checkpoint, product vs bare tower
    if EMBEDDING_PRESET not in out["train"]:
        sys.exit("gpu_check failed, nothing to embed with: " + "; ".join(problems))
    scenes = int(os.environ.get("GPU_CHECK_EMBED_SCENES", max(2, round(280 * scale))))
    checkpoint = str(work / "runs" / EMBEDDING_PRESET)
    out["embed"] = check_embedding(checkpoint, corpus(work, "embed-corpus", scenes), work, cuda)
    print("embed", json.dumps(out["embed"]))
    out["wall_s"] = time.monotonic() - started
    out["problems"] = problems
    print(json.dumps(out))
    if problems:
        sys.exit("gpu_check failed: " + "; ".join(problems))


if __name__ == "__main__":
    main()
