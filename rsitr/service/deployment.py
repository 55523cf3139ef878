"""The search service as a Ray Serve application: the cluster that trains and embeds also scales the replicas.

Started by ``rsitr serve`` (:func:`start`), or on a cluster with ``serve run`` / ``serve deploy`` of
``infra/serve.yaml``, whose ``import_path`` is :func:`build_app`.
"""

from __future__ import annotations

import os
from typing import Any

from ray import serve

from rsitr.service.api import create_app
from rsitr.service.basemap import BasemapSettings
from rsitr.service.batches import MAX_BATCH, QueryBatches
from rsitr.service.security import TOKEN_VARIABLE, ServiceConfigError, required_digest
from rsitr.service.state import POLL_SECONDS, SearchService

APP_NAME = "rsitr-search"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


# torch threads in a replica: it holds one CPU, and its batches run one at a time (rsitr.service.batches)
TORCH_THREADS = 1
# no access log line per request: at tens of queries a second, forwarding them costs the cores the queries need
QUIET_LOGS = {"enable_access_log": False}


# room for a full batch being encoded and the next one forming (see rsitr.service.batches)
@serve.deployment(max_ongoing_requests=2 * MAX_BATCH, logging_config=QUIET_LOGS)
@serve.ingress()
class SearchDeployment:
    """One replica: the index and its model, opened once, answering the API of :mod:`rsitr.service.api`."""

    def __init__(
        self,
        index: str,
        checkpoint: str | None,
        digest: str | None,
        poll_seconds: float,
        basemap: BasemapSettings | None = None,
    ) -> None:
        import torch

        torch.set_num_threads(TORCH_THREADS)
        self.queries = QueryBatches(SearchService(index, checkpoint, poll_seconds))
        self.digest = digest
        self.basemap = basemap

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self.queries, self.digest, self.basemap)


def application(
    index: str,
    checkpoint: str | None = None,
    digest: str | None = None,
    replicas: int = 1,
    poll_seconds: float = POLL_SECONDS,
    basemap: BasemapSettings | None = None,
) -> Any:
    """The bound Ray Serve application (only the token's digest travels to the replicas)."""
    if replicas < 1:
        raise ServiceConfigError(f"--replicas {replicas}: at least one replica")
    deployment: Any = SearchDeployment  # a Ray Serve Deployment once decorated (its type stubs say the class)
    return deployment.options(num_replicas=replicas).bind(index, checkpoint, digest, poll_seconds, basemap)


def build_app(args: dict[str, Any]) -> Any:
    """The application builder ``serve run`` / ``serve deploy`` call with the config's ``args``: index, checkpoint,
    replicas, poll_seconds, basemap and basemap_attribution (an online XYZ basemap; default: the packaged tiles), and
    host (the config's ``http_options.host``; taken as reachable from anywhere when absent). A token in
    ``RSITR_API_TOKEN`` where the builder runs is then required of every client.

    Raises:
        ServiceConfigError: reachable beyond loopback without a token.
    """
    return application(
        str(args["index"]),
        args.get("checkpoint"),
        required_digest(str(args.get("host", "0.0.0.0")), os.environ.get(TOKEN_VARIABLE)),
        int(args.get("replicas", 1)),
        float(args.get("poll_seconds", POLL_SECONDS)),
        BasemapSettings(args.get("basemap"), str(args.get("basemap_attribution", ""))),
    )


def start(
    index: str,
    checkpoint: str | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    replicas: int = 1,
    token: str | None = None,
    poll_seconds: float = POLL_SECONDS,
    basemap: BasemapSettings | None = None,
) -> str:
    """Run the service on this process's Ray (the configured cluster or a local one) and return its URL; it runs
    until :func:`stop` or the end of the Ray session.

    Raises:
        ServiceConfigError: reachable beyond loopback without a token, or no replica asked for.
        IndexNotFoundError, IndexCheckpointError, CheckpointError: no index at ``index``, or no checkpoint to answer
            with (neither given nor recorded by the index, or not there).
    """
    from rsitr.models.checkpoint import read_meta
    from rsitr.retrieval.index_meta import answering_checkpoint, read_index_meta
    from rsitr.runtime.raysession import init_ray

    digest = required_digest(host, token)
    # a missing index or checkpoint fails here, in one line, not in a replica's log
    read_meta(answering_checkpoint(read_index_meta(index), checkpoint, index))
    init_ray()
    serve.start(http_options={"host": host, "port": port}, logging_config=QUIET_LOGS)
    serve.run(
        application(index, checkpoint, digest, replicas, poll_seconds, basemap),
        name=APP_NAME,
        route_prefix="/",
        blocking=False,
    )
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def stop() -> None:
    """Stop the service and Ray Serve."""
    serve.shutdown()
