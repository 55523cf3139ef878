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

# The real data sets (RSICD, RSITMD's captions, the GeoTIFFs): one setting, a folder holding rsicd/, rsitmd/ and
# geotiff/. Tests that need them skip, naming the path, when it is absent.
DATA_VARIABLE = "RSITR_DATA"
REAL_DATA = Path(os.environ.get(DATA_VARIABLE, Path(__file__).resolve().parents[2] / "shared" / "data"))

# What starts a real service, and the marker a test using it must carry (``make test-quick`` leaves them all out).
SERVICE_MARKERS = ("ray", "prefect", "s3", "serve", "browser")
FIXTURE_STARTS = {
    "ray_local": "ray",
    "ray_head": "ray",
    "demo_shards": "ray",  # ingested with Ray tasks
    "demo_index_folder": "ray",
    "s3_bucket": "s3",
    "own_s3": "s3",
    "prefect_harness": "prefect",
    "service": "serve",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test that starts a service says so with its marker (checked here against the fixtures it uses), and
    carries ``services`` besides, which ``make test-quick`` deselects."""
    unmarked = []
    for item in items:
        marks = {mark.name for mark in item.iter_markers()}
        needed = {FIXTURE_STARTS[f] for f in getattr(item, "fixturenames", ()) if f in FIXTURE_STARTS}
        if needed - marks:
            unmarked.append(f"{item.nodeid}: add @pytest.mark.{', @pytest.mark.'.join(sorted(needed - marks))}")
        if marks & set(SERVICE_MARKERS):
            item.add_marker(pytest.mark.services)
    if unmarked:
        raise pytest.UsageError("tests that start services without saying so:\n" + "\n".join(unmarked))


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
    """A path under the real data folder (``$RSITR_DATA``); skips the test, naming what is missing, when absent."""
    path = REAL_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data {path} is absent (set {DATA_VARIABLE} to the folder holding rsicd/ and geotiff/)")
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
