"""``make demo``: the whole pipeline through Prefect deployments, on a local stack it starts and stops.

Starts a Prefect server, a process worker and a Ray head on 127.0.0.1 (state under ``./.rsitr/``), deploys
``prefect.yaml``, runs ``ingest/demo`` → ``train-msa/demo`` → ``index-archive/demo`` the way users do
(``prefect deployment run … --watch``), then answers a few text queries and prints test R@K next to chance.
Every service it started is stopped on success, failure and Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from pipelines.raycluster import ensure_port_free, local_ray_head, stop_process_group, wait_http
from rsitr.config import unique_run_name
from rsitr.runtime.locks import LockHeldError, pid_lock

PROJECT = Path(__file__).resolve().parent.parent
QUERIES = [
    "a river crosses dense forest",
    "a lake in the north of an area of farmland",
    "three red roofed buildings beside a road",
]
POOL = "rsitr-local"


class DemoError(RuntimeError):
    """A demo precondition that failed (busy port, second instance, missing data)."""


@contextmanager
def single_instance(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock for the demo's lifetime; a second demo fails at once."""
    try:
        with pid_lock(lock_path):
            yield
    except LockHeldError as err:
        raise DemoError(f"another demo is running (pid {err.holder}; lock {lock_path})") from None


def _prefect_bin() -> str:
    return str(Path(sys.executable).parent / "prefect")


@contextmanager
def prefect_server(home: Path, port: int, log: Path) -> Iterator[dict[str, str]]:
    """A Prefect server on 127.0.0.1:``port`` with its database in ``home``; yields the client environment."""
    ensure_port_free(port, "the Prefect server", "RSITR_PREFECT_PORT")
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_UI_ENABLED": "false",
    }
    home.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as sink:
        process = subprocess.Popen(
            [_prefect_bin(), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_http(f"http://127.0.0.1:{port}/api/health", 120, "the Prefect server", process)
            yield env
        finally:
            stop_process_group(process)


@contextmanager
def prefect_worker(env: dict[str, str], log: Path) -> Iterator[None]:
    """A process worker on the ``rsitr-local`` pool (stopped with SIGINT, as Prefect expects)."""
    with log.open("ab") as sink:
        process = subprocess.Popen(
            [_prefect_bin(), "worker", "start", "--pool", POOL],
            env=env,
            cwd=PROJECT,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield
        finally:
            stop_process_group(process, signal.SIGINT)


def prefect(env: dict[str, str], *args: str, log: Path) -> None:
    """Run a ``prefect`` CLI command; fail with its last output lines when it fails."""
    with log.open("ab") as sink:
        sink.write(f"\n$ prefect {' '.join(args)}\n".encode())
        sink.flush()
        done = subprocess.run(
            [_prefect_bin(), *args], env=env, cwd=PROJECT, stdout=sink, stderr=subprocess.STDOUT, check=False
        )
    if done.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        raise DemoError(
            f"`prefect {' '.join(args[:3])}` failed (exit {done.returncode}); log {log}:\n" + "\n".join(tail)
        )


def run_deployment(env: dict[str, str], name: str, params: dict[str, object], log: Path) -> None:
    """``prefect deployment run NAME --watch`` with parameters, timed."""
    started = time.monotonic()
    print(f"→ prefect deployment run {name}", flush=True)
    prefect(env, "deployment", "run", name, "--params", json.dumps(params), "--watch", log=log)
    print(f"  {name} completed in {time.monotonic() - started:.0f} s", flush=True)


def report(run_dir: Path, index: Path) -> None:
    """Print the test metrics next to chance, then the top hits of a few queries."""
    from rsitr.evaluation.metrics import chance_metrics, format_metrics
    from rsitr.retrieval.search import Searcher

    result = json.loads((run_dir / "result.json").read_text())
    test = result["test"]
    chance = chance_metrics(int(test["images"]), test["captions"] / test["images"])
    print()
    print(format_metrics(test, f"Test split: {int(test['images'])} images, {int(test['captions'])} captions"))
    print(format_metrics(chance, "Chance level (random ranking)"))
    print(f"best checkpoint (by val mR {result['val']['mR']:.2f}): {result['best_checkpoint']}")
    searcher = Searcher(str(index))
    for query in QUERIES:
        print(f"\nquery: {query!r}")
        for hit in searcher.search(query, k=5):
            print(f"  {hit.rank}. {hit.score:.3f}  {hit.image_id}  {hit.acquired_at}  {hit.footprint}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=None, help="corpus folder instead of the generated demo corpus")
    parser.add_argument("--epochs", type=int, default=None)
    args = parser.parse_args(argv)
    state = PROJECT / ".rsitr"
    logs = state / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / "demo.log"
    started = time.monotonic()
    try:
        if args.data and not Path(args.data).is_dir():
            raise DemoError(f"DATA folder {args.data} does not exist")
        dataset = Path(args.data).name.lower() if args.data else "demo"
        run_name = unique_run_name("demo")
        with ExitStack() as stack:
            stack.enter_context(single_instance(state / "demo.lock"))
            port = int(os.environ.get("RSITR_PREFECT_PORT", "4217"))
            dash = int(os.environ.get("RSITR_RAY_DASHBOARD_PORT", "8277"))
            ray_port = int(os.environ.get("RSITR_RAY_PORT", "6391"))
            print(
                f"starting Prefect server (127.0.0.1:{port}) and Ray head (dashboard 127.0.0.1:{dash}); logs in {logs}",
                flush=True,
            )
            env = stack.enter_context(prefect_server(state / "prefect", port, logs / "prefect-server.log"))
            ray_url = stack.enter_context(local_ray_head(4, dash, ray_port, logs / "ray-head.log"))
            env = {
                **env,
                "RAY_ADDRESS": ray_url,
                "RAY_AUTH_MODE": "disabled",
                "RSITR_RAY_CLUSTER": f"127.0.0.1:{ray_port}",
                "RSITR_PROJECT_DIR": str(PROJECT),
                "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            }
            prefect(env, "work-pool", "create", POOL, "--type", "process", "--overwrite", log=log)
            prefect(env, "--no-prompt", "deploy", "--all", log=log)
            stack.enter_context(prefect_worker(env, logs / "prefect-worker.log"))
            ingest_params: dict[str, object] = {"dataset": dataset}
            if args.data:
                ingest_params["source"] = str(Path(args.data).resolve())
            run_deployment(env, "ingest/demo", ingest_params, log)
            train_params: dict[str, object] = {"data": f".rsitr/data/{dataset}", "name": run_name}
            if args.epochs:
                train_params["epochs"] = args.epochs
            run_deployment(env, "train-msa/demo", train_params, log)
            index_dir = state / "index" / dataset
            run_deployment(
                env,
                "index-archive/demo",
                {"checkpoint": f".rsitr/runs/{run_name}", "data": f".rsitr/data/{dataset}", "out": str(index_dir)},
                log,
            )
            report(state / "runs" / run_name, index_dir)
            print("\nstopping services…", flush=True)
    except KeyboardInterrupt:
        print("\ndemo interrupted: every service it started has been stopped", file=sys.stderr)
        return 130
    except (DemoError, OSError, TimeoutError, RuntimeError) as err:
        print(f"demo failed: {err}", file=sys.stderr)
        return 1
    print(f"demo finished in {time.monotonic() - started:.0f} s; outputs under {state}")
    print("search it in a browser: `make serve`, then open http://127.0.0.1:8000/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
