"""``python -m rsitr.train`` and ``rsitr train``: arguments → config → :func:`rsitr.train.trainer.fit`.

Building the parser imports neither torch nor Ray (``rsitr --help`` stays fast): the trainer loads when a run starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import TYPE_CHECKING

from rsitr.config import DEFAULT_PRESET, load_config
from rsitr.errors import UserError

if TYPE_CHECKING:
    from rsitr.train.trainer import FitResult

DESCRIPTION = (
    "Train MSA with Ray Train (DDP; gloo on CPU, NCCL on GPU): rank 0 evaluates val each epoch and keeps the best "
    "checkpoint by val mR; test is evaluated once at the end."
)


def _count(text: str) -> int:
    """argparse type: an integer ≥ 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected a count ≥ 0")
    return int(text)


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the training arguments shared by ``python -m rsitr.train`` and ``rsitr train``."""
    parser.add_argument("--config", default=DEFAULT_PRESET, help="preset name or YAML file")
    parser.add_argument("--data", required=True, help="ingested dataset folder/URI (holds manifest.json)")
    parser.add_argument("--storage", default=".rsitr/runs", help="where runs and checkpoints go")
    parser.add_argument("--name", default=None, help="run name; an existing run of that name resumes")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget for training")
    parser.add_argument("--workers", type=int, default=None, help="Ray Train workers")
    parser.add_argument(
        "--max-failures", type=_count, default=1, help="worker-group restarts from the last checkpoint before giving up"
    )
    parser.add_argument(
        "--no-test",
        action="store_true",
        help="leave the test split unread (runs compared on val; `rsitr eval --split test` reads it later)",
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4")
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The arguments of ``python -m rsitr.train`` (the same as ``rsitr train``'s)."""
    return add_train_arguments(argparse.ArgumentParser(prog="python -m rsitr.train", description=DESCRIPTION))


def run_from_args(args: argparse.Namespace) -> FitResult:
    """Load the config with the command line's overrides and call :func:`rsitr.train.trainer.fit`."""
    from rsitr.train.trainer import fit

    overrides = list(args.overrides)
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    if args.max_minutes is not None:
        overrides.append(f"train.max_minutes={args.max_minutes}")
    if args.workers is not None:
        overrides.append(f"train.num_workers={args.workers}")
    config = load_config(args.config, overrides)
    result = fit(
        config, args.data, args.storage, args.name, max_failures=args.max_failures, evaluate_test=not args.no_test
    )
    summary = {"run_dir": result.run_dir, "best_checkpoint": result.best_checkpoint, "val": result.val}
    print(json.dumps(summary | {"test": result.test}, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m rsitr.train``: exit status 2 with one line for a :class:`UserError`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        run_from_args(build_parser().parse_args(argv))
    except UserError as err:  # one line, as `rsitr train` prints it (Ray's worker tracebacks are above it)
        print(f"python -m rsitr.train: {err}", file=sys.stderr)
        return 2
    return 0
