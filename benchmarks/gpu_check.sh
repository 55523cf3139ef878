#!/usr/bin/env bash
# The GPU path, end to end on one CUDA device, in a few minutes:
#   1. msa-lite0-minilm-mscmat and msa-resnet50-bert (random init: no hub needed) each train a few hundred steps
#      through Ray Train with mixed precision on the generated corpus; the loss must fall and stay finite;
#      samples/s is printed.
#   2. ~10k generated tiles are embedded by `rsitr.retrieval.embed.embed_archive` and by the bare image tower on the same
#      tiles, decoded beforehand into GPU-sized batches; tiles/s of both and their ratio are printed.
# Ends with one JSON line. Needs the project installed (`make install`); GPU_CHECK_SCALE=0.05 shrinks every size
# (a dry run of the script itself, also on CPU with GPU_CHECK_ALLOW_CPU=1); GPU_CHECK_PRESETS (comma-separated),
# GPU_CHECK_EPOCHS and GPU_CHECK_EMBED_SCENES make a shorter check.
# On a machine without the weight packages (all-MiniLM-L6-v2, EfficientNet-Lite0), GPU_CHECK_TEXT_DIR names a folder
# holding `minilm/` and `bert-base-uncased/` (each a config.json with its tokenizer files, no weights): both presets
# then start from random init with those text architectures.
# Usage: benchmarks/gpu_check.sh [work folder]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
WORK=${1:-$(mktemp -d)}
export PYTHONUNBUFFERED=1
exec "$PY" - "$WORK" <<'EOF'
import json, math, os, sys, time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from rsitr.train import checkpoint as ckpt
from rsitr.config import load_config
from rsitr.data.preprocess import decode_image
from rsitr.retrieval.embed import embed_archive
from rsitr.ingest import ingest_folder
from rsitr.io import shards
from rsitr.synthetic import generate_demo_corpus
from rsitr.train import fit

work = Path(sys.argv[1])
scale = float(os.environ.get("GPU_CHECK_SCALE", "1"))
cuda = torch.cuda.is_available()
if not cuda and os.environ.get("GPU_CHECK_ALLOW_CPU") != "1":
    sys.exit("gpu_check: no CUDA device (GPU_CHECK_ALLOW_CPU=1 runs it on CPU as a dry run)")
print("device:", torch.cuda.get_device_name(0) if cuda else "cpu", "| torch", torch.__version__)
started = time.monotonic()
out: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "train": {}}
problems: list[str] = []  # every check runs; the script fails at the end if any failed


def corpus(name: str, scenes: int) -> str:
    generate_demo_corpus(work / name, seed=1, scenes=scenes)
    ingest_folder(str(work / name), name, str(work / "data"), tile_size=128, workers=None)
    return str(work / "data" / name)


random_init = ["model.image_pretrained=false", "model.text_pretrained=false"]
text_dir = os.environ.get("GPU_CHECK_TEXT_DIR")
runs = {
    "msa-lite0-minilm-mscmat": [*random_init, f"model.text_model={text_dir}/minilm"] if text_dir else [],
    "msa-resnet50-bert": [*random_init, *([f"model.text_model={text_dir}/bert-base-uncased"] if text_dir else [])],
}
if os.environ.get("GPU_CHECK_PRESETS"):  # a shorter check: only these presets
    asked = os.environ["GPU_CHECK_PRESETS"].split(",")
    if unknown := [name for name in asked if name not in runs]:
        sys.exit(f"gpu_check: GPU_CHECK_PRESETS names {', '.join(unknown)}: expected some of {', '.join(runs)}")
    runs = {name: runs[name] for name in asked}
epochs = int(os.environ.get("GPU_CHECK_EPOCHS", max(2, round(10 * scale))))
# 1. training: ~24 steps per epoch at batch 32 on 24 scenes (864 tiles)
train_data = corpus("train-corpus", max(2, round(24 * scale)))
for preset, extra in runs.items():
    overrides = [*extra, "train.batch_size=32", f"train.epochs={epochs}", "train.num_workers=1",
                 f"train.use_gpu={str(cuda).lower()}", "model.image_size=128", "train.cpus_per_worker=2"]
    config = load_config(preset, overrides)
    t0 = time.monotonic()
    try:
        result = fit(config, train_data, str(work / "runs"), name=preset, evaluate_test=False)
    except Exception as err:  # noqa: BLE001 - report it and go on to the next check
        problems.append(f"{preset}: {type(err).__name__}: {err}")
        print(preset, "FAILED", repr(err), flush=True)
        continue
    losses = [row["train_loss"] for row in result.history]
    finite = all(math.isfinite(x) for x in losses)
    falls = losses[-1] < losses[0]
    out["train"][preset] = {
        "epochs": len(losses), "loss_first": losses[0], "loss_last": losses[-1], "finite": finite, "falls": falls,
        "samples_per_s": float(np.median([row["samples_per_s"] for row in result.history])),
        "val_mR": result.val["mR"], "wall_s": time.monotonic() - t0, "amp": cuda,
    }
    print(preset, json.dumps(out["train"][preset]), flush=True)
    if not finite:
        problems.append(f"{preset}: non-finite loss {losses}")
    if not falls:
        problems.append(f"{preset}: loss did not fall {losses}")

# 2. embedding ~10k tiles (280 scenes × 36) with the first run's checkpoint, product vs bare tower
checkpoint = str(work / "runs" / "msa-lite0-minilm-mscmat")
if "msa-lite0-minilm-mscmat" not in out["train"]:
    sys.exit("gpu_check failed, nothing to embed with: " + "; ".join(problems))
embed_data = corpus("embed-corpus", int(os.environ.get("GPU_CHECK_EMBED_SCENES", max(2, round(280 * scale)))))
t0 = time.monotonic()
summary = embed_archive(checkpoint, embed_data, str(work / "embeddings"))
product_s = time.monotonic() - t0
model, config, _ = ckpt.load_checkpoint(checkpoint, map_location="cuda" if cuda else "cpu")
model.eval()
device = torch.device("cuda" if cuda else "cpu")
tiles = [decode_image(b, config.model.image_size) for uri in shards.shard_uris(embed_data)
         for b in pq.read_table(uri, columns=["image"])["image"].to_pylist()]
batches = [torch.as_tensor(np.stack(tiles[i : i + 256])) for i in range(0, len(tiles), 256)]
with torch.no_grad(), torch.autocast(device.type, enabled=cuda):
    model.encode_image(batches[0].to(device))  # warm-up (cuDNN autotune, allocator)
    if cuda:
        torch.cuda.synchronize()
    t0 = time.monotonic()
    for batch in batches:
        model.encode_image(batch.to(device, non_blocking=True))
    if cuda:
        torch.cuda.synchronize()
    bare_s = time.monotonic() - t0
out["embed"] = {
    "tiles": len(tiles), "rows_written": summary.get("rows"), "product_tiles_per_s": len(tiles) / product_s,
    "bare_tiles_per_s": len(tiles) / bare_s, "embed_vs_bound": (len(tiles) / bare_s) / (len(tiles) / product_s),
}
print("embed", json.dumps(out["embed"]))
out["wall_s"] = time.monotonic() - started
out["problems"] = problems
print(json.dumps(out))
if problems:
    sys.exit("gpu_check failed: " + "; ".join(problems))
EOF
