"""Ingest on generated inputs: the shard contract, bad input, caption formats, splits, tiling rules, resume."""

import io
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely
from generators.data import broken_corpus, gradient, jpeg_bytes, kill_when, odd_scenes, write_geotiff
from PIL import Image

from rsitr.ingest import IngestError, ingest_corpus, ingest_folder, ingest_scenes
from rsitr.ingest.runner import UnitReport, plan_fingerprint
from rsitr.io import shards
from rsitr.io.captions import (
    CaptionFormatError,
    Rejection,
    normalize_caption,
    read_corpus,
    seeded_split,
    split_from_name,
)
from rsitr.io.geotiff import TileOptions

PROJECT = Path(__file__).resolve().parents[2]


def _rows(root: Path) -> list[dict]:
    return list(shards.iter_rows(str(root)))


def _reconciles(manifest: dict) -> None:
    assert manifest["inputs_seen"] == manifest["rows"] + len(manifest["quarantined"]) + manifest["skipped"]
    accounted = manifest["captions"] + len(manifest["captions_rejected"]) + manifest["captions_of_unwritten_inputs"]
    assert manifest["captions_seen"] == accounted


@pytest.mark.ray
def test_demo_ingest_follows_the_shard_contract(demo_shards: Path) -> None:
    manifest = json.loads((demo_shards / "manifest.json").read_text())
    _reconciles(manifest)
    assert manifest["rows"] == 432 and not manifest["quarantined"]
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


@pytest.mark.ray
def test_reingest_writes_identical_shards(demo_corpus: Path, demo_shards: Path, tmp_path: Path) -> None:
    again = ingest_folder(str(demo_corpus), "demo", str(tmp_path), tile_size=128)
    first = json.loads((demo_shards / "manifest.json").read_text())
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in first["shards"]]
    for shard in again["shards"]:
        assert (tmp_path / "demo" / shard["path"]).read_bytes() == (demo_shards / shard["path"]).read_bytes()


def test_every_kind_of_bad_input_is_quarantined_with_its_reason(tmp_path: Path) -> None:
    images, captions = broken_corpus(tmp_path)
    manifest = ingest_corpus(str(images), str(captions), "bad", str(tmp_path / "out"), workers=1)
    _reconciles(manifest)
    reasons = {q["input"]: q["reason"] for q in manifest["quarantined"]}
    assert manifest["rows"] == 3 and manifest["inputs_seen"] == 12
    assert "duplicate image id" in reasons["captions.json: good.jpg"]
    assert "truncated" in reasons["truncated.jpg"]
    assert "0 bytes" in reasons["empty.png"]
    assert "not an image" in reasons["not_an_image.jpg"]
    assert "no caption" in reasons["uncaptioned.jpg"]
    assert "no usable caption" in reasons["blank_caption.jpg"]
    assert "missing" in reasons["missing.jpg"]
    assert "escapes the image folder" in reasons["../outside.jpg"]
    assert "duplicate image id" in reasons["twin.png"]
    rejected = {r["input"]: r["reason"] for r in manifest["captions_rejected"]}
    assert rejected["good.jpg#1"] == "caption is not valid UTF-8"
    assert rejected["blank_caption.jpg#0"] == "empty caption"
    rows = {row["image_id"]: row for row in _rows(tmp_path / "out" / "bad")}
    assert set(rows) == {"bad/good", "bad/good2", "bad/twin"}
    assert rows["bad/good"]["captions"] == ["a green field"]
    assert rows["bad/good"]["image"] == (images / "good.jpg").read_bytes()
    assert rows["bad/good2"]["format"] == "png" and rows["bad/good2"]["split"] == "val"


