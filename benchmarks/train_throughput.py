"""Training-loop throughput fed by Ray Data (the product's path) vs by the same batches held in memory (the bound).

One TorchTrainer worker group runs the real training step (:class:`rsitr.train.step.TrainStep`): ``rounds`` epochs on
batches held in memory (read by a stream of their own beforehand; half of these epochs run before the streamed ones
and half after, none beside them) and ``1 + rounds`` epochs back to back, streamed exactly as ``rsitr.train`` streams
them: from the frozen-prefix cache, one stream for the whole run (:class:`rsitr.train.feed.RunStream`); from shards,
one per epoch (read, shuffle, decode, tokenise). Samples/s are over all workers; data wait is the fraction of epoch
time spent waiting for the next batch. The first streamed epoch carries the stream's start; the later ones show
whether the stream keeps up. Nothing validates between epochs here, so nothing hides a per-epoch start, and on a
small machine the stream's work shares the cores with the steps. Prints a table, writes JSON.

Usage: ``python -m benchmarks.train_throughput [--config msa-lite0-minilm] [--data URI] [--rounds 3] [key=value …]``
(without ``--data``: RSICD as ``benchmarks.quality`` ingests it, else the generated demo corpus). ``--quick``: the
generated demo corpus (306 train rows), 6 rounds (a few minutes). The last line printed is one JSON object:
``fed_vs_bound`` (the later streamed epochs' samples/s over the bound's), ``data_wait`` (their wait fraction),
``first_epoch_vs_bound`` and ``all_epochs_vs_bound``.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
from ray.train import DataConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from benchmarks.common import RESULTS, ROOT
from rsitr.config import Config, load_config
from rsitr.io import shards, storage
from rsitr.runtime.raysession import init_ray
from rsitr.train.feed import open_train_stream
from rsitr.train.loop import run_epoch, start_worker
from rsitr.train.optim import make_optimizer, make_scheduler
from rsitr.train.step import StepLog, TrainStep
from rsitr.train.trainer import training_datasets

INGESTED_RSICD = ROOT / ".rsitr" / "quality" / "data" / "rsicd"  # where benchmarks.quality ingests it


def worker_loop(loop_config: dict[str, Any]) -> None:
    config = Config.from_dict(loop_config["config"])
    rank, world, device, model = start_worker(config)  # as rsitr.train.loop.train_loop starts a worker
    optimizer = make_optimizer(model, config.train)
    step = TrainStep(model, optimizer, make_scheduler(optimizer, 10**6, 10), config, device)
    board = StepLog(None, rank, 10**9, world)
    per_worker = max(2, config.train.batch_size // world)
    # the bound's input: this worker's batches of one epoch, decoded and tokenised, read by a stream of their own
    bound_shard = ray.train.get_dataset_shard("bound")
    in_memory = list(bound_shard.iter_torch_batches(batch_size=per_worker, drop_last=True, device=device))
    run_epoch(step, in_memory, board, 0, world)  # warm-up (allocator, thread pools)
    rounds = loop_config["rounds"]
    # half the bound's epochs before the stream and half after (the machine drifts), none while it runs
    before = rounds - rounds // 2
    bound = [run_epoch(step, in_memory, board, 1 + i, world) for i in range(before)]
    # then the product's stream (rsitr.train.loop), epochs back to back; it is opened only now, so nothing read
    # ahead while the bound ran
    stream = open_train_stream(ray.train.get_dataset_shard("train"), config.train, per_worker, device, len(in_memory))
    fed = []
    for i in range(1 + rounds):
        fed.append(run_epoch(step, stream.epoch(), board, 1 + rounds + i, world))
        if i < rounds:
            stream.begin_next()
    bound += [run_epoch(step, in_memory, board, 2 + 2 * rounds + i, world) for i in range(rounds // 2)]
    if rank == 0:  # the driver reads the rounds from here (result.metrics is empty without a checkpoint)
        record = {"bound": bound, "fed": fed, "batches": len(in_memory), "batch": per_worker * world}
        Path(loop_config["rounds_file"]).write_text(json.dumps(record))
    ray.train.report({"rounds": rounds})


def _default_data(work: Path, demo: bool = False) -> str:
    if not demo and (INGESTED_RSICD / "manifest.json").is_file():
        return str(INGESTED_RSICD)
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
    parser.add_argument("--rounds", type=int, default=3, help="epochs of each kind (one more streamed)")
    parser.add_argument("--max-rows", type=int, default=2048, help="train rows per epoch (0: the whole split)")
    parser.add_argument("--out", default=str(RESULTS / "train_throughput.json"))
    parser.add_argument("--quick", action="store_true", help="the demo corpus (306 train rows), 6 rounds")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.quick:
        args.max_rows, args.rounds = 512, 6
    logging.basicConfig(level=logging.WARNING)
    config = load_config(args.config, args.overrides)
    with tempfile.TemporaryDirectory() as work:
        data = storage.resolve(args.data or _default_data(Path(work), demo=args.quick))
        init_ray()
        train_rows = shards.read_manifest(data)["splits"]["train"]["rows"]
        rows = min(args.max_rows, train_rows) if args.max_rows else train_rows
        one_stream = config.train.cache_frozen  # as rsitr.train.trainer.fit streams it
        # a dataset of a whole run (the cache's) must hold every streamed epoch: 1 + rounds of ``rows`` rows
        epochs = -(-(1 + args.rounds) * rows // train_rows) + 1 if one_stream else 1
        streamed = load_config(args.config, [*args.overrides, f"train.epochs={epochs}"])
        train = training_datasets(streamed, data, storage.resolve(args.storage))["train"]
        bound = training_datasets(load_config(args.config, [*args.overrides, "train.epochs=1"]), data,
                                  storage.resolve(args.storage))["train"].limit(rows)  # fmt: skip
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
            datasets={"train": train if one_stream else train.limit(rows), "bound": bound},
            dataset_config=DataConfig(datasets_to_split=["train", "bound"]),
            run_config=RunConfig(name="train-throughput", storage_path=work),
        ).fit()
        if result.error is not None:
            raise result.error
        record = json.loads((Path(work) / "rounds.json").read_text())

    def seconds(epoch: dict[str, float]) -> float:
        return record["batches"] * record["batch"] / epoch["samples_per_s"]

    def row(epochs: list[dict[str, float]]) -> dict[str, float]:
        """samples/s and wait over the epochs together (each epoch has the same batches)"""
        total = sum(seconds(e) for e in epochs)
        wait = sum(e["data_wait_fraction"] * seconds(e) for e in epochs) / total
        return {"samples_per_s": len(epochs) * record["batches"] * record["batch"] / total, "data_wait_fraction": wait}

    fed = record["fed"]
    table = {
        "in memory (bound)": row(record["bound"]),
        "Ray Data, first epoch": row(fed[:1]),
        "Ray Data, later epochs": row(fed[1:]),
        "Ray Data, all epochs": row(fed),
    }
    limit = table["in memory (bound)"]["samples_per_s"]
    for entry in table.values():
        entry["ratio_to_bound"] = entry["samples_per_s"] / limit
    stream = "one stream for the run" if one_stream else "one stream per epoch"
    print(f"\n{args.config} {' '.join(args.overrides)}: {t.num_workers} workers, batch {record['batch']}, "
          f"{record['batches']} batches per worker per epoch, {args.rounds} in-memory epochs (half before, half after) "
          f"and {1 + args.rounds} streamed back to back ({stream})")  # fmt: skip
    print(f"{'fed by':24} {'samples/s':>10} {'data wait':>10} {'× bound':>8}")
    for name, entry in table.items():
        print(
            f"{name:24} {entry['samples_per_s']:10.1f} {100 * entry['data_wait_fraction']:9.1f}% "
            f"{entry['ratio_to_bound']:8.2f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"config": config.to_dict(), "data": data, "rows": rows, "one_stream": one_stream, "table": table,
              "epochs": record}  # fmt: skip
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    later, first, whole = (table[f"Ray Data, {k}"] for k in ("later epochs", "first epoch", "all epochs"))
    summary = {
        "fed_vs_bound": later["ratio_to_bound"],
        "data_wait": later["data_wait_fraction"],
        "first_epoch_vs_bound": first["ratio_to_bound"],
        "all_epochs_vs_bound": whole["ratio_to_bound"],
    }
    print(json.dumps({k: round(v, 3) for k, v in summary.items()}))


if __name__ == "__main__":
    main()
