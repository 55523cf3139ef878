"""The per-worker training loop (inside Ray Train): one step, one epoch, rank-0 evaluation and checkpoints."""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.data
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from rsitr.config import Config, TrainConfig
from rsitr.evaluation.evaluate import evaluate_model
from rsitr.models.msa import MSA, build_model
from rsitr.train import checkpoint as ckpt
from rsitr.train.losses import total_loss
from rsitr.train.optim import make_optimizer, make_scheduler

log = logging.getLogger("rsitr.train")
HISTORY_KEYS = ("epoch", "train_loss", "val_mR", "samples_per_s", "data_wait_fraction")


def gather_batch(local: torch.Tensor) -> torch.Tensor:
    """All workers' embeddings, with gradients flowing only through this worker's own slice.

    Every worker then computes the same global B×B loss; DDP's gradient averaging makes the update the
    global loss's gradient (scaled by 1/world).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local.detach().contiguous())
    parts[dist.get_rank()] = local
    return torch.cat(parts)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class StepLog:
    """Rank 0's training log: every ``every`` steps the loss, samples/s and the fraction of step time spent waiting
    for data go to the job log and, with ``log_dir``, to TensorBoard (tensorboardX event files)."""

    def __init__(self, log_dir: str | None, rank: int, every: int, world: int) -> None:
        self.active = rank == 0
        self.every = max(1, every)
        self.world = world
        self.global_step = 0
        self.window: list[tuple[int, float, float]] = []
        self.writer: Any = None
        if self.active and log_dir:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(log_dir=log_dir, flush_secs=30)

    def step(self, epoch: int, terms: dict[str, torch.Tensor], samples: int, waited: float, took: float) -> None:
        """Record one optimizer step (``took`` seconds in all, ``waited`` of them for data)."""
        self.global_step += 1
        if not self.active:
            return
        self.window.append((samples, waited, took))
        if self.global_step % self.every:
            return
        seen = sum(w[0] for w in self.window) * self.world
        wait = sum(w[1] for w in self.window) / max(sum(w[2] for w in self.window), 1e-9)
        rate = seen / max(sum(w[2] for w in self.window), 1e-9)
        self.window.clear()
        values = {name: float(value.detach()) for name, value in terms.items()}
        log.info(
            "epoch %d step %d loss %.4f samples/s %.1f data-wait %.1f%%",
            epoch,
            self.global_step,
            values["loss"],
            rate,
            100 * wait,
        )
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"train/{name}", value, self.global_step)
            self.writer.add_scalar("train/samples_per_s", rate, self.global_step)
            self.writer.add_scalar("train/data_wait_fraction", wait, self.global_step)

    def epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Record an epoch's summary and validation metrics."""
        if self.writer is None:
            return
        for name, value in metrics.items():
            if name != "epoch":
                self.writer.add_scalar(f"epoch/{name}", value, epoch)
        self.writer.flush()


def stale_for(history: list[dict[str, float]], patience: int) -> bool:
    """Whether the last ``patience`` epochs of ``history`` brought no val mR above the best before them
    (``patience`` 0: never)."""
    if not patience or len(history) <= patience:
        return False
    before = max(h["val_mR"] for h in history[:-patience])
    return all(h["val_mR"] <= before for h in history[-patience:])


def _collective_device() -> torch.device:
    """Where a tensor for a collective must live: NCCL (the GPU backend) moves only CUDA tensors, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _agree(flag: bool) -> bool:
    """Rank 0's decision, shared with every worker (so all stop at the same epoch)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1 if flag else 0], device=_collective_device())
    dist.broadcast(value, src=0)
    return bool(value.item())


def _forward(ddp: Any, batch: dict[str, torch.Tensor]) -> Any:
    """The model on a batch of pixels and tokens, or of frozen-prefix cache rows (:mod:`rsitr.data.frozen_cache`)."""
    if "frozen_scales" in batch:
        return ddp(
            batch["feature_map"],
            None,
            batch["attention_mask"],
            frozen_scales=batch["frozen_scales"],
            text_states=batch["text_states"],
        )
    return ddp(batch["image"], batch["input_ids"], batch["attention_mask"])


