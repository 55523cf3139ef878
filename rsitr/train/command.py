"""``python -m rsitr.train`` and ``rsitr train``: arguments → config → :func:`rsitr.train.trainer.fit`."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from rsitr.config import build_train_parser, load_config
from rsitr.train.trainer import FitResult, fit

DESCRIPTION = (
    "Train MSA with Ray Train (DDP; gloo on CPU, NCCL on GPU): rank 0 evaluates val each epoch and keeps the best "
    "checkpoint by val mR; test is evaluated once at the end."
)


def build_parser() -> argparse.ArgumentParser:
    """The arguments of ``python -m rsitr.train`` (the same as ``rsitr train``'s)."""
    return build_train_parser(argparse.ArgumentParser(prog="python -m rsitr.train", description=DESCRIPTION))


def run_from_args(args: argparse.Namespace) -> FitResult:
    """Load the config with the CLI's overrides and call :func:`fit`."""
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
    print(
        json.dumps(
            {
                "run_dir": result.run_dir,
                "best_checkpoint": result.best_checkpoint,
                "val": result.val,
                "test": result.test,
            },
            indent=2,
        )
    )
    return result


def main(argv: list[str] | None = None) -> int:
    from rsitr.cli import USER_ERRORS

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        run_from_args(build_parser().parse_args(argv))
    except USER_ERRORS as err:  # one line, as `rsitr train` prints it (Ray's worker tracebacks are above it)
        print(f"python -m rsitr.train: {err}", file=sys.stderr)
        return 2
    return 0
