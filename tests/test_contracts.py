"""docs/contracts.md against the code: every contract table names exactly what the code writes and serves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import pytest
from contracts_doc import documented

from rsitr.io import shards
from rsitr.models import checkpoint
from rsitr.service.api import create_app
from rsitr.service.batches import QueryBatches


def test_shard_columns_are_the_shard_schema() -> None:
    assert documented("Shard") == shards.SHARD_SCHEMA.names


@pytest.mark.ray
def test_manifest_keys_are_the_typed_manifest_and_written_by_a_real_ingest(demo_shards: Path) -> None:
    assert set(documented("Manifest")) == shards.Manifest.__required_keys__
    manifest = json.loads((demo_shards / shards.MANIFEST_NAME).read_text())
    assert shards.Manifest.__required_keys__ <= set(manifest) <= set(shards.Manifest.__annotations__)
    assert set(manifest["shards"][0]) == set(shards.ShardEntry.__annotations__)


def test_checkpoint_files_are_what_save_checkpoint_writes(untrained_checkpoint: Path) -> None:
    names = documented("Checkpoint")
    assert names == [checkpoint.WEIGHTS, checkpoint.OPTIMIZER, checkpoint.CONFIG, checkpoint.STATE]
    written = {path.name for path in untrained_checkpoint.iterdir()}
    assert written == set(names) - {checkpoint.OPTIMIZER}  # saved without an optimizer: nothing to resume
    state = json.loads((untrained_checkpoint / checkpoint.STATE).read_text())
    assert set(state) == {"epoch", "metrics", "model_version", "history"}


def test_api_routes_are_the_apps_routes() -> None:
    app = create_app(cast(QueryBatches, None))  # routes only: no request is made
    served = {
        f"{method} {route.path.replace(':path', '')}"
        for route in app.routes
        if getattr(route, "include_in_schema", False)
        for method in sorted(getattr(route, "methods", ()))
    }
    assert set(documented("Search service API")) == served
