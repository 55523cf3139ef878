"""The search service under load: concurrent clients against ``rsitr serve`` (Ray Serve, 127.0.0.1) over a 10⁵-tile
index, then the same load while a re-index publishes a new version of the index in the middle (hot swap).

Each client sends ``GET /search`` back to back (a caption as the query, k=10; every other query with a 20° bbox)
for ``--seconds``. Latency is measured at the client (HTTP included). The clients run in this process, on the same
cores as the service: the figures are what one 2-core machine does for both. The swap's re-index (a new 10⁵-vector
table and its ANN index) runs in its own process at niceness 10, as a re-index job beside a service should.

The bound: the same queries through the replica's own model and index code in this process, with its torch threads,
in batches of the mean size the service formed at the most clients (and one at a time): what the service would do
with no HTTP, proxy or hand-offs at all. ``qps_vs_bound`` is the service's share of it.

Prints a table, writes JSON, and ends with one JSON line: ``qps``, ``p99_ms``, ``bound_qps``, ``qps_vs_bound``,
``errors``, ``errors_during_swap``.
Usage: ``python -m benchmarks.serve [--quick] [--config PRESET] [--tiles 100000] [--clients 1 8 16] [--seconds 60]``
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import lancedb
import numpy as np
import torch

from benchmarks.common import RESULTS, write_result
from benchmarks.index import tiles_table  # the same synthetic tile rows as the index benchmark
from rsitr.config import DEFAULT_PRESET, load_config
from rsitr.models import checkpoint as ckpt
from rsitr.models.msa import build_model
from rsitr.retrieval.index import publish
from rsitr.retrieval.search import Searcher
from rsitr.retrieval.search_inputs import SearchFilter, TextQuery
from rsitr.retrieval.tile_rows import index_rows
from rsitr.service import deployment

BBOX = (-10.0, -10.0, 10.0, 10.0)
# a re-index beside a live service runs niced (docs/search-service.md): the service keeps the cores it needs
REINDEX_NICENESS = 10
QUERIES = [
    "storage tanks beside a river",
    "many buildings and green trees are around a playground",
    "a bridge crosses a wide river",
    "several planes are parked at the airport",
    "a large area of bare land",
    "dense forest next to farmland",
    "a church with a dome in the city center",
    "a harbor with many boats",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def build(work: Path, tiles: int, rng: np.random.Generator, preset: str) -> tuple[str, str, int]:
    """An untrained checkpoint of ``preset`` (its towers pretrained: a query costs what a trained one's does) and
    an index of ``tiles`` random unit vectors in its space; returns (index, checkpoint, dim)."""
    torch.manual_seed(0)
    config = load_config(preset)
    model = build_model(config.model)
    ckpt.save_checkpoint(work / "checkpoint", model, None, config, epoch=0, metrics={})
    _, _, state = ckpt.load_checkpoint(str(work / "checkpoint"))
    with torch.no_grad():  # an ensemble's embedding is wider than embed_dim
        dim = int(
            model.eval().encode_text(torch.ones(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long)).shape[1]
        )
    publish_version(work / "index", tiles, dim, state["model_version"], str(work / "checkpoint"), rng)
    return str(work / "index"), str(work / "checkpoint"), dim


def publish_version(
    out: Path, tiles: int, dim: int, model_version: str, checkpoint: str, rng: np.random.Generator
) -> None:
    """Write (or overwrite) the index's table and publish it, as ``rsitr index build`` does."""
    vectors = rng.normal(size=(tiles, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = index_rows(tiles_table(vectors, rng, model_version))
    table = lancedb.connect(str(out)).create_table("tiles", data=rows, mode="overwrite")
    publish(str(out), table, model_version, checkpoint, {})


def _publish_niced(out: Path, tiles: int, dim: int, model_version: str, checkpoint: str) -> None:
    os.nice(REINDEX_NICENESS)
    publish_version(out, tiles, dim, model_version, checkpoint, np.random.default_rng(1))


def load(url: str, clients: int, seconds: float, during: Any = None) -> dict[str, Any]:
    """``clients`` threads querying back to back for ``seconds``; ``during``: called once half-way (in another
    thread) and waited for before the load stops."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(number: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as session:
            i = number
            while not stop.is_set():
                params: dict[str, Any] = {"q": QUERIES[i % len(QUERIES)], "k": 10}
                if i % 2:
                    params["bbox"] = ",".join(f"{v:g}" for v in BBOX)
                started = time.perf_counter()
                try:
                    response = session.get("/search", params=params)
                    failed = None if response.status_code == 200 else f"{response.status_code} {response.text[:200]}"
                except httpx.HTTPError as err:
                    failed = f"{type(err).__name__}: {err}"
                elapsed = 1000 * (time.perf_counter() - started)
                with lock:
                    latencies.append(elapsed)
                    if failed:
                        errors.append(failed)
                i += clients

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    swapper = None
    if during is not None:
        time.sleep(seconds / 2)
        swapper = threading.Thread(target=during)
        swapper.start()
    remaining = seconds - (time.perf_counter() - started)
    time.sleep(max(0.0, remaining))
    if swapper is not None:
        swapper.join()
    stop.set()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {
        "clients": clients,
        "seconds": wall,
        "requests": len(latencies),
        "qps": len(latencies) / wall,
        "mean_ms": float(np.mean(latencies)),
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "errors": len(errors),
        "first_errors": errors[:3],
    }


def text_queries(count: int) -> list[TextQuery]:
    """The clients' queries, in the order they send them (every other one with the bbox)."""
    return [TextQuery(QUERIES[i % len(QUERIES)], 10, SearchFilter(bbox=BBOX) if i % 2 else None) for i in range(count)]


def bound(index: str, checkpoint: str, batch: int, seconds: float) -> dict[str, Any]:
    """The replica's work alone, in this process: ``Searcher.search_many`` over batches of ``batch`` queries for
    ``seconds`` (queries/s), and over one query at a time (its mean time), with the replica's torch threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(deployment.TORCH_THREADS)
    try:
        searcher = Searcher(index, checkpoint)
        searcher.search_many(text_queries(len(QUERIES)))  # warm, as the service was
        result: dict[str, Any] = {"batch": batch}
        for name, size in (("batched", batch), ("single", 1)):
            done, times, started = 0, [], time.perf_counter()
            while time.perf_counter() - started < seconds / 2:
                begun = time.perf_counter()
                searcher.search_many(text_queries(done + size)[done:])
                times.append(time.perf_counter() - begun)
                done += size
            result[f"{name}_qps"] = done / sum(times)
            result[f"{name}_ms"] = 1000 * float(np.mean(times))
            result[f"{name}_p99_ms"] = 1000 * float(np.percentile(times, 99))
        return result
    finally:
        torch.set_num_threads(threads)


def mean_batch(before: dict[str, Any], after: dict[str, Any]) -> float:
    """The mean text batch the service formed between two ``/healthz`` readings."""
    start, end = before["batches"]["text"], after["batches"]["text"]
    return (end["queries"] - start["queries"]) / max(1, end["batches"] - start["batches"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEFAULT_PRESET, help="the preset whose towers answer the queries")
    parser.add_argument("--quick", action="store_true", help="1 and 8 clients, 30 s each (≈ 4 minutes in all)")
    parser.add_argument("--tiles", type=int, default=100_000)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--out", default=None, help="default: benchmarks/results/serve-<config>.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    clients = [1, 8] if args.quick else sorted(args.clients)
    seconds = 30.0 if args.quick else args.seconds
    rng = np.random.default_rng(0)
    report: dict[str, Any] = {"config": args.config, "tiles": args.tiles, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        index, checkpoint, dim = build(work, args.tiles, rng, args.config)
        report["index_build_s"] = time.perf_counter() - started
        url = deployment.start(index, port=_free_port(), poll_seconds=2.0).rstrip("/")
        try:
            with httpx.Client(base_url=url, timeout=60) as session:
                for query in QUERIES:  # warm the replica (first tokenizer and index reads)
                    session.get("/search", params={"q": query})
                before = session.get("/healthz").json()["index_version"]
                for count in clients:
                    counted = session.get("/healthz").json()
                    report["runs"].append(load(url, count, seconds))
                    report["runs"][-1]["mean_batch"] = mean_batch(counted, session.get("/healthz").json())
                model_version = session.get("/healthz").json()["model_version"]
                batch = max(1, round(report["runs"][-1]["mean_batch"]))
                report["bound"] = bound(index, checkpoint, batch, seconds)

                def swap() -> None:
                    # the re-index runs as a job beside the service does: its own process, at a lower priority
                    job = multiprocessing.get_context("spawn").Process(
                        target=_publish_niced, args=(work / "index", args.tiles, dim, model_version, checkpoint)
                    )
                    job.start()
                    job.join()
                    if job.exitcode != 0:
                        raise RuntimeError(f"the re-index job failed (exit code {job.exitcode})")
                    deadline = time.monotonic() + 120
                    while session.get("/healthz").json()["index_version"] == before:
                        if time.monotonic() > deadline:
                            raise RuntimeError("the service did not switch to the new index version in 120 s")
                        time.sleep(0.5)

                report["swap"] = load(url, max(clients), seconds, during=swap)
                report["swap"]["swapped"] = session.get("/healthz").json()["index_version"] != before
        finally:
            deployment.stop()
    print(f"\nrsitr serve ({args.config}), {args.tiles} tiles, GET /search k=10 (half with a bbox), clients in-process")
    print(f"{'clients':>8} {'qps':>8} {'mean ms':>8} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6} {'errors':>7}")
    for run in [*report["runs"], {**report["swap"], "clients": f"{report['swap']['clients']}+swap"}]:
        print(
            f"{run['clients']!s:>8} {run['qps']:8.1f} {run['mean_ms']:8.1f} {run['p50_ms']:8.1f} "
            f"{run['p99_ms']:8.1f} {run.get('mean_batch', float('nan')):6.1f} {run['errors']:7d}"
        )
    limit = report["bound"]
    print(
        f"bound (replica code in-process, {deployment.TORCH_THREADS} torch thread(s)): {limit['batched_qps']:.1f} "
        f"queries/s in batches of {limit['batch']}, one query {limit['single_ms']:.1f} ms "
        f"(p99 {limit['single_p99_ms']:.1f})"
    )
    report["summary"] = summary = _summary(report)
    write_result(args.out or RESULTS / f"serve-{args.config}.json", report)
    print(json.dumps(summary))


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    """The figures the goals read: the most clients against the bound, one client against one query's bound."""
    most = report["runs"][-1]
    one = next((run for run in report["runs"] if run["clients"] == 1), None)
    limit = report["bound"]
    steady_p99 = max(run["p99_ms"] for run in report["runs"] if run["clients"] == report["swap"]["clients"])
    return {
        "clients": most["clients"],
        "qps": round(most["qps"], 1),
        "p99_ms": round(most["p99_ms"], 1),
        "p99_vs_mean": round(most["p99_ms"] / most["mean_ms"], 2),
        "bound_qps": round(limit["batched_qps"], 1),
        "qps_vs_bound": round(most["qps"] / limit["batched_qps"], 2),
        "one_client_p99_ms": round(one["p99_ms"], 1) if one else None,
        "bound_one_query_ms": round(limit["single_ms"], 1),
        "bound_one_query_p99_ms": round(limit["single_p99_ms"], 1),
        "swap_p99_vs_steady": round(report["swap"]["p99_ms"] / steady_p99, 2),
        "errors": sum(run["errors"] for run in report["runs"]),
        "errors_during_swap": report["swap"]["errors"],
        "swapped": report["swap"]["swapped"],
    }


if __name__ == "__main__":
    main()
