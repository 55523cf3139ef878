"""Incremental re-indexing of a scene archive: real GeoTIFFs, Ray, LanceDB and the Prefect flow."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import lancedb
import numpy as np
import pytest
import torch
from generators.data import kill_when, write_geotiff
from waiting import wait_for

from pipelines.index import index_archive
from pipelines.raycluster import stop_process_group
from rsitr.config import load_config
from rsitr.models.checkpoint import save_checkpoint
from rsitr.models.msa import build_model
from rsitr.retrieval.index import open_index
from rsitr.retrieval.reindex import IndexBusyError, index_lock, reindex_archive
from rsitr.retrieval.search import Searcher

PROJECT = Path(__file__).resolve().parents[2]


def _scene(folder: Path, name: str, seed: int) -> Path:
    """A 256 px 3-band GeoTIFF (UTM 33N): four 128 px tiles."""
    pixels = np.random.default_rng(seed).integers(0, 255, (3, 256, 256), dtype=np.uint8)
    return write_geotiff(folder / name, pixels)


@pytest.mark.prefect
@pytest.mark.ray
def test_nightly_flow_indexes_only_new_scenes_and_a_second_run_is_a_no_op(
    prefect_harness: None, ray_local: None, untrained_checkpoint: Path, tmp_path: Path
) -> None:
    archive, out = tmp_path / "archive", tmp_path / "index"
    archive.mkdir()
    for i in range(2):
        _scene(archive, f"scene_{i}.tif", i)
    run = {"checkpoint": str(untrained_checkpoint), "archive": str(archive), "out": str(out), "tile_size": 128}
    first = index_archive(**run)
    assert (first["new_scenes"], first["tiles_added"], first["rows"]) == (2, 8, 8)
    table, meta = open_index(str(out))
    version = table.version
    second = index_archive(**run)
    assert second["nothing_new"] and second["new_scenes"] == 0
    assert open_index(str(out))[0].version == version  # nothing was written

    (archive / "scene_0.tif").rename(archive / "renamed.tif")
    _scene(archive, "scene_2.tif", 2)
    (archive / "broken.tif").write_bytes(b"II*\x00" + bytes(200))
    third = index_archive(**run)
    assert (third["new_scenes"], third["renamed"], third["quarantined"]) == (2, 1, 1)
    assert (third["tiles_added"], third["rows"]) == (4, 12)
    hits = Searcher(str(out)).search("dense forest", k=12)
    assert {Path(h.source_uri or "").name for h in hits} == {"renamed.tif", "scene_1.tif", "scene_2.tif"}

    _scene(archive, "scene_1.tif", 7)  # same name, new content
    fourth = index_archive(**run)
    assert (fourth["changed"], fourth["new_scenes"], fourth["rows"]) == (1, 1, 12)
    assert index_archive(**run)["nothing_new"]  # the broken scene is not retried until its bytes change

    # A new model version re-embeds everything into its own table; index.json switches once it is complete.
    torch.manual_seed(1)
    config = load_config("demo")
    retrained = tmp_path / "retrained"
    save_checkpoint(retrained, build_model(config.model), None, config, epoch=0, metrics={})
    fresh = index_archive(**{**run, "checkpoint": str(retrained)})
    assert fresh["new_scenes"] == 4 and fresh["rows"] == 12 and fresh["table"] != third["table"]
    assert open_index(str(out))[1]["table"] == fresh["table"]
    assert lancedb.connect(str(out)).open_table(third["table"]).count_rows() == 12  # the old one, untouched


INTERRUPTIBLE = textwrap.dedent(
    """
    import sys
    from rsitr.io.geotiff import TileOptions
    from rsitr.retrieval.reindex import reindex_archive
    reindex_archive(sys.argv[1], sys.argv[2], sys.argv[3], TileOptions(tile_size=128))
    """
)


@pytest.mark.ray
def test_an_interrupted_reindex_leaves_the_previous_version_queryable(
    ray_local: None, untrained_checkpoint: Path, tmp_path: Path
) -> None:
    archive, out = tmp_path / "archive", tmp_path / "index"
    archive.mkdir()
    _scene(archive, "first.tif", 0)
    options_args = [str(archive), str(out), str(untrained_checkpoint)]
    from rsitr.io.geotiff import TileOptions

    assert reindex_archive(*options_args, TileOptions(tile_size=128))["rows"] == 4
    for i in range(2):
        _scene(archive, f"later_{i}.tif", 10 + i)
    # the batch's tiles are ingested: embedding starts next, then the append; kill it in between
    kill_when(
        [sys.executable, "-c", INTERRUPTIBLE, *options_args],
        lambda: bool(list((out / "batches").glob("batch-*/manifest.json"))),
        "the re-index finishing its ingest",
        PROJECT,
    )
    table, meta = open_index(str(out))
    assert table.count_rows() == 4 and meta["rows"] == 4
    assert len(Searcher(str(out)).search("farmland", k=10)) == 4  # the previous version answers queries
    ledger = json.loads(next(out.glob("ledger-*.json")).read_text())
    assert len(ledger["scenes"]) == 1
    resumed = reindex_archive(*options_args, TileOptions(tile_size=128))  # the lock died with the killed run
    assert resumed["new_scenes"] == 2 and resumed["rows"] == 12


def test_a_second_run_on_the_same_index_is_refused_while_one_holds_it(
    untrained_checkpoint: Path, tmp_path: Path
) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    _scene(archive, "a.tif", 0)
    with index_lock(str(tmp_path / "index")), pytest.raises(IndexBusyError, match="another re-index"):
        reindex_archive(str(archive), str(tmp_path / "index"), str(untrained_checkpoint))


SERVE_NIGHTLY = textwrap.dedent(
    """
    import json, sys
    import yaml
    from pipelines.index import index_archive
    from prefect import serve
    from prefect.client.schemas.objects import ConcurrencyLimitConfig
    spec = next(d for d in yaml.safe_load(open("prefect.yaml"))["deployments"] if d["name"] == "nightly")
    serve(
        index_archive.to_deployment(
            name="nightly",
            parameters=json.loads(sys.argv[1]),
            cron=spec["schedules"][0]["cron"],
            concurrency_limit=ConcurrencyLimitConfig(**spec["concurrency_limit"]),
        )
    )
    """
)


@pytest.mark.prefect
@pytest.mark.ray
def test_the_served_nightly_deployment_indexes_scenes_dropped_into_the_archive(
    prefect_harness: None, untrained_checkpoint: Path, tmp_path: Path
) -> None:
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    archive, out = tmp_path / "archive", tmp_path / "index"
    archive.mkdir()
    parameters = {"checkpoint": str(untrained_checkpoint), "archive": str(archive), "out": str(out), "tile_size": 128}
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RSITR_RAY_CLUSTER")}
    env.update(PREFECT_API_URL=str(PREFECT_API_URL.value()), PREFECT_RUNNER_POLL_FREQUENCY="2")
    log = open(tmp_path / "runner.log", "wb")  # noqa: SIM115 - closed below
    runner = subprocess.Popen(
        [sys.executable, "-c", SERVE_NIGHTLY, json.dumps(parameters)],
        cwd=PROJECT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        with get_client(sync_client=True) as prefect:

            def registered() -> Any:
                try:
                    return prefect.read_deployment_by_name("index-archive/nightly")
                except Exception:  # not registered yet
                    return None

            log_file = tmp_path / "runner.log"
            deployment = wait_for("the nightly deployment to register", registered, 120, 1.0, runner, log_file)
            assert deployment.schedules and deployment.schedules[0].schedule.cron == "0 3 * * *"
        for night, names in enumerate((["harbour.tif"], ["fields.tif", "forest.tif"])):
            for name in names:  # scenes arriving in the archive during the day (different content: new seeds)
                _scene(archive, name, seed=100 + sum(map(ord, name)))
            run = run_deployment("index-archive/nightly", timeout=600)  # what the 03:00 schedule starts
            assert run.state is not None and run.state.is_completed(), (tmp_path / "runner.log").read_text()[-3000:]
            table, meta = open_index(str(out))
            found = {Path(h.source_uri or "").name for h in Searcher(str(out)).search("farmland", k=100)}
            indexed = {"harbour.tif"} | ({"fields.tif", "forest.tif"} if night else set())
            assert found == indexed and meta["rows"] == 4 * len(indexed)
        _scene(archive, "town.tif", seed=7)
        # two runs at once (a manual run beside the schedule's): the deployment's limit lets one through
        runs = [run_deployment("index-archive/nightly", timeout=0) for _ in range(2)]
        states = _final_states([run.id for run in runs], deadline_s=600)
        assert sorted(states) == ["CANCELLED", "COMPLETED"], (tmp_path / "runner.log").read_text()[-3000:]
        assert open_index(str(out))[1]["rows"] == 16  # the new scene indexed once
    finally:
        stop_process_group(runner)
        log.close()


def _final_states(run_ids: list[Any], deadline_s: float) -> list[str]:
    """The final state type of each flow run, waiting for every one of them to reach one."""
    from prefect import get_client

    with get_client(sync_client=True) as prefect:

        def final() -> list[str] | None:
            states = [prefect.read_flow_run(run_id).state for run_id in run_ids]
            if all(state is not None and state.is_final() for state in states):
                return [state.type.value for state in states if state is not None]
            return None

        return wait_for("every flow run to reach a final state", final, deadline_s, every=1.0)
