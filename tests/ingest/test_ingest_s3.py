"""Ingest from and to a real S3-compatible server (SeaweedFS on 127.0.0.1, started by the fixture)."""

import hashlib
from pathlib import Path

import pytest
from conftest import shared
from generators.data import broken_corpus

from rsitr.ingest import ingest_corpus, ingest_scenes
from rsitr.io import shards, storage
from rsitr.io.geotiff import TileOptions, plan_scene, read_tiles

pytestmark = [pytest.mark.s3]


def _upload(local: Path, uri: str) -> None:
    fs, path = storage.filesystem(uri)
    fs.put(str(local), path, recursive=local.is_dir())


def test_scenes_and_corpus_round_trip_through_s3(s3_bucket: str, tmp_path: Path) -> None:
    geotiffs = shared("geotiff")
    for name in ("cogeo.tif", "RGB.byte.tif"):
        _upload(geotiffs / name, f"{s3_bucket}/in/scenes/{name}")
    options = TileOptions(256)
    remote = ingest_scenes([f"{s3_bucket}/in/scenes/*.tif"], "geo", f"{s3_bucket}/out", options, workers=1)
    local = ingest_scenes(
        [str(geotiffs / "RGB.byte.tif"), str(geotiffs / "cogeo.tif")], "geo", str(tmp_path), options, workers=1
    )
    assert remote["rows"] == local["rows"] > 0 and remote["skipped"] == local["skipped"]
    remote_rows = list(shards.iter_rows(f"{s3_bucket}/out/geo", ["image_id", "sha256", "geometry", "source_uri"]))
    local_rows = list(shards.iter_rows(str(tmp_path / "geo"), ["image_id", "sha256", "geometry"]))
    assert sorted((r["image_id"], r["sha256"], r["geometry"]) for r in remote_rows) == sorted(
        (r["image_id"], r["sha256"], r["geometry"]) for r in local_rows
    )
    assert all(r["source_uri"].startswith(f"{s3_bucket}/in/scenes/") for r in remote_rows)
    for shard in remote["shards"]:
        assert hashlib.sha256(storage.read_bytes(f"{s3_bucket}/out/geo/{shard['path']}")).hexdigest() == shard["sha256"]
    again = ingest_scenes([f"{s3_bucket}/in/scenes/*.tif"], "geo", f"{s3_bucket}/out", options, workers=1)
    assert again == remote

    images, captions = broken_corpus(tmp_path / "corpus")
    _upload(images, f"{s3_bucket}/in/corpus/images")
    _upload(captions, f"{s3_bucket}/in/corpus/captions.json")
    s3_corpus = ingest_corpus(
        f"{s3_bucket}/in/corpus/images", f"{s3_bucket}/in/corpus/captions.json", "bad", f"{s3_bucket}/out", workers=1
    )
    local_corpus = ingest_corpus(str(images), str(captions), "bad", str(tmp_path), workers=1)
    assert s3_corpus["rows"] == local_corpus["rows"] == 3
    reasons = [(q["input"], q["reason"].split(" from ")[0]) for q in s3_corpus["quarantined"]]
    assert reasons == [(q["input"], q["reason"].split(" from ")[0]) for q in local_corpus["quarantined"]]
    assert shards.read_manifest(f"{s3_bucket}/out/bad")["fingerprint"] == s3_corpus["fingerprint"]


def test_a_window_of_a_remote_cog_is_read_by_ranges(s3_bucket: str, monkeypatch) -> None:
    import s3fs.core

    world = shared("geotiff", "cog_world.tif")
    uri = f"{s3_bucket}/in/world/cog_world.tif"
    _upload(world, uri)
    fetched: list[int] = []
    real_fetch = s3fs.core.S3File._fetch_range

    def counting_fetch(self: s3fs.core.S3File, start: int, end: int) -> bytes:
        fetched.append(end - start)
        return real_fetch(self, start, end)

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", counting_fetch)
    options = TileOptions(256)
    plan = plan_scene(uri, options)
    (tile,) = read_tiles(plan, options, [(4096, 18944)])  # a 256-px window over Europe, at full resolution
    assert tile.png is not None
    # header + the window's blocks, not the file (s3fs's default 50 MiB read-ahead would fetch all 2.9 MB)
    assert sum(fetched) < world.stat().st_size / 3, fetched
