"""Shared fixtures: a generated demo corpus, its shards, a real local Ray, Prefect's test harness."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.pop("RAY_ADDRESS", None)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# a test that uses one of these starts real services (Ray, Prefect, an S3 server) or trains: the slow tier
SLOW_FIXTURES = {"ray_local", "ray_head", "s3_bucket", "own_s3", "prefect_harness", "demo_shards"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs a service as ``slow`` (``make test-quick`` runs the rest: the unit tier)."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo corpus generator's output (12 scenes, 432 tiles of 128 px)."""
    from rsitr.synthetic import generate_demo_corpus

    out = tmp_path_factory.mktemp("demo-corpus")
    generate_demo_corpus(out, seed=0)
    return out


@pytest.fixture(scope="session")
def demo_shards(demo_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo corpus ingested into shards."""
    from rsitr.ingest import ingest_folder

    out = tmp_path_factory.mktemp("shards")
    ingest_folder(str(demo_corpus), "demo", str(out), tile_size=128)
    return out / "demo"


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A real local Ray (4 logical CPUs so Ray Data keeps CPUs beside training workers)."""
    import ray

    from rsitr.runtime.raysession import local_ray_environment

    started = not ray.is_initialized()
    if started:
        os.environ.update(local_ray_environment())
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def shared(*parts: str) -> Path:
    """A path under ``../shared/data``; skips the test, naming what is missing, when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data {path} is absent (see ../shared/data/README.md)")
    return path


@pytest.fixture(scope="session")
def s3_bucket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A bucket on a real S3-compatible server (SeaweedFS) on 127.0.0.1; the S3 variables point at it meanwhile."""
    from s3server import seaweed_s3

    from rsitr.io import storage

    with seaweed_s3(tmp_path_factory.mktemp("s3")) as server:
        saved = {key: os.environ.get(key) for key in server.environ()}
        os.environ.update(server.environ())
        try:
            fs, _ = storage.filesystem("s3://rsitr-test")
            fs.mkdir("rsitr-test")
            yield "s3://rsitr-test"
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """Prefect's test harness: a real temporary Prefect server and database."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def untrained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of the demo architecture with pretrained towers and untrained heads."""
    import torch

    from rsitr.config import load_config
    from rsitr.models.checkpoint import save_checkpoint
    from rsitr.models.msa import build_model

    torch.manual_seed(0)
    config = load_config("demo")
    folder = tmp_path_factory.mktemp("ckpt") / "checkpoint"
    save_checkpoint(folder, build_model(config.model), None, config, epoch=0, metrics={})
    return folder


@pytest.fixture(scope="session")
def demo_index_folder(
    ray_local: None, demo_shards: Path, untrained_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A real index of the demo shards, tiles and captions, by the untrained checkpoint: built once and shared, so a
    test must not change it (copy it first)."""
    from generators.data import demo_index

    return demo_index(tmp_path_factory.mktemp("demo-index"), demo_shards, untrained_checkpoint)
