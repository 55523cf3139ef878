"""Prefect flow ``train-msa``: submit ``python -m rsitr.train`` as a Ray job, follow it, publish its metrics.

The job goes to ``RAY_ADDRESS`` (a Ray dashboard URL such as ``http://head:8265``) or, when that is unset, to
a local Ray head that the flow starts and stops. Cancelling the flow run stops the job.
"""

from __future__ import annotations

import base64
import io
import os
import shlex
import time
import uuid
from contextlib import ExitStack
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_image_artifact, create_table_artifact
from prefect.states import Cancelled, State

from pipelines.raycluster import local_ray_head
from rsitr.config import DEFAULT_PRESET, unique_run_name
from rsitr.evaluation.metrics import METRIC_KEYS
from rsitr.io import shards, storage
from rsitr.models.checkpoint import RESULT

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class MissingDataError(FileNotFoundError):
    """The dataset to train on has not been ingested."""


def require_dataset(data: str) -> None:
    """Fail at once, saying what to ingest and how, when ``data`` holds no ingested dataset."""
    try:
        shards.read_manifest(data)
    except shards.ShardsNotFoundError as err:
        root = storage.resolve(data)
        name = root.rstrip("/").rsplit("/", 1)[-1]
        parent = root.rstrip("/").rsplit("/", 1)[0]
        raise MissingDataError(
            f"no ingested dataset at {root}. Ingest it first, e.g. `rsitr ingest corpus --images <{name} images> "
            f"--captions <{name} captions file> --dataset {name} --out {parent}` (or `rsitr ingest folder`)"
        ) from err


def entrypoint(
    config: str,
    data: str,
    storage_path: str,
    name: str,
    epochs: int | None,
    max_minutes: float | None,
    overrides: list[str],
) -> str:
    """The command line of the Ray job (the same one people pass to ``ray job submit``)."""
    parts = [
        "python",
        "-m",
        "rsitr.train",
        "--config",
        config,
        "--data",
        data,
        "--storage",
        storage_path,
        "--name",
        name,
    ]
    if epochs is not None:
        parts += ["--epochs", str(epochs)]
    if max_minutes is not None:
        parts += ["--max-minutes", str(max_minutes)]
    return shlex.join(parts + list(overrides))


def submit_with_retry(client: Any, command: str, job_id: str, timeout_s: float = 120.0) -> None:
    """Submit a job; a head that just started may answer before its job agent is up, so retry that case."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.submit_job(entrypoint=command, submission_id=job_id)
            return
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def follow_job(address: str, command: str, job_id: str, poll_s: float = 2.0) -> str:
    """Submit, stream logs into the flow run's log, and return the terminal status; stop the job on exit."""
    from ray.job_submission import JobSubmissionClient

    logger = get_run_logger()
    client = JobSubmissionClient(address)
    submit_with_retry(client, command, job_id)
    logger.info("submitted Ray job %s to %s: %s", job_id, address, command)
    shown, status = 0, "PENDING"
    try:
        while status not in TERMINAL:
            time.sleep(poll_s)
            status = str(client.get_job_status(job_id).value)
            logs = client.get_job_logs(job_id)
            for line in logs[shown:].splitlines():
                if line.strip() and "Loading weights" not in line:
                    logger.info("%s", line)
            shown = len(logs)
    finally:
        if status not in TERMINAL:
            logger.warning("flow run ended before Ray job %s; stopping the job", job_id)
            client.stop_job(job_id)
    return status


@flow(name="train-msa", log_prints=True)
def train_msa(
    data: str,
    config: str = DEFAULT_PRESET,
    storage_path: str = ".rsitr/runs",
    name: str | None = None,
    epochs: int | None = None,
    max_minutes: float | None = None,
    overrides: list[str] | None = None,
    ray_address: str | None = None,
) -> dict[str, Any] | State:
    """Train MSA on an ingested dataset as a Ray job and return the run's result (best checkpoint, metrics).

    Ray job states map to the flow run's: SUCCEEDED → Completed, STOPPED → Cancelled, FAILED → Failed.

    Args:
        data: ingested dataset folder/URI (holds ``manifest.json``).
        config: preset name or YAML file.
        storage_path: where runs and checkpoints go.
        name: run name; an existing run of that name resumes. Default: a new unique name.
        epochs: override the preset's epochs.
        max_minutes: wall-clock budget for training.
        overrides: dotted config overrides (``train.lr=1e-4``).
        ray_address: Ray dashboard URL; default ``RAY_ADDRESS``, else a local head started for this run.
    """
    require_dataset(data)
    data, storage_path = storage.resolve(data), storage.resolve(storage_path)
    name = name or unique_run_name(config.rsplit("/", 1)[-1].removesuffix(".yaml"))
    command = entrypoint(config, data, storage_path, name, epochs, max_minutes, overrides or [])
    job_id = f"train-msa-{name}-{uuid.uuid4().hex[:6]}"
    with ExitStack() as stack:
        address = ray_address or os.environ.get("RAY_ADDRESS")
        if not address or not address.startswith("http"):
            address = stack.enter_context(local_ray_head())
        status = follow_job(address, command, job_id)
    if status == "STOPPED":  # stopped from Ray's side (dashboard, `ray job stop`): the run was cancelled, not failed
        return Cancelled(message=f"Ray job {job_id} was stopped")
    if status != "SUCCEEDED":
        raise RuntimeError(f"Ray job {job_id} ended {status}; see the flow run's log for its output")
    result: dict[str, Any] = storage.read_json(storage.join(storage_path, name, RESULT))
    rows = [
        {"split": split, **{k: round(result[split][k], 2) for k in METRIC_KEYS}}
        for split in ("val", "test")
        if result.get(split)
    ]
    create_table_artifact(key="train-msa-recall", table=rows, description=f"R@K of run {name} (best on val)")
    if result.get("history"):
        png = training_curve(result["history"], name)
        storage.write_bytes_atomic(storage.join(storage_path, name, "training_curve.png"), png)
        create_image_artifact(
            image_url="data:image/png;base64," + base64.b64encode(png).decode(),
            key="train-msa-curve",
            description=f"Training loss and val mR per epoch of run {name}",
        )
    return result


def training_curve(history: list[dict[str, float]], title: str) -> bytes:
    """PNG of the training loss and the validation mR per epoch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [int(h["epoch"]) for h in history]
    figure = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(figure)
    loss_axis = figure.add_subplot()
    loss_axis.plot(epochs, [h["train_loss"] for h in history], "o-", color="tab:blue")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("train loss", color="tab:blue")
    recall_axis = loss_axis.twinx()
    recall_axis.plot(epochs, [h.get("val_mR", float("nan")) for h in history], "s-", color="tab:orange")
    recall_axis.set_ylabel("val mR (%)", color="tab:orange")
    loss_axis.set_title(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