def leave_unread_modules_out(model: MSA, config: Config) -> None:
    """Freeze MSCMAT when no loss term reads it: its parameters would get no gradient, which DDP (without its
    unused-parameter search) refuses at the next step."""
    if model.mscmat is not None and not (config.loss.mscma_weight or config.loss.csmmc_weight):
        log.warning("model.mscmat is on but no loss term reads it (loss.mscma_weight, csmmc_weight): left as built")
        model.mscmat.requires_grad_(False)


class TrainStep:
    """One optimizer step: forward, the loss over the (gathered) batch, backward, update (AMP on GPU only)."""

    def __init__(
        self, model: MSA, optimizer: torch.optim.Optimizer, scheduler: Any, config: Config, device: torch.device
    ) -> None:
        leave_unread_modules_out(model, config)
        self.ddp = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})
        self.optimizer, self.scheduler, self.config, self.device = optimizer, scheduler, config, device
        self.amp = device.type == "cuda"
        self.scaler = torch.amp.GradScaler(enabled=self.amp)
        self.gather = gather_batch if config.train.gather_negatives else _local

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.autocast(self.device.type, enabled=self.amp):
            out = _forward(self.ddp, batch)
            labels = self.gather(batch["label"]) if self.config.loss.intra_class_weight else None
            mscmat = [m.float() for m in out.mscmat]
            # each member of a head ensemble learns on its own (its own loss and temperature), as ensembles do
            terms: dict[str, torch.Tensor] = {}
            for image, text, temperature in out.members:
                sim = self.gather(image) @ self.gather(text).t()
                for key, value in total_loss(sim.float(), self.config.loss, mscmat, labels, temperature).items():
                    terms[key] = terms[key] + value if key in terms else value
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(terms["loss"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return terms


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
        size = batch["attention_mask"].shape[0]
        samples += size
        board.step(epoch, terms, size, waited, time.perf_counter() - t0)
    elapsed = time.perf_counter() - started
    return {
        "train_loss": sum(losses) / max(1, len(losses)),
        "samples_per_s": samples * world / max(elapsed, 1e-9),
        "data_wait_fraction": wait / max(elapsed, 1e-9),
    }


# rank 0 keeps a val split this small in memory after its first pass (RSICD val decoded at 260 px: about 0.2 GiB)
VAL_MEMORY_BYTES = 2 * 1024**3


class KeptBatches:
    """A stream of batches read from ``make()`` once and replayed from memory after that, unless its batches come
    to more than ``budget`` bytes (then every pass reads it again).

    Re-reading the val split every epoch re-plans its datasets and starts their actors again, which on a small
    machine costs more than validating does.
    """

    def __init__(self, make: Callable[[], Iterable[dict[str, Any]]], budget: int = VAL_MEMORY_BYTES) -> None:
        self.make, self.budget = make, budget
        self.kept: list[dict[str, Any]] | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.kept is not None:
            yield from self.kept
            return
        kept: list[dict[str, Any]] | None = []
        size = 0
        for batch in self.make():
            if kept is not None:
                own = _owned(batch)
                size += _nbytes(own)
                if size <= self.budget:
                    kept.append(own)
                else:
                    kept = None
            yield batch
        self.kept = kept  # only once the whole split has been read

    def fill(self) -> None:
        """Read the whole stream into memory now; stops reading, keeping nothing, once it outgrows the budget."""
        if self.kept is not None:
            return
        kept, size = [], 0
        for batch in self.make():
            own = _owned(batch)
            size += _nbytes(own)
            if size > self.budget:
                return
            kept.append(own)
        self.kept = kept


def _owned(batch: dict[str, Any]) -> dict[str, Any]:
    # copies: views into Ray's object store would pin its blocks for the whole run
    return {k: np.array(v, copy=True) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


def _nbytes(batch: dict[str, Any]) -> int:
    return sum(v.nbytes for v in batch.values() if isinstance(v, np.ndarray))


class Validation:
    """Rank 0's val metrics, keyed ``val_*``, from the whole val split (kept in memory between epochs).

    The split is read ahead, in a thread, while the first epoch trains: starting its datasets (planning, decode
    and tokenizing tasks) is mostly waiting, which the first validation would otherwise wait through. The
    read starts once ``start`` is set (by the train stream at the first training batch): started at once, it
    competed with the first epoch's own cold start, and that first batch came 4–6 s later on 2 cores. (The run is
    no shorter there: the read then shares the cores with the epoch's steps, which do not wait on it.)
    """

    def __init__(self, train_cfg: TrainConfig, device: torch.device, start: threading.Event) -> None:
        images, captions = ray.train.get_dataset_shard("val_images"), ray.train.get_dataset_shard("val_captions")
        self.images = KeptBatches(lambda: images.iter_batches(batch_size=train_cfg.eval_batch_size))
        self.captions = KeptBatches(lambda: captions.iter_batches(batch_size=256))
        self.rerank_k, self.reverse_weight, self.device = train_cfg.rerank_k, train_cfg.rerank_reverse_weight, device
        self._start = start
        self._read_error: BaseException | None = None
        self._reader: threading.Thread | None = threading.Thread(target=self._read_ahead, name="val-read-ahead")
        self._reader.daemon = True
        self._reader.start()

    def _read_ahead(self) -> None:
        self._start.wait()
        try:
            self.images.fill()
            self.captions.fill()
        except BaseException as error:  # handed to the training thread, which raises it at the first validation
            self._read_error = error

    def __call__(self, model: MSA) -> dict[str, float]:
        if self._reader is not None:
            self._start.set()  # an epoch without a single batch never set it
            self._reader.join()
            self._reader = None
            if self._read_error is not None:
                raise self._read_error
        val = evaluate_model(model, self.images, self.captions, self.device, self.rerank_k, self.reverse_weight)
        return {f"val_{k}": v for k, v in val.items()}


class EpochStream:
    """A worker's train shard, an epoch at a time; the next epoch can be begun early, in a thread.

    Each epoch's stream starts with a global shuffle of the split, which must finish before its first batch. Begun
    as soon as the previous epoch's batches are used up, that shuffle runs while rank 0 validates and saves.
    """

    def __init__(self, shard: Any, batch_size: int, device: torch.device) -> None:
        self.shard, self.batch_size, self.device = shard, batch_size, device
        self.flowing = threading.Event()  # set at the first batch of the run
        self._begun: threading.Thread | None = None
        self._first: tuple[Iterator[dict[str, torch.Tensor]], dict[str, torch.Tensor] | None] | None = None
        self._error: BaseException | None = None

    def _open(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.shard.iter_torch_batches(batch_size=self.batch_size, drop_last=True, device=self.device))

    def begin_next(self) -> None:
        """Start the next epoch's stream now (every worker must, as every worker reads each epoch)."""

        def first_batch() -> None:
            try:
                batches = self._open()
                self._first = (batches, next(batches, None))
            except BaseException as error:  # raised in the training thread when the epoch is read
                self._error = error

        self._begun = threading.Thread(target=first_batch, name="next-epoch", daemon=True)
        self._begun.start()

    def epoch(self) -> Iterator[dict[str, torch.Tensor]]:
        """This epoch's batches: the begun stream's, or a stream opened now."""
        for batch in self._epoch():
            self.flowing.set()
            yield batch

    def _epoch(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._begun is None:
            yield from self._open()
            return
        self._begun.join()
        self._begun, begun, self._first = None, self._first, None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        assert begun is not None
        batches, first = begun
        if first is not None:
            yield first
            yield from batches


class RunStream:
    """A worker's train shard that holds the whole run (:mod:`rsitr.data.run_rows`), read as one stream and cut into
    epochs of ``steps`` batches.

    It is iterated once, so Ray Data never starts it again: between epochs, while rank 0 validates, it goes on
    reading. Every worker's share has the same number of rows (Ray Train's split is ``equal``), so all workers
    take the same number of steps, even when the last epoch comes up short.
    """

    def __init__(self, shard: Any, batch_size: int, device: torch.device, steps: int) -> None:
        self.shard, self.batch_size, self.device, self.steps = shard, batch_size, device, max(1, steps)
        self.flowing = threading.Event()  # set at the first batch of the run
        self._batches: Iterator[dict[str, torch.Tensor]] | None = None

    def begin_next(self) -> None:
        """Nothing to begin: the stream runs on between epochs."""

    def epoch(self) -> Iterator[dict[str, torch.Tensor]]:
        """The next ``steps`` batches of the run (fewer where the run's rows end)."""
        if self._batches is None:
            self._batches = iter(
                self.shard.iter_torch_batches(batch_size=self.batch_size, drop_last=True, device=self.device)
            )
        for _ in range(self.steps):
            batch = next(self._batches, None)
            if batch is None:
                return
            self.flowing.set()
            yield batch


def train_loop(loop_config: dict[str, Any]) -> None:
    """The per-worker training loop (runs inside Ray Train)."""
    config = Config.from_dict(loop_config["config"])
    train_cfg = config.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(train_cfg.cpus_per_worker)))
    torch.manual_seed(train_cfg.seed + rank)
    device = ray.train.torch.get_device()
    # one line per worker, so where the group was placed can be read from the job log
    log.info("train worker %d/%d on node %s (%s)", rank, world, ray.get_runtime_context().get_node_id(), device)
    model = build_model(config.model).to(device)
    optimizer = make_optimizer(model, train_cfg)
    steps_per_epoch = max(1, loop_config["steps_per_epoch"])
    scheduler = make_scheduler(optimizer, steps_per_epoch * train_cfg.epochs, steps_per_epoch)
    start_epoch, started = 0, time.monotonic()
    history: list[dict[str, float]] = []
    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as folder:
            state = ckpt.load_training_state(Path(folder), model, optimizer, scheduler)
        start_epoch, history = int(state["epoch"]) + 1, list(state.get("history", []))
        if rank == 0:
            log.info("resuming at epoch %d", start_epoch)
    step = TrainStep(model, optimizer, scheduler, config, device)
    per_worker = max(2, train_cfg.batch_size // world)
    board = StepLog(loop_config.get("log_dir"), rank, train_cfg.log_every_steps, world)
    shard = ray.train.get_dataset_shard("train")
    stream: EpochStream | RunStream
    if train_cfg.cache_frozen:  # the cache's train dataset holds every epoch of the run (training_datasets)
        stream = RunStream(shard, per_worker, device, steps_per_epoch)
    else:
        stream = EpochStream(shard, per_worker, device)
    validate = Validation(train_cfg, device, start=stream.flowing) if rank == 0 else None
    for epoch in range(start_epoch, train_cfg.epochs):
        metrics: dict[str, float] = {"epoch": epoch, **run_epoch(step, stream.epoch(), board, epoch, world)}
        out_of_time = bool(train_cfg.max_minutes) and time.monotonic() - started > 60 * train_cfg.max_minutes
        if epoch + 1 < train_cfg.epochs and not out_of_time:
            stream.begin_next()  # patience may still stop the run after validation: then this epoch goes unread
        if validate is not None:
            metrics.update(validate(model))
            board.epoch(epoch, metrics)
            log.info("epoch %d %s", epoch, json.dumps({k: round(v, 4) for k, v in metrics.items()}))
            history.append({k: metrics[k] for k in HISTORY_KEYS})
            with tempfile.TemporaryDirectory() as folder:
                ckpt.save_checkpoint(folder, model, optimizer, config, epoch, metrics, scheduler, history)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
        else:
            ray.train.report(metrics, checkpoint=None)
        # only rank 0 evaluates, so only its decision counts (shared by _agree)
        stale = rank == 0 and stale_for(history, train_cfg.patience)
        if _agree(out_of_time or stale):
            if rank == 0 and out_of_time:
                log.info("wall-clock budget of %.1f min reached after epoch %d", train_cfg.max_minutes, epoch)
            elif rank == 0:
                log.info("no val mR gain in %d epochs: stopping early after epoch %d", train_cfg.patience, epoch)
            break
