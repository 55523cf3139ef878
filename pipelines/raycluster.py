"""Where flows send Ray jobs: ``RAY_ADDRESS`` (a dashboard URL), or a local head they start and stop."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class PortInUseError(RuntimeError):
    """A port the local stack needs is taken."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ensure_port_free(port: int, what: str, variable: str | None = None) -> None:
    """Raise a one-line error naming ``what`` when ``port`` is taken on 127.0.0.1."""
    with socket.socket() as sock:
        if sock.connect_ex(("127.0.0.1", port)) == 0:
            hint = f" (set {variable} to use another)" if variable else ""
            raise PortInUseError(f"port {port} for {what} is already in use{hint}")


def wait_http(url: str, timeout: float, what: str, process: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until ``url`` answers 200; fail early if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode} while starting")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not answer at {url} within {timeout:.0f} s")


def stop_process_group(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    """Signal a child's whole process group and wait for it, then kill what is left of the group."""
    try:
        if process.poll() is None:
            os.killpg(process.pid, sig)
            process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    with contextlib.suppress(ProcessLookupError):  # the leader has gone; helpers it started in its group may not have
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _ray_executable() -> str:
    local = Path(sys.executable).parent / "ray"
    return str(local) if local.exists() else (shutil.which("ray") or "ray")


@contextmanager
def local_ray_head(
    num_cpus: int = 4, dashboard_port: int | None = None, gcs_port: int | None = None, log: Path | None = None
) -> Iterator[str]:
    """Start a Ray head on 127.0.0.1 (job server included) and yield its dashboard URL; stop it on exit.

    It declares ``num_cpus`` logical CPUs (default 4, even on 2 cores) so Ray Data keeps CPUs beside the
    training workers. Token auth is disabled: the head only listens for this machine's jobs.
    """
    from rsitr.runtime.raysession import local_ray_environment  # imports Ray: only once a head is wanted

    dashboard_port = dashboard_port or free_port()
    gcs_port = gcs_port or free_port()
    ensure_port_free(dashboard_port, "the Ray dashboard", "RSITR_RAY_DASHBOARD_PORT")
    ensure_port_free(gcs_port, "the Ray head", "RSITR_RAY_PORT")
    # Short and private: Ray keeps unix sockets here, whose paths have a ~107 character limit.
    temp_dir = tempfile.mkdtemp(prefix="rsitr-ray-")
    # Jobs run `python -m rsitr.train`: put this interpreter's folder first so `python` is this environment.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, **local_ray_environment(), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env["PATH"] = path
    env.pop("RAY_ADDRESS", None)
    command = [
        _ray_executable(),
        "start",
        "--head",
        "--block",
        f"--port={gcs_port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--num-cpus={num_cpus}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        # Private agent ports, so this head can run beside another Ray on the same machine (its defaults clash).
        f"--dashboard-agent-listen-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        "--metrics-export-port=0",
        "--runtime-env-agent-port=0",
        "--include-dashboard=true",
    ]
    sink = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard_port}"
    try:
        wait_http(f"{url}/api/version", 120, "the Ray head", process)
        yield url
    finally:
        # `ray start --block` stops its processes on Ctrl-C; a SIGTERM leaves it running until the timeout
        stop_process_group(process, signal.SIGINT)
        if log:
            sink.close()  # type: ignore[union-attr]
        shutil.rmtree(temp_dir, ignore_errors=True)
