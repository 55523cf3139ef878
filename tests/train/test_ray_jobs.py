"""The training entry point as a Ray job on a real local cluster of two raylets: `ray job submit` trains across
both, and a flow run cancelled through Prefect stops its job."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ray.job_submission import JobStatus, JobSubmissionClient
from waiting import wait_for

from pipelines.raycluster import _ray_executable, free_port, local_ray_head, stop_process_group
from rsitr.models.checkpoint import RESULT
from rsitr.runtime.raysession import local_ray_environment

PROJECT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Ray head with its job server on 127.0.0.1 (its dashboard URL), and a second raylet joined to it, as a node
    of a cluster would join: two nodes on one machine."""
    logs, gcs_port = tmp_path_factory.mktemp("ray-head"), free_port()
    with local_ray_head(num_cpus=4, gcs_port=gcs_port, log=logs / "head.log") as url:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(local_ray_environment(), RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
        command = [
            _ray_executable(), "start", f"--address=127.0.0.1:{gcs_port}", "--block", "--num-cpus=2",
            "--disable-usage-stats", "--metrics-export-port=0", "--runtime-env-agent-port=0",
            f"--dashboard-agent-listen-port={free_port()}",
        ]  # fmt: skip
        with (logs / "node.log").open("wb") as log:
            node = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for("the second raylet to join", lambda: _alive_nodes(url) == 2, 120, every=1.0, process=node)
            yield url
        finally:
            stop_process_group(node, signal.SIGINT)


def _alive_nodes(url: str) -> int:
    with urllib.request.urlopen(f"{url}/api/v0/nodes?detail=false", timeout=30) as answer:
        return sum(node["state"] == "ALIVE" for node in json.load(answer)["data"]["result"]["result"])


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RSITR_RAY_CLUSTER")}
    return {**env, "RAY_AUTH_MODE": "disabled", **extra}


@pytest.mark.ray
def test_ray_job_submit_trains_across_two_raylets(ray_head: str, demo_shards: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    command = [
        _ray_executable(), "job", "submit", "--address", ray_head, "--submission-id", "submitted-demo", "--",
        "python", "-m", "rsitr.train", "--config", "demo", "--data", str(demo_shards), "--storage", str(runs),
        "--name", "submitted", "--epochs", "1", "--no-test",
        "train.num_workers=2", "train.cpus_per_worker=1", "train.placement_strategy=SPREAD",
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, cwd=PROJECT, env=_env(), timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert JobSubmissionClient(ray_head).get_job_status("submitted-demo") == JobStatus.SUCCEEDED
    result = json.loads((runs / "submitted" / RESULT).read_text())
    assert len(result["history"]) == 1 and result["test"] is None  # --no-test reached the entry point
    assert '"best_checkpoint"' in run.stdout  # the job's own output came back through `ray job submit`
    placed = set(re.findall(r"train worker \d/2 on node (\w+)", run.stdout + run.stderr))
    assert len(placed) == 2, placed  # one DDP worker on each raylet


SERVE = textwrap.dedent(
    """
    from pipelines.train import train_msa
    train_msa.serve(name="cancel-test")
    """
)


@pytest.mark.prefect
@pytest.mark.ray
def test_cancelling_the_flow_run_stops_its_ray_job(
    prefect_harness: None, ray_head: str, demo_shards: Path, tmp_path: Path
) -> None:
    from prefect import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL
    from prefect.states import Cancelling

    env = _env(PREFECT_API_URL=str(PREFECT_API_URL.value()), PREFECT_RUNNER_POLL_FREQUENCY="2", RAY_ADDRESS=ray_head)
    log = open(tmp_path / "runner.log", "wb")  # noqa: SIM115 - closed below
    runner = subprocess.Popen(
        [sys.executable, "-c", SERVE],
        cwd=PROJECT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    jobs = JobSubmissionClient(ray_head)
    try:
        with get_client(sync_client=True) as prefect:

            def deployment() -> Any:
                try:
                    return prefect.read_deployment_by_name("train-msa/cancel-test")
                except Exception:  # not registered yet
                    return None

            wait_for("the served deployment to register", deployment, 120, every=1.0)
            parameters = {"data": str(demo_shards), "config": "demo", "storage_path": str(tmp_path / "runs"),
                          "name": "to-cancel", "epochs": 50}  # fmt: skip
            flow_run = run_deployment("train-msa/cancel-test", parameters=parameters, timeout=0)

            def running_job() -> Any:
                return next(
                    (j for j in jobs.list_jobs() if "to-cancel" in (j.entrypoint or "") and j.status == "RUNNING"), None
                )

            job = wait_for("the flow's Ray job to start", running_job, 300, every=1.0)
            prefect.set_flow_run_state(flow_run.id, Cancelling(), force=True)
            wait_for(
                "the Ray job to stop",
                lambda: jobs.get_job_status(job.submission_id) == JobStatus.STOPPED,
                120,
                every=1.0,
            )
            state = wait_for(
                "the flow run to end Cancelled",
                lambda: (
                    (s := prefect.read_flow_run(flow_run.id).state) is not None and s.type == StateType.CANCELLED and s
                ),
                120,
                every=1.0,
            )
            assert state.is_cancelled()
    finally:
        stop_process_group(runner)
        log.close()
    assert not (tmp_path / "runs" / "to-cancel" / RESULT).exists()
