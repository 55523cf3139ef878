"""Distributed MSA training with Ray Train; ``python -m rsitr.train`` is the Ray job entry point.

Each worker reads its share of the training split from Ray Data (decoded and tokenised there), trains the
model under DDP (gloo on CPU, NCCL on GPU) and reports every epoch. Rank 0 evaluates the full validation split,
writes the checkpoint and logs; the best checkpoint by val mR is kept, and test is evaluated once at the end.
"""

from rsitr.train.command import build_parser, main, run_from_args
from rsitr.train.fit import FitResult, evaluate_checkpoint, fit, training_datasets
from rsitr.train.loop import HISTORY_KEYS, StepLog, TrainStep, gather_batch, run_epoch, stale_for, train_loop
from rsitr.train.optim import make_optimizer, make_scheduler

__all__ = [
    "HISTORY_KEYS",
    "FitResult",
    "StepLog",
    "TrainStep",
    "build_parser",
    "evaluate_checkpoint",
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
