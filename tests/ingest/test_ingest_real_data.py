"""Ingest of the real data ($RSITR_DATA): RSICD in its three formats, RSITMD's captions, the sample GeoTIFFs."""

import json
from pathlib import Path

import pytest
import shapely
from conftest import shared

from rsitr.ingest import IngestError, ingest_corpus, ingest_scenes
from rsitr.io import shards
from rsitr.io.captions import read_corpus
from rsitr.io.geotiff import TileOptions

OFFICIAL_SPLIT = {"train": 8734, "val": 1094, "test": 1093}


def _split_rows(manifest: dict) -> dict[str, int]:
    return {split: tally["rows"] for split, tally in manifest["splits"].items()}


def _captions_by_id(root: Path) -> dict[str, tuple[str, list[str]]]:
    return {
        r["image_id"]: (r["split"], r["captions"])
        for r in shards.iter_rows(str(root), ["image_id", "split", "captions"])
    }


def test_rsicd_gives_the_same_corpus_from_each_of_its_formats(tmp_path: Path) -> None:
    rsicd = shared("rsicd")
    captions = rsicd / "captions"
    table = str(rsicd / "rsicd_splits.csv")
    out = str(tmp_path)
    vt = ingest_corpus(str(rsicd / "images"), str(captions / "vt-rsbs_RSICD.csv"), "vt", out, workers=1)
    amfmn = ingest_corpus(
        str(rsicd / "images"), str(captions / "amfmn_rsicd_precomp"), "amfmn", out, split_table=table, workers=1
    )
    for manifest in (vt, amfmn):
        assert manifest["rows"] == manifest["inputs_seen"] == 10921 and not manifest["quarantined"]
        assert manifest["captions_seen"] == 54605
        assert manifest["captions"] == 54602 and len(manifest["captions_rejected"]) == 3  # three empty strings
        assert _split_rows(manifest) == OFFICIAL_SPLIT
    # AMFMN merges val into train; without the split table its file names give train 9,828 / test 1,093
    assert read_corpus([str(captions / "amfmn_rsicd_precomp")]).records["00001.jpg"].split == "train"
    # the two ingests name images alike ("vt/x" vs "amfmn/x") and carry identical captions and splits
    vt_rows = {k.split("/", 1)[1]: v for k, v in _captions_by_id(tmp_path / "vt").items()}
    amfmn_rows = {k.split("/", 1)[1]: v for k, v in _captions_by_id(tmp_path / "amfmn").items()}
    assert vt_rows == amfmn_rows
    # HarMA ships val and test only (its "val" is its own: 1,738 of its 1,966 images are official train)
    harma_files = [str(captions / "harma_rsicd_val.json"), str(captions / "harma_rsicd_test.json")]
    harma = ingest_corpus(str(rsicd / "images"), harma_files, "harma", out, workers=1)
    assert harma["rows"] == 3059 and harma["inputs_seen"] == 10921
    assert {q["reason"] for q in harma["quarantined"]} == {"image has no caption in the caption files"}
    harma_rows = _captions_by_id(tmp_path / "harma")
    assert all(vt_rows[k.split("/", 1)[1]][1] == v[1] for k, v in harma_rows.items())
    assert sum(v[0] == "test" for v in harma_rows.values()) == 1093


def test_rsitmd_captions_parse_in_every_format_and_missing_images_are_quarantined(tmp_path: Path) -> None:
    captions = shared("rsitmd", "captions")
    sources = {
        "vt-rsbs": [captions / "vt-rsbs_RSITMD.csv"],
        "albef": [captions / f"harma_rsitmd_{s}.json" for s in ("train", "val", "test")],
        "amfmn": [captions / "amfmn_rsitmd_precomp"],
    }
    for fmt, files in sources.items():
        corpus = read_corpus([str(f) for f in files])
        assert set(corpus.formats.values()) == {fmt}
        assert len(corpus.records) == 4743 and corpus.captions_seen == 23715 and not corpus.duplicate_entries
        assert sum(r.split == "test" for r in corpus.records.values()) == 452
    images = tmp_path / "images"
    images.mkdir()
    with pytest.raises(IngestError, match="nothing usable"):
        ingest_corpus(str(images), str(sources["vt-rsbs"][0]), "rsitmd", str(tmp_path / "out"), workers=1)
    manifest = json.loads((tmp_path / "out" / "rsitmd" / "manifest.json").read_text())
    assert manifest["inputs_seen"] == len(manifest["quarantined"]) == 4743
    assert all(q["reason"].startswith("image file is missing") for q in manifest["quarantined"])


def test_every_shared_geotiff_yields_footprinted_tiles_or_a_recorded_reason(tmp_path: Path) -> None:
    folder = shared("geotiff")
    scenes = [str(p) for p in sorted(folder.glob("*.tif")) if p.name != "cog_world.tif"]
    scenes.append(",".join(str(folder / f"{band}.tif") for band in ("red", "green", "blue")))
    manifest = ingest_scenes(scenes, "samples", str(tmp_path), TileOptions(256), workers=1)
    # the 36000 × 18000 world COG, read through its overviews: 4096-px windows stored at 128 px
    world = ingest_scenes([str(folder / "cog_world.tif")], "world", str(tmp_path), TileOptions(4096, 128), workers=1)
    assert world["rows"] > 0 and world["scenes"][0]["windows"] == 9 * 5
    reports = manifest["scenes"] + world["scenes"]
    assert len(reports) == 18 + 1 and not manifest["quarantined"]  # 18 files and the stacked red+green+blue
    rows = list(shards.iter_rows(str(tmp_path / "samples"))) + list(shards.iter_rows(str(tmp_path / "world")))
    for report in reports:
        own = [r for r in rows if r["source_uri"] == report["source"]]
        explained = report.get("note") or report["georef_reason"] or report.get("footprint_reason")
        assert len(own) == report["rows"]
        assert explained or (own and all(r["geometry"] for r in own)), report["name"]
        for row in own:
            if row["geometry"]:
                lon_min, lat_min, lon_max, lat_max = shapely.from_wkb(row["geometry"]).bounds
                assert -180 <= lon_min <= lon_max <= 180 and -90 <= lat_min <= lat_max <= 90
    by_name = {r["name"]: r for r in reports}
    assert by_name["all-nodata"]["rows"] == 0 and "nodata" in by_name["all-nodata"]["note"]
    assert by_name["goes"]["footprint_reason"] and by_name["red+green+blue"]["bands"] == [1, 2, 3]
    assert by_name["mosaic_cog1"]["dtype"] == "uint16" and by_name["RGBA.byte"]["rows"] > 0
