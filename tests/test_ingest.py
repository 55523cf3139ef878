import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import shapely
from PIL import Image

from rsitr.ingest import IngestError, ingest_corpus, ingest_folder
from rsitr.io import shards


def test_demo_ingest_follows_the_shard_contract(demo_shards: Path) -> None:
    manifest = json.loads((demo_shards / "manifest.json").read_text())
    assert manifest["inputs_seen"] == manifest["rows"] + len(manifest["quarantined"]) == 432
    assert manifest["captions"] == 5 * manifest["rows"]
    assert sum(s["rows"] for s in manifest["splits"].values()) == manifest["rows"]
    table = pq.read_table(demo_shards / manifest["shards"][0]["path"])
    assert table.schema.names == shards.SHARD_SCHEMA.names
    assert json.loads(table.schema.metadata[b"geo"])["primary_column"] == "geometry"
    row = table.slice(0, 1).to_pylist()[0]
    assert row["crs"] == "EPSG:32633" and row["window"]["width"] == 128
    footprint = shapely.from_wkb(row["geometry"])
    # UTM 33N easting 500 km is the 15°E central meridian; the scenes lie near 45°N.
    assert 14.9 < footprint.bounds[0] < 15.1 and 45.0 < footprint.bounds[1] < 45.2
    with Image.open(io.BytesIO(row["image"])) as img:
        assert img.size == (128, 128)
    assert len({r["image_id"] for r in shards.iter_rows(str(demo_shards), ["image_id"])}) == 432


def test_reingest_writes_identical_shards(demo_corpus: Path, demo_shards: Path, tmp_path: Path) -> None:
    again = ingest_folder(str(demo_corpus), "demo", str(tmp_path), tile_size=128)
    first = json.loads((demo_shards / "manifest.json").read_text())
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in first["shards"]]


def _corpus(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(images / "good.jpg")
    (images / "truncated.jpg").write_bytes((images / "good.jpg").read_bytes()[:40])
    (images / "empty.png").write_bytes(b"")
    Image.new("RGB", (32, 32)).save(images / "nocaption.png")
    (tmp_path / "secret.jpg").write_bytes((images / "good.jpg").read_bytes())
    entries = [
        {"filename": "good.jpg", "split": "train", "sentences": [{"raw": "a  green field ."}]},
        {"filename": "truncated.jpg", "split": "train", "sentences": [{"raw": "cut"}]},
        {"filename": "empty.png", "split": "val", "sentences": [{"raw": "nothing"}]},
        {"filename": "nocaption.png", "split": "val", "sentences": [{"raw": "   "}]},
        {"filename": "missing.jpg", "split": "test", "sentences": [{"raw": "gone"}]},
        {"filename": "../secret.jpg", "split": "test", "sentences": [{"raw": "escape"}]},
    ]
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"images": entries}))
    return images, captions


def test_bad_inputs_are_quarantined_with_reasons(tmp_path: Path) -> None:
    images, captions = _corpus(tmp_path)
    manifest = ingest_corpus(str(images), str(captions), "bad", str(tmp_path / "out"))
    reasons = {q["input"]: q["reason"] for q in manifest["quarantined"]}
    assert manifest["rows"] == 1 and manifest["inputs_seen"] == 6
    assert set(reasons) == {"truncated.jpg", "empty.png", "nocaption.png", "missing.jpg", "../secret.jpg"}
    assert "unreadable" in reasons["truncated.jpg"] and "missing" in reasons["missing.jpg"]
    assert "escapes" in reasons["../secret.jpg"] and "no non-empty caption" in reasons["nocaption.png"]
    row = next(shards.iter_rows(str(tmp_path / "out" / "bad")))
    assert row["captions"] == ["a green field ."]
    assert row["image"] == (images / "good.jpg").read_bytes()


def test_nothing_usable_or_missing_folder_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="does not exist"):
        ingest_folder(str(tmp_path / "nope"), "x", str(tmp_path))
    images, captions = _corpus(tmp_path)
    (images / "good.jpg").unlink()
    with pytest.raises(IngestError, match="nothing usable"):
        ingest_corpus(str(images), str(captions), "bad", str(tmp_path / "out"))
    assert not (tmp_path / "out" / "bad" / "manifest.json").exists()


@pytest.mark.skipif(
    not (Path(__file__).resolve().parents[2] / "shared/data/rsicd").is_dir(), reason="../shared/data/rsicd is absent"
)
def test_rsicd_vt_rsbs_captions_parse() -> None:
    from rsitr.io.captions import read_captions

    path = Path(__file__).resolve().parents[2] / "shared/data/rsicd/captions/vt-rsbs_RSICD.csv"
    records = read_captions(path)
    assert len(records) == 10921
    splits = {r.split for r in records.values()}
    assert splits == {"train", "val", "test"}
    assert sum(1 for r in records.values() if r.split == "test") == 1093
