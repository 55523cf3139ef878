"""Distributed MSA training with Ray Train; ``python -m rsitr.train`` is the Ray job entry point.

Each worker reads its share of the training split from Ray Data (decoded and tokenised there), trains the
model under DDP (gloo on CPU, NCCL on GPU) and reports every epoch. Rank 0 evaluates the full validation split,
writes the checkpoint and logs; the best checkpoint by val mR is kept, and test is evaluated once at the end.

The names below load on first use, so ``rsitr.train.checkpoint`` and ``rsitr.train.losses`` (read by the
retrieval side) do not import Ray Train.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rsitr.train.command import build_parser, main, run_from_args
    from rsitr.train.loop import HISTORY_KEYS, StepLog, TrainStep, gather_batch, run_epoch, stale_for, train_loop
    from rsitr.train.optim import make_optimizer, make_scheduler
    from rsitr.train.trainer import FitResult, fit, training_datasets

_HOME = {
    "build_parser": "command",
    "main": "command",
    "run_from_args": "command",
    "FitResult": "trainer",
    "fit": "trainer",
    "training_datasets": "trainer",
    "HISTORY_KEYS": "loop",
    "StepLog": "loop",
    "TrainStep": "loop",
    "gather_batch": "loop",
    "run_epoch": "loop",
    "stale_for": "loop",
    "train_loop": "loop",
    "make_optimizer": "optim",
    "make_scheduler": "optim",
}
__all__ = [
    "FitResult",
    "HISTORY_KEYS",
    "StepLog",
    "TrainStep",
    "build_parser",
    "fit",
    "gather_batch",
    "main",
    "make_optimizer",
    "make_scheduler",
    "run_epoch",
    "run_from_args",
    "stale_for",
    "train_loop",
    "training_datasets",
]


if not TYPE_CHECKING:  # type checkers see the imports above; at run time each name loads on first use

    def __getattr__(name: str) -> Any:
        module = _HOME.get(name)
        if module is None:
            raise AttributeError(f"module 'rsitr.train' has no attribute {name!r}")
        return getattr(importlib.import_module(f"rsitr.train.{module}"), name)
