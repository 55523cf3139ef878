"""Text queries in float32 against bfloat16 autocast, and bf16 autocast with the text towers' linear weights stored in
bf16 (what ``Searcher`` uses where the CPU has bf16 in hardware: the same bits without a weight cast per pass).

Batches of 8 RSICD captions (the service's micro-batch under load) go through the text tower of a checkpoint, or of
an untrained model of ``--config`` (towers pretrained: a query costs what a trained one's does), alternating
the three on one thread, side by side in one run. Reports ms per batch, the ratios, and how close the bf16 vectors
are to the float32 ones (cosine; 1.0 = identical ranking).

Prints a table, writes JSON, and ends with one JSON line: ``fp32_ms``, ``bf16_ms``, ``bf16_stored_ms``, ``speedup``
(float32 over bf16 as stored), ``cos_min``, ``stored_identical``.
Usage: ``python -m benchmarks.query_precision [--checkpoint RUN | --config PRESET] [--batches 16]``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, RSICD
from rsitr.config import DEFAULT_PRESET, load_config
from rsitr.data.preprocess import tokenize
from rsitr.models import checkpoint as ckpt
from rsitr.models.msa import MSA, build_model
from rsitr.runtime.precision import cpu_has_native_bf16, with_text_weights_in_bf16

RSICD_CAPTIONS = RSICD / "captions" / "vt-rsbs_RSICD.csv"
FALLBACK = ["storage tanks beside a river", "a bridge crosses a wide river", "a harbor with many boats"]


def captions(count: int) -> list[str]:
    """``count`` RSICD captions (the last column of the CSV), or repeated fallbacks when the data is absent."""
    if not RSICD_CAPTIONS.is_file():
        return [FALLBACK[i % len(FALLBACK)] for i in range(count)]
    lines = RSICD_CAPTIONS.read_text().splitlines()[1:]
    return [text for line in lines if (text := line.rsplit(",", 1)[-1].strip())][:count]


def encode(model: MSA, text_model: str, max_tokens: int, texts: list[str], bf16: bool) -> torch.Tensor:
    tokens = tokenize(texts, text_model, max_tokens, padding="longest")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        vectors = model.encode_text(torch.as_tensor(tokens["input_ids"]), torch.as_tensor(tokens["attention_mask"]))
    return torch.nn.functional.normalize(vectors.float(), dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="a checkpoint or run folder (default: untrained --config)")
    parser.add_argument("--config", default=DEFAULT_PRESET)
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--out", default=str(RESULTS / "query-precision.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.checkpoint:
        model, config, _ = ckpt.load_checkpoint(args.checkpoint)
    else:
        torch.manual_seed(0)
        config = load_config(args.config)
        model = build_model(config.model)
    model.eval()
    stored = with_text_weights_in_bf16(model)
    modes = {"fp32": (model, False), "bf16": (model, True), "bf16_stored": (stored, True)}
    texts = captions(8 * args.batches)
    batches = [texts[i : i + 8] for i in range(0, len(texts), 8)]
    spent = dict.fromkeys(modes, 0.0)
    for which, bf16 in modes.values():  # warm-up
        encode(which, config.model.text_model, config.model.max_tokens, batches[0], bf16)
    for batch in batches:
        for mode, (which, bf16) in modes.items():
            start = time.perf_counter()
            encode(which, config.model.text_model, config.model.max_tokens, batch, bf16)
            spent[mode] += time.perf_counter() - start
    exact = encode(model, config.model.text_model, config.model.max_tokens, texts, False)
    fast = encode(model, config.model.text_model, config.model.max_tokens, texts, True)
    fast_stored = encode(stored, config.model.text_model, config.model.max_tokens, texts, True)
    cosine = (exact * fast).sum(dim=1)
    result = {
        "model": args.checkpoint or f"untrained {config.name}",
        "text_model": config.model.text_model,
        "queries": len(texts),
        "native_bf16": cpu_has_native_bf16(),
        **{f"{mode}_ms": round(spent[mode] / len(batches) * 1000, 1) for mode in modes},
        "speedup": round(spent["fp32"] / spent["bf16_stored"], 2),
        "stored_over_autocast": round(spent["bf16"] / spent["bf16_stored"], 2),
        "cos_min": round(float(cosine.min()), 6),
        "cos_mean": round(float(cosine.mean()), 6),
        "stored_identical": bool(torch.equal(fast, fast_stored)),
    }
    same = "identical to bf16 autocast" if result["stored_identical"] else "NOT identical to bf16 autocast"
    print("| precision | ms per batch of 8 | cosine to fp32 (min / mean) |\n|---|---|---|")
    print(f"| float32 | {result['fp32_ms']} | 1 / 1 |")
    print(f"| bf16 autocast | {result['bf16_ms']} | {result['cos_min']} / {result['cos_mean']} |")
    print(f"| bf16 autocast, linear weights stored in bf16 | {result['bf16_stored_ms']} | {same} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    keys = ("fp32_ms", "bf16_ms", "bf16_stored_ms", "speedup", "cos_min", "stored_identical")
    print(json.dumps({k: result[k] for k in keys}))


if __name__ == "__main__":
    main()
