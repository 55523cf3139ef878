"""Starting a local Ray: its workers get the environment that sizes Ray Data for this machine."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rsitr.runtime.raysession import FOOTER_ACTORS_VARIABLE, local_ray_environment

PROJECT = Path(__file__).resolve().parents[1]

WORKER_ENVIRONMENT = """
import json, os, ray
from rsitr.runtime.raysession import FOOTER_ACTORS_VARIABLE, init_ray
init_ray()
print(json.dumps(ray.get(ray.remote(lambda: os.environ.get(FOOTER_ACTORS_VARIABLE)).remote())))
ray.shutdown()
"""


def test_a_machine_gets_one_footer_reader_per_eight_cores_unless_one_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FOOTER_ACTORS_VARIABLE, raising=False)
    expected = max(1, min(32, (os.cpu_count() or 1) // 8))
    assert local_ray_environment() == {FOOTER_ACTORS_VARIABLE: str(expected)}
    monkeypatch.setenv(FOOTER_ACTORS_VARIABLE, "6")
    assert local_ray_environment() == {FOOTER_ACTORS_VARIABLE: "6"}


@pytest.mark.ray
def test_the_workers_of_a_local_ray_read_it_from_their_environment() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RSITR_RAY_CLUSTER", FOOTER_ACTORS_VARIABLE)}
    run = subprocess.run(
        [sys.executable, "-c", WORKER_ENVIRONMENT], capture_output=True, text=True, cwd=PROJECT, env=env, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen == str(max(1, min(32, (os.cpu_count() or 1) // 8)))
