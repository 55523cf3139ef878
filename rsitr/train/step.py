"""One optimizer step of MSA under DDP, and rank 0's per-step log."""

from __future__ import annotations

import logging
from typing import Any

import ray.train.torch
import torch
import torch.distributed as dist

from rsitr.config import Config
from rsitr.models.msa import MSA
from rsitr.train.losses import total_loss

log = logging.getLogger("rsitr.train")


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
    """One optimizer step: forward, the loss over the (gathered) batch, backward, update (AMP on GPU only).

    Use it as ``terms = step(batch)``; ``terms["loss"]`` is the total, the other keys its weighted parts.
    """

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
        busy = max(sum(w[2] for w in self.window), 1e-9)
        wait, rate = sum(w[1] for w in self.window) / busy, seen / busy
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