def test_strict_and_nothing_usable_fail_after_recording_the_quarantine(tmp_path: Path) -> None:
    images, captions = broken_corpus(tmp_path)
    with pytest.raises(IngestError, match="--strict"):
        ingest_corpus(str(images), str(captions), "bad", str(tmp_path / "out"), workers=1, strict=True)
    for name in ("good.jpg", "good2.png", "twin.jpg", "twin.png"):
        (images / name).unlink()
    with pytest.raises(IngestError, match="nothing usable"):
        ingest_corpus(str(images), str(captions), "bad", str(tmp_path / "empty"), workers=1)
    manifest = json.loads((tmp_path / "empty" / "bad" / "manifest.json").read_text())
    assert manifest["rows"] == 0 and len(manifest["quarantined"]) == manifest["inputs_seen"]
    with pytest.raises(IngestError, match="does not exist"):
        ingest_folder(str(tmp_path / "nope"), "x", str(tmp_path))


def test_unknown_or_unparseable_caption_files_fail_naming_the_file(tmp_path: Path) -> None:
    weird = tmp_path / "captions.xml"
    weird.write_text("<captions/>")
    with pytest.raises(CaptionFormatError, match="captions.xml: unknown caption format"):
        read_corpus([str(weird)])
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [{"filename": "a.jpg", "split": "train", "sentences": [')
    with pytest.raises(CaptionFormatError, match="broken.json"):
        read_corpus([str(broken)])
    with pytest.raises(CaptionFormatError, match="does not exist"):
        read_corpus([str(tmp_path / "absent.json")])


def test_a_different_ingest_in_the_same_place_needs_overwrite(tmp_path: Path) -> None:
    images, captions = broken_corpus(tmp_path)
    ingest_corpus(str(images), str(captions), "bad", str(tmp_path / "out"), workers=1)
    (images / "good.jpg").write_bytes(jpeg_bytes(42))
    with pytest.raises(IngestError, match="--overwrite"):
        ingest_corpus(str(images), str(captions), "bad", str(tmp_path / "out"), workers=1)
    manifest = ingest_corpus(str(images), str(captions), "bad", str(tmp_path / "out"), workers=1, overwrite=True)
    good = next(r for r in _rows(tmp_path / "out" / "bad") if r["image_id"] == "bad/good")
    assert good["image"] == jpeg_bytes(42) and manifest["rows"] == 3


def _images(folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(names):
        (folder / name).write_bytes(jpeg_bytes(seed))
    return folder


def test_caption_formats_split_by_corpus_file_name_option_or_seed(tmp_path: Path) -> None:
    names = [f"img_{i}.jpg" for i in range(6)]
    images = _images(tmp_path / "images", names)
    # COCO, one file per split: the split comes from the file name
    for split, chosen in (("train", names[:4]), ("val", names[4:])):
        coco = {
            "images": [{"id": i, "file_name": n} for i, n in enumerate(chosen)],
            "annotations": [
                {"id": 10 * i + k, "image_id": i, "caption": f"{n} caption {k}"}
                for i, n in enumerate(chosen)
                for k in range(2)
            ],
        }
        (tmp_path / f"captions_{split}2017.json").write_text(json.dumps(coco))
    coco_files = [str(tmp_path / "captions_train2017.json"), str(tmp_path / "captions_val2017.json")]
    manifest = ingest_corpus(str(images), coco_files, "coco", str(tmp_path / "out"), workers=1)
    assert {k: v["rows"] for k, v in manifest["splits"].items()} == {"train": 4, "val": 2}
    assert manifest["captions"] == 12 and set(manifest["caption_formats"].values()) == {"coco"}
    # ALBEF/PIR: one entry per caption with a split/ prefix, merged per image
    albef = [{"image": f"test/{n}", "caption": f"{n} says {k}", "label_name": "farm"} for n in names for k in range(3)]
    (tmp_path / "albef.json").write_text(json.dumps(albef))
    corpus = read_corpus([str(tmp_path / "albef.json")])
    assert corpus.formats[str(tmp_path / "albef.json")] == "albef"
    record = corpus.records["img_0.jpg"]
    assert record.split == "test" and record.label == "farm" and len(record.captions) == 3
    # AMFMN precomp without a split in the names: --split decides, else the seeded split
    amfmn = tmp_path / "precomp"
    amfmn.mkdir()
    (amfmn / "all_filename.txt").write_text("\n".join(names) + "\n")
    (amfmn / "all_caps.txt").write_text("\n".join(f"{n} , seen from above ." for n in names for _ in range(2)) + "\n")
    chosen = ingest_corpus(str(images), str(amfmn), "opt", str(tmp_path / "out"), split="val", workers=1)
    assert chosen["splits"] == {"val": {"rows": 6, "captions": 12}} and chosen["split_sources"] == {"option": 6}
    ingest_corpus(str(images), str(amfmn), "seeded", str(tmp_path / "out"), seed=7, workers=1)
    expected = {f"seeded/img_{i}": seeded_split(f"seeded/img_{i}", 7) for i in range(6)}
    assert {r["image_id"]: r["split"] for r in _rows(tmp_path / "out" / "seeded")} == expected
    assert _rows(tmp_path / "out" / "seeded")[0]["captions"][0] == "img_0.jpg, seen from above"


def test_split_table_decides_and_labels(tmp_path: Path) -> None:
    names = ["a.jpg", "b.jpg", "c.jpg"]
    images = _images(tmp_path / "images", names)
    vt = tmp_path / "vt.csv"
    vt.write_text(
        ",filename,img_id,split,label,sent_id,sentence\n"
        + "".join(f'{i},{n},{i},train,,"[{i}]","[\'{n} from VT\']"\n' for i, n in enumerate(names))
    )
    table = tmp_path / "splits.csv"
    table.write_text("filename,split,label\na.jpg,train,farm\nb.jpg,val,port\nc.jpg,test,port\n")
    manifest = ingest_corpus(str(images), str(vt), "t", str(tmp_path / "out"), split_table=str(table), workers=1)
    rows = {r["image_id"]: (r["split"], r["label"]) for r in _rows(tmp_path / "out" / "t")}
    assert rows == {"t/a": ("train", "farm"), "t/b": ("val", "port"), "t/c": ("test", "port")}
    assert manifest["split_sources"] == {"table": 3} and manifest["split_conflicts_with_table"] == 2


def test_caption_helpers() -> None:
    assert normalize_caption("  A playground ,  near trees . ") == "a playground, near trees"
    assert split_from_name("harma_rsicd_val.json") == "val" and split_from_name("test_caps.txt") == "test"
    assert split_from_name("vt-rsbs_RSICD.csv") is None and split_from_name("contest.json") is None
    counts = {s: sum(seeded_split(f"x/{i}") == s for i in range(2000)) for s in ("train", "val", "test")}
    assert 1500 < counts["train"] < 1700 and 120 < counts["val"] < 280 and 120 < counts["test"] < 280


def test_odd_rasters_ingest_with_reasons_or_are_rejected(tmp_path: Path) -> None:
    scenes = odd_scenes(tmp_path / "scenes")
    manifest = ingest_scenes([str(tmp_path / "scenes")], "odd", str(tmp_path / "out"), TileOptions(64), workers=1)
    _reconciles(manifest)
    reasons = {Path(q["input"]).name: q["reason"] for q in manifest["quarantined"]}
    assert set(reasons) == {"corrupt.tif", "zero.tif"} and all("not a readable raster" in r for r in reasons.values())
    by_name = {s["name"]: s for s in manifest["scenes"]}
    assert by_name["no_crs"]["georef_reason"] == "no CRS"
    assert "GCPs only" in by_name["gcps_only"]["georef_reason"]
    assert "not an Earth CRS" in by_name["mars"]["georef_reason"]
    assert by_name["uint16"]["dtype"] == "uint16" and by_name["uint16"]["stretch_high"][0] > 1000
    rows = {r["image_id"]: r for r in _rows(tmp_path / "out" / "odd")}
    assert rows["odd/no_crs_r000000_c000000"]["geometry"] is None
    assert rows["odd/mars_r000000_c000000"]["geometry"] is None and rows["odd/mars_r000000_c000000"]["crs"]
    dated = rows["odd/dated_r000000_c000000"]
    assert dated["acquired_at"].isoformat().startswith("2021-06-01T10:30") and dated["geometry"] is not None
    assert dated["bounds"] == [500000.0, 5000000.0 - 640, 500640.0, 5000000.0]
    # the float scene's upper 48 rows are NaN: its first window is 75 % nodata and is skipped
    assert "odd/float_nan_r000000_c000000" not in rows and by_name["float_nan"]["skipped"] >= 1
    with pytest.raises(IngestError, match="georeferenced tiles were required"):
        ingest_scenes(
            [str(scenes["no_crs"])], "strict", str(tmp_path / "out"), TileOptions(64, require_georef=True), workers=1
        )


def test_windows_edges_overlap_bands_and_stacks(tmp_path: Path) -> None:
    data = gradient(100, 130)
    rgb = write_geotiff(tmp_path / "rgb.tif", data)
    for band, name in enumerate(("r", "g", "b")):
        write_geotiff(tmp_path / f"{name}.tif", data[band : band + 1])
    out = str(tmp_path / "out")
    padded = ingest_scenes([str(rgb)], "pad", out, TileOptions(64, max_nodata=1.0), workers=1)
    dropped = ingest_scenes([str(rgb)], "drop", out, TileOptions(64, edge="drop"), workers=1)
    overlapped = ingest_scenes([str(rgb)], "ovl", out, TileOptions(64, overlap=32, edge="drop"), workers=1)
    assert (padded["rows"], dropped["rows"], overlapped["rows"]) == (2 * 3, 1 * 2, 2 * 3)
    edge = next(r for r in _rows(Path(out) / "pad") if r["window"]["col_off"] == 128)
    pixels = np.asarray(Image.open(io.BytesIO(edge["image"])))
    assert pixels.shape == (64, 64, 3) and not pixels[:, 2:].any()  # 2 real columns, the rest padding
    np.testing.assert_array_equal(pixels[:, :2].transpose(2, 0, 1), data[:, 0:64, 128:130])
    first = next(r for r in _rows(Path(out) / "pad") if r["window"]["col_off"] == 0 and r["window"]["row_off"] == 0)
    np.testing.assert_array_equal(
        np.asarray(Image.open(io.BytesIO(first["image"]))).transpose(2, 0, 1), data[:, :64, :64]
    )
    swapped = ingest_scenes([str(rgb)], "bgr", out, TileOptions(64, bands=(3, 2, 1), edge="drop"), workers=1)
    stacked_spec = ",".join(str(tmp_path / f"{n}.tif") for n in ("r", "g", "b"))
    stacked = ingest_scenes([stacked_spec], "stack", out, TileOptions(64, edge="drop"), workers=1)
    assert swapped["rows"] == stacked["rows"] == 2
    bgr = next(r for r in _rows(Path(out) / "bgr") if r["window"]["col_off"] == 0)
    np.testing.assert_array_equal(
        np.asarray(Image.open(io.BytesIO(bgr["image"])))[..., ::-1].transpose(2, 0, 1), data[:, :64, :64]
    )
    plain = {r["window"]["col_off"]: r["sha256"] for r in _rows(Path(out) / "drop")}
    assert {r["window"]["col_off"]: r["sha256"] for r in _rows(Path(out) / "stack")} == plain


@pytest.mark.ray
def test_parallel_ingest_on_ray_writes_the_same_shards(ray_local: None, tmp_path: Path) -> None:
    images = _images(tmp_path / "images", [f"p{i:03d}.jpg" for i in range(60)])
    (tmp_path / "caps.json").write_text(
        json.dumps({"images": [{"filename": f"p{i:03d}.jpg", "sentences": [{"raw": f"tile {i}"}]} for i in range(60)]})
    )
    args = (str(images), str(tmp_path / "caps.json"), "par")
    serial = ingest_corpus(*args, str(tmp_path / "one"), workers=1, shard_mb=0)
    parallel = ingest_corpus(*args, str(tmp_path / "two"), workers=2, shard_mb=0)
    assert len(serial["shards"]) == 60
    assert [s["sha256"] for s in parallel["shards"]] == [s["sha256"] for s in serial["shards"]]


def test_a_killed_ingest_resumes_to_the_same_result(tmp_path: Path) -> None:
    count = 400
    images = _images(tmp_path / "images", [f"k{i:04d}.jpg" for i in range(count)])
    entries = [{"filename": f"k{i:04d}.jpg", "split": "train", "sentences": [{"raw": f"k {i}"}]} for i in range(count)]
    (tmp_path / "caps.json").write_text(json.dumps({"images": entries}))
    command = [
        sys.executable,
        "-m",
        "rsitr.cli",
        "ingest",
        "corpus",
        "--images",
        str(images),
        "--captions",
        str(tmp_path / "caps.json"),
        "--dataset",
        "k",
        "--workers",
        "1",
        "--shard-mb",
        "0",
    ]
    clean = subprocess.run([*command, "--out", str(tmp_path / "clean")], capture_output=True, text=True, cwd=PROJECT)
    assert clean.returncode == 0, clean.stderr
    records = tmp_path / "killed" / "k" / "_ingest"
    twenty_done = lambda: len(list(records.glob("part-*.json"))) >= 20  # noqa: E731
    kill_when([*command, "--out", str(tmp_path / "killed")], twenty_done, "20 units recorded", PROJECT, timeout=120)
    done = len(list(records.glob("part-*.json")))
    assert 20 <= done < count and not (tmp_path / "killed" / "k" / "manifest.json").exists()
    resumed = subprocess.run([*command, "--out", str(tmp_path / "killed")], capture_output=True, text=True, cwd=PROJECT)
    assert resumed.returncode == 0, resumed.stderr
    first = json.loads((tmp_path / "clean" / "k" / "manifest.json").read_text())
    second = json.loads((tmp_path / "killed" / "k" / "manifest.json").read_text())
    assert second["shards"] == first["shards"] and second["rows"] == count
    leftovers = [p for p in (tmp_path / "killed").rglob("*") if ".tmp-" in p.name]
    assert not leftovers


def test_typed_rejections_fingerprint_as_the_dicts_earlier_plans_held() -> None:
    # an ingest planned before rejections were typed must still be recognised as the same plan (and resume)
    typed = plan_fingerprint([{"kind": "corpus"}, [Rejection("a.jpg", "empty image file", 2)]])
    plain = plan_fingerprint([{"kind": "corpus"}, [{"input": "a.jpg", "reason": "empty image file", "captions": 2}]])
    assert typed == plain
    record = asdict(UnitReport(quarantined=[Rejection("b.jpg", "truncated", 1)], inputs=3))
    assert UnitReport.from_record(json.loads(json.dumps(record))).quarantined == [Rejection("b.jpg", "truncated", 1)]


def test_a_resumed_ingest_rewrites_a_finished_units_lost_shard(tmp_path: Path) -> None:
    images, captions = broken_corpus(tmp_path / "corpus")
    first = ingest_corpus(str(images), str(captions), "bad", str(tmp_path / "out"), workers=1)
    root = tmp_path / "out" / "bad"
    shard = root / first["shards"][0]["path"]
    # an interrupted ingest whose store lost a shard after its unit had recorded it done
    (root / shards.MANIFEST_NAME).unlink()
    shard.unlink()
    again = ingest_corpus(str(images), str(captions), "bad", str(tmp_path / "out"), workers=1)
    assert shard.is_file() and again == first


def test_rows_of_one_split_can_be_read_without_asking_for_the_split_column(tmp_path: Path) -> None:
    images, captions = broken_corpus(tmp_path / "corpus")
    manifest = ingest_corpus(str(images), str(captions), "bad", str(tmp_path), workers=1)
    val = list(shards.iter_rows(str(tmp_path / "bad"), ["image_id"], split="val"))
    assert len(val) == manifest["splits"]["val"]["rows"] > 0
