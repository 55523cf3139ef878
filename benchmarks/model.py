"""One MSA training step on CPU, three ways, in one run; and the time to evaluate the RSICD test split.

For each preset (``msa-resnet50-bert`` randomly initialised, as this machine has no hub; ``msa-lite0-minilm-mscmat``
with its packaged weights), a step = forward + backward + AdamW at batch 32, 224 px:

- ``towers``: the dual encoder alone (image and text towers, fusion, triplet on e_v·e_t): the lower bound;
- ``vectorised``: the full MSA loss with MSCMAT as ``rsitr.models.mscmat`` computes it (one batched attention);
- ``pair-loop``: the same with MSCMAT's pair-by-pair reference (K/V projected per pair, as the official code).

Evaluation: encode RSICD's 1,093 test images once and its 5,465 captions, then R@K (chunked), from decoded pixels
(JPEG decoding is timed apart).

Usage: ``python -m benchmarks.model [--steps 2] [--skip-eval] [--out benchmarks/results/model.json]``
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import RESULTS, RSICD
from rsitr.config import Config, load_config
from rsitr.evaluation.metrics import retrieval_metrics_from_embeddings
from rsitr.models.msa import build_model
from rsitr.models.tokenizers import load_tokenizer
from rsitr.train.losses import total_loss
from rsitr.train.optim import make_optimizer

PRESETS = {
    "msa-resnet50-bert": ["model.image_pretrained=false", "model.text_pretrained=false"],
    "msa-lite0-minilm-mscmat": [],
}
BATCH = 32


def _batch(config: Config, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    size = config.model.image_size
    images = torch.randint(0, 256, (BATCH, size, size, 3), dtype=torch.uint8, generator=gen)
    length = config.model.max_tokens
    ids = torch.randint(1000, 20000, (BATCH, length), generator=gen)
    lengths = torch.randint(8, length + 1, (BATCH,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return images, ids * mask, mask


def step_seconds(config: Config, variant: str, steps: int) -> float:
    """Mean seconds of a training step after one warm-up step."""
    if variant == "towers":
        config.model.mscmat = False
        config.loss.mscma_weight = config.loss.csmmc_weight = 0.0
    torch.manual_seed(0)
    model = build_model(config.model).train()
    model.use_pairwise_reference = variant == "pair-loop"
    optimizer = make_optimizer(model, config.train)
    batch = _batch(config)
    times = []
    for index in range(steps + 1):
        start = time.perf_counter()
        out = model(*batch)
        terms = total_loss(out.image @ out.text.t(), config.loss, out.mscmat)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        if index:
            times.append(time.perf_counter() - start)
    return float(np.mean(times))


def rsicd_test(data: Path) -> tuple[list[Path], list[str], np.ndarray]:
    """Test image files, their captions (VT-RSBS, empty strings dropped) and each caption's image index."""
    split = {row["filename"]: row["split"] for row in csv.DictReader((data / "rsicd_splits.csv").open())}
    files: list[Path] = []
    captions: list[str] = []
    owner: list[int] = []
    with (data / "captions" / "vt-rsbs_RSICD.csv").open(encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if split.get(row["filename"]) != "test":
                continue
            sentences = [s for s in ast.literal_eval(row["sentence"]) if s.strip()]
            owner += [len(files)] * len(sentences)
            captions += sentences
            files.append(data / "images" / row["filename"])
    return files, captions, np.asarray(owner)


def evaluate_seconds(config: Config, pixels: torch.Tensor, captions: list[str], owner: np.ndarray) -> dict[str, float]:
    """Seconds to encode the images once, the captions, and compute R@K (an untrained model: timing only)."""
    model = build_model(config.model).eval()
    tokenizer = load_tokenizer(config.model.text_model)
    with torch.no_grad():
        start = time.perf_counter()
        images = torch.cat([model.encode_image(pixels[i : i + 64]) for i in range(0, len(pixels), 64)])
        image_s = time.perf_counter() - start
        start = time.perf_counter()
        parts = []
        for i in range(0, len(captions), 256):
            tokens = tokenizer(
                captions[i : i + 256],
                padding="max_length",
                truncation=True,
                max_length=config.model.max_tokens,
                return_tensors="pt",
            )
            parts.append(model.encode_text(tokens["input_ids"], tokens["attention_mask"]))
        texts = torch.cat(parts)
        text_s = time.perf_counter() - start
        start = time.perf_counter()
        retrieval_metrics_from_embeddings(images, texts, owner)
        metrics_s = time.perf_counter() - start
    return {"images_s": image_s, "captions_s": text_s, "metrics_s": metrics_s, "total_s": image_s + text_s + metrics_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="measured steps per variant (after one warm-up)")
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--data", default=str(RSICD))
    parser.add_argument("--out", default=str(RESULTS / "model.json"))
    args = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    rows: list[dict[str, Any]] = []
    for preset, overrides in PRESETS.items():
        for variant in ("towers", "vectorised", "pair-loop"):
            seconds = step_seconds(load_config(preset, overrides), variant, args.steps)
            rows.append({"preset": preset, "variant": variant, "step_s": seconds})
            print(f"{preset:18} {variant:10} {seconds:7.2f} s/step", flush=True)
    for row in rows:
        same = {r["variant"]: r["step_s"] for r in rows if r["preset"] == row["preset"]}
        row["x_towers"] = row["step_s"] / same["towers"]
        row["pair_loop_x"] = same["pair-loop"] / row["step_s"]
    evaluation: dict[str, Any] = {}
    data = Path(args.data)
    if args.skip_eval:
        pass
    elif not (data / "images").is_dir():
        print(f"RSICD is absent at {data}: the evaluation timing is skipped", file=sys.stderr)
    else:
        from PIL import Image

        files, captions, owner = rsicd_test(data)
        start = time.perf_counter()
        pixels = torch.from_numpy(
            np.stack([np.asarray(Image.open(f).convert("RGB").resize((224, 224))) for f in files])
        )
        evaluation["decode_s"] = time.perf_counter() - start
        evaluation["images"], evaluation["captions"] = len(files), len(captions)
        for preset, overrides in PRESETS.items():
            evaluation[preset] = evaluate_seconds(load_config(preset, overrides), pixels, captions, owner)

    print(f"\n{'preset':18} {'variant':10} {'s/step':>7} {'×towers':>8} {'pair-loop ×':>11}")
    for r in rows:
        print(f"{r['preset']:18} {r['variant']:10} {r['step_s']:7.2f} {r['x_towers']:8.2f} {r['pair_loop_x']:11.2f}")
    if evaluation:
        print(
            f"\nRSICD test ({evaluation['images']} images, {evaluation['captions']} captions; JPEG decode "
            f"{evaluation['decode_s']:.1f} s):"
        )
        for preset in PRESETS:
            e = evaluation[preset]
            print(
                f"{preset:18} images {e['images_s']:6.1f} s  captions {e['captions_s']:6.1f} s  "
                f"R@K {e['metrics_s']:5.2f} s  total {e['total_s']:6.1f} s"
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    host = {"threads": torch.get_num_threads(), "torch": torch.__version__, "batch": BATCH}
    out.write_text(json.dumps({"host": host, "steps": rows, "evaluation": evaluation}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
