"""The per-worker training loop (inside Ray Train): epochs of steps, rank-0 validation, checkpoint and report.

The whole iteration is :func:`train_loop`; one step is :class:`rsitr.train.step.TrainStep`, and the streams that
feed it are in :mod:`rsitr.train.feed`.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from rsitr.config import Config
from rsitr.models import checkpoint as ckpt
from rsitr.models.msa import MSA, build_model
from rsitr.train.feed import Validation, open_train_stream
from rsitr.train.optim import make_optimizer, make_scheduler
from rsitr.train.step import StepLog, TrainStep

log = logging.getLogger("rsitr.train")
HISTORY_KEYS = ("epoch", "train_loss", "val_mR", "samples_per_s", "data_wait_fraction")


@dataclass(frozen=True)
class LoopSettings:
    """What every worker's loop is given. It crosses the Ray boundary as a plain dict (:meth:`to_dict`)."""

    config: Config
    steps_per_epoch: int
    log_dir: str | None = None  # TensorBoard event files (rank 0), for runs on local storage

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "steps_per_epoch": self.steps_per_epoch, "log_dir": self.log_dir}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoopSettings:
        return cls(Config.from_dict(data["config"]), int(data["steps_per_epoch"]), data.get("log_dir"))


def stale_for(history: list[dict[str, float]], patience: int) -> bool:
    """Whether the last ``patience`` epochs of ``history`` brought no val mR above the best before them
    (``patience`` 0: never)."""
    if not patience or len(history) <= patience:
        return False
    before = max(h["val_mR"] for h in history[:-patience])
    return all(h["val_mR"] <= before for h in history[-patience:])


def _agree(flag: bool) -> bool:
    """Rank 0's decision, shared with every worker (so all stop at the same epoch)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    # NCCL (the GPU backend) moves only CUDA tensors, gloo CPU ones
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    value = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())


def start_worker(config: Config) -> tuple[int, int, torch.device, MSA]:
    """This worker's rank, the group's size, its device and a fresh model on it (threads and seed set)."""
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(config.train.cpus_per_worker)))
    torch.manual_seed(config.train.seed + rank)
    device = ray.train.torch.get_device()
    # one line per worker, so where the group was placed can be read from the job log
    log.info("train worker %d/%d on node %s (%s)", rank, world, ray.get_runtime_context().get_node_id(), device)
    return rank, world, device, build_model(config.model).to(device)


def run_epoch(
    step: TrainStep, batches: Iterable[dict[str, torch.Tensor]], board: StepLog, epoch: int, world: int
) -> dict[str, float]:
    """Train on every batch; the mean loss, samples/s over all workers and the fraction of time spent waiting for
    data."""
    step.ddp.train()
    losses, samples, wait, started = [], 0, 0.0, time.perf_counter()
    iterator = iter(batches)
    while True:
        t0 = time.perf_counter()
        batch = next(iterator, None)
        waited = time.perf_counter() - t0
        wait += waited
        if batch is None:
            break
        terms = step(batch)
        losses.append(float(terms["loss"].detach()))
        samples += batch["attention_mask"].shape[0]
        board.step(epoch, terms, batch["attention_mask"].shape[0], waited, time.perf_counter() - t0)
    elapsed = max(time.perf_counter() - started, 1e-9)
    return {
        "train_loss": sum(losses) / max(1, len(losses)),
        "samples_per_s": samples * world / elapsed,
        "data_wait_fraction": wait / elapsed,
    }


def train_loop(loop_config: dict[str, Any]) -> None:
    """The per-worker training loop (runs inside Ray Train); ``loop_config`` is a :class:`LoopSettings` dict."""
    settings = LoopSettings.from_dict(loop_config)
    config, t = settings.config, settings.config.train
    rank, world, device, model = start_worker(config)
    optimizer = make_optimizer(model, t)
    steps = max(1, settings.steps_per_epoch)
    scheduler = make_scheduler(optimizer, steps * t.epochs, steps)
    started = time.monotonic()  # train.max_minutes counts from here
    start_epoch, history = _resume(model, optimizer, scheduler, rank)
    step = TrainStep(model, optimizer, scheduler, config, device)
    board = StepLog(settings.log_dir, rank, t.log_every_steps, world)
    stream = open_train_stream(ray.train.get_dataset_shard("train"), t, max(2, t.batch_size // world), device, steps)
    validate = Validation(t, device, start=stream.flowing) if rank == 0 else None
    for epoch in range(start_epoch, t.epochs):
        metrics: dict[str, float] = {"epoch": epoch, **run_epoch(step, stream.epoch(), board, epoch, world)}
        out_of_time = bool(t.max_minutes) and time.monotonic() - started > 60 * t.max_minutes
        if epoch + 1 < t.epochs and not out_of_time:
            stream.begin_next()  # patience may still stop the run after validation: then this epoch goes unread
        if validate is None:
            ray.train.report(metrics, checkpoint=None)
        else:
            metrics.update(validate(model))
            board.epoch(epoch, metrics)
            log.info("epoch %d %s", epoch, json.dumps({k: round(v, 4) for k, v in metrics.items()}))
            history.append({k: metrics[k] for k in HISTORY_KEYS})
            with tempfile.TemporaryDirectory() as folder:
                ckpt.save_checkpoint(folder, model, optimizer, config, epoch, metrics, scheduler, history)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
        stale = rank == 0 and stale_for(history, t.patience)  # only rank 0 validates; _agree shares its decision
        if _agree(out_of_time or stale):
            if rank == 0 and out_of_time:
                log.info("wall-clock budget of %.1f min reached after epoch %d", t.max_minutes, epoch)
            elif rank == 0:
                log.info("no val mR gain in %d epochs: stopping early after epoch %d", t.patience, epoch)
            break


def _resume(model: MSA, optimizer: Any, scheduler: Any, rank: int) -> tuple[int, list[dict[str, float]]]:
    """The epoch to start at and the history so far: from the checkpoint Ray Train hands a restarted run."""
    resume = ray.train.get_checkpoint()
    if resume is None:
        return 0, []
    with resume.as_directory() as folder:
        state = ckpt.load_training_state(Path(folder), model, optimizer, scheduler)
    if rank == 0:
        log.info("resuming at epoch %d", int(state["epoch"]) + 1)
    return int(state["epoch"]) + 1, list(state.get("history", []))
