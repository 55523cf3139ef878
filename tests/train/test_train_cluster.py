"""Ray Train on real multi-process Ray: a worker killed mid-training (two raylets: tests/train/test_ray_jobs.py)."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from waiting import wait_for

from rsitr.models.checkpoint import RESULT

pytestmark = [pytest.mark.ray]

PROJECT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RSITR_RAY_CLUSTER")}


def test_a_killed_worker_is_restarted_and_training_resumes_from_the_checkpoint(
    demo_shards: Path, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    command = [
        sys.executable, "-m", "rsitr.train", "--config", "demo", "--data", str(demo_shards), "--storage", str(runs),
        "--name", "killed", "--epochs", "2", "--no-test", "train.num_workers=2",
    ]  # fmt: skip
    log = (tmp_path / "train.log").open("w")
    # its own session: on a failure the trainer and the local Ray it started are stopped together
    trainer = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, cwd=PROJECT, env=_env(), start_new_session=True
    )
    try:
        # then epoch 1 is training
        checkpoint = lambda: _records_a_checkpoint(runs / "killed")  # noqa: E731
        wait_for(
            "Ray Train to record a checkpoint", checkpoint, 600, every=0.5, process=trainer, log=tmp_path / "train.log"
        )
        # this run's own live workers, as its log names them (other Ray instances may run on the machine)
        named = re.findall(r"\(RayTrainWorker pid=(\d+)\)", (tmp_path / "train.log").read_text())
        victims = sorted(int(pid) for pid in set(named) if Path(f"/proc/{pid}").exists())
        assert victims, f"no live Ray Train worker of this run found in its log (named: {sorted(set(named))})"
        os.kill(victims[0], signal.SIGKILL)
        assert trainer.wait(timeout=900) == 0, (tmp_path / "train.log").read_text()[-3000:]
    finally:
        if trainer.poll() is None:
            os.killpg(trainer.pid, signal.SIGKILL)
            trainer.wait()
    log.close()
    output = (tmp_path / "train.log").read_text()
    assert "resuming at epoch 1" in output
    history = json.loads((runs / "killed" / RESULT).read_text())["history"]
    assert [h["epoch"] for h in history] == [0, 1]


def _records_a_checkpoint(run: Path) -> bool:
    """Whether Ray Train has recorded a checkpoint of ``run`` (what a restarted group resumes from)."""
    try:
        return bool(json.loads((run / "checkpoint_manager_snapshot.json").read_text()).get("checkpoint_results"))
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return False
