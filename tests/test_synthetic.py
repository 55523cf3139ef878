import hashlib
import json
from pathlib import Path

import numpy as np
import rasterio

from rsitr.synthetic import generate_demo_corpus


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    generate_demo_corpus(tmp_path / "a", seed=3, scenes=2)
    generate_demo_corpus(tmp_path / "b", seed=3, scenes=2)
    generate_demo_corpus(tmp_path / "c", seed=4, scenes=2)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_scenes_are_georeferenced_and_captions_match_the_drawing(demo_corpus: Path) -> None:
    captions = json.loads((demo_corpus / "captions.json").read_text())["images"]
    assert len(captions) == 432 and all(len(entry["sentences"]) == 5 for entry in captions)
    assert {entry["split"] for entry in captions} == {"train", "val", "test"}
    with rasterio.open(demo_corpus / "scenes" / "demo_scene_000.tif") as src:
        assert src.crs.to_epsg() == 32633 and src.transform.a == 10
        pixels = src.read()
    water_tiles = dry_tiles = 0
    for entry in captions:
        if not entry["filename"].startswith("demo_scene_000_"):
            continue
        _, _, _, row, col = entry["filename"].split("_")
        r, c = int(row[1:]), int(col[1:])
        tile = pixels[:, r : r + 128, c : c + 128].astype(int)
        # The drawn water colour is strongly blue; land covers never are.
        blue = ((tile[2] > tile[1] + 40) & (tile[2] > tile[0] + 60)).mean()
        text = " ".join(s["raw"] for s in entry["sentences"])
        if "river" in text or "lake" in text:
            water_tiles += 1
            assert blue > 0.05, entry["filename"]
        else:
            dry_tiles += 1
            roofs_blue = "blue roof" in text
            assert blue < (0.05 if roofs_blue else 0.01), entry["filename"]
    assert water_tiles and dry_tiles
    assert np.unique(pixels).size > 50
