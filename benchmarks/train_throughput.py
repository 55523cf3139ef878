"""Training-loop throughput fed by Ray Data (the product's path) vs by the same batches held in memory (the bound).

One TorchTrainer worker group runs the real training step (:class:`rsitr.train.TrainStep`) and alternates epochs:
one streamed from Ray Data exactly as ``rsitr.train`` streams it (read, shuffle, decode, tokenise, or the
frozen-prefix cache's rows), one over batches that a first pass left decoded in memory. Samples/s are over all
workers; data wait is the fraction of epoch time spent waiting for the next batch. Prints a table, writes JSON.

Usage: ``python benchmarks/train_throughput.py [--config msa-lite0-minilm] [--data URI] [--rounds 2] [key=value …]``
(without ``--data``: RSICD as benchmarks/quality.py ingests it, else the generated demo corpus). ``--quick``: the
generated demo corpus, 512 rows per epoch, 3 rounds (a few minutes). The last line printed is one JSON object:
``fed_vs_bound`` (Ray Data's samples/s over the in-memory bound's) and ``data_wait`` (Ray Data's wait fraction).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from ray.train import DataConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from rsitr.config import Config, load_config
from rsitr.io import storage
from rsitr.models.msa import build_model
from rsitr.runtime.raysession import init_ray
from rsitr.train import StepLog, TrainStep, make_optimizer, make_scheduler, run_epoch, training_datasets

ROOT = Path(__file__).resolve().parents[1]
RSICD = ROOT / ".rsitr" / "quality" / "data" / "rsicd"


def worker_loop(loop_config: dict[str, Any]) -> None:
    config = Config.from_dict(loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(config.train.cpus_per_worker)))
    device = ray.train.torch.get_device()
    model = build_model(config.model).to(device)
    optimizer = make_optimizer(model, config.train)
    step = TrainStep(model, optimizer, make_scheduler(optimizer, 10**6, 10), config, device)
    board = StepLog(None, rank, 10**9, world)
    shard = ray.train.get_dataset_shard("train")
    per_worker = max(2, config.train.batch_size // world)

    def streamed() -> Any:
        return shard.iter_torch_batches(batch_size=per_worker, drop_last=True, device=device)

    in_memory = list(streamed())  # the bound's input: this worker's batches, decoded and tokenised
    run_epoch(step, in_memory, board, 0, world)  # warm-up (allocator, thread pools)
    rounds = []
    for index in range(loop_config["rounds"]):
        ray_data = run_epoch(step, streamed(), board, 1 + 2 * index, world)
        memory = run_epoch(step, in_memory, board, 2 + 2 * index, world)
        rounds.append({"ray_data": ray_data, "in_memory": memory, "batches": len(in_memory)})
    if rank == 0:  # the driver reads the rounds from here (result.metrics is empty without a checkpoint)
        Path(loop_config["rounds_file"]).write_text(json.dumps(rounds))
    ray.train.report({"rounds": len(rounds)})


def _default_data(work: Path, demo: bool = False) -> str:
    if not demo and (RSICD / "manifest.json").is_file():
        return str(RSICD)
    from rsitr.ingest import ingest_folder
    from rsitr.synthetic import generate_demo_corpus

    generate_demo_corpus(work / "corpus", seed=0)
    ingest_folder(str(work / "corpus"), "demo", str(work / "shards"), tile_size=128)
    return str(work / "shards" / "demo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="msa-lite0-minilm")
    parser.add_argument("--data", default=None)
    parser.add_argument("--storage", default=str(ROOT / ".rsitr" / "quality" / "runs"), help="where caches live")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-rows", type=int, default=2048, help="train rows per epoch (0: the whole split)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_throughput.json"))
    parser.add_argument("--quick", action="store_true", help="the demo corpus, 512 rows per epoch, 3 rounds")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.quick:
        args.max_rows, args.rounds = 512, 3
    logging.basicConfig(level=logging.WARNING)
    config = load_config(args.config, args.overrides)
    with tempfile.TemporaryDirectory() as work:
        data = storage.resolve(args.data or _default_data(Path(work), demo=args.quick))
        init_ray()
        datasets = training_datasets(config, data, storage.resolve(args.storage))
        train = datasets["train"].limit(args.max_rows) if args.max_rows else datasets["train"]
        t = config.train
        result = TorchTrainer(
            worker_loop,
            train_loop_config={
                "config": config.to_dict(),
                "rounds": args.rounds,
                "rounds_file": str(Path(work) / "rounds.json"),
            },
            scaling_config=ScalingConfig(
                num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker={"CPU": t.cpus_per_worker}
            ),
            datasets={"train": train},
            dataset_config=DataConfig(datasets_to_split=["train"]),
            run_config=RunConfig(name="train-throughput", storage_path=work),
        ).fit()
        if result.error is not None:
            raise result.error
        rounds = json.loads((Path(work) / "rounds.json").read_text())

    def median(mode: str, key: str) -> float:
        return statistics.median(r[mode][key] for r in rounds)

    bound = median("in_memory", "samples_per_s")
    table = {
        mode: {
            "samples_per_s": median(mode, "samples_per_s"),
            "data_wait_fraction": median(mode, "data_wait_fraction"),
            "ratio_to_bound": median(mode, "samples_per_s") / bound,
        }
        for mode in ("ray_data", "in_memory")
    }
    print(f"\n{args.config} {' '.join(args.overrides)}: {t.num_workers} workers, batch {t.batch_size}, "
          f"{rounds[0]['batches']} batches per worker per epoch, median of {args.rounds} rounds")  # fmt: skip
    print(f"{'fed by':12} {'samples/s':>10} {'data wait':>10} {'× bound':>8}")
    for mode, row in table.items():
        print(
            f"{mode:12} {row['samples_per_s']:10.1f} {100 * row['data_wait_fraction']:9.1f}% "
            f"{row['ratio_to_bound']:8.2f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"config": config.to_dict(), "data": data, "max_rows": args.max_rows, "table": table, "rounds": rounds}
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    ray_data = table["ray_data"]
    fed, wait = ray_data["ratio_to_bound"], ray_data["data_wait_fraction"]
    print(json.dumps({"fed_vs_bound": round(fed, 3), "data_wait": round(wait, 3)}))


if __name__ == "__main__":
    main()
