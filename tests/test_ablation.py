"""The quality ablation runner on the tiny demo corpus: real tower features, real heads, resumable results."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import ablation  # noqa: E402
from heads import Corpus, HeadsRecipe, with_changes  # noqa: E402
from tower_features import ImageTower, TextTower, extract  # noqa: E402


@pytest.fixture(scope="module")
def tiny_features(demo_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("features")
    timings = extract(
        str(demo_shards), out, [ImageTower("efficientnet_lite0", 64, "backbone")], [TextTower("all-MiniLM-L6-v2")]
    )
    assert set(timings) == {"img-efficientnet_lite0-64-backbone", "txt-all-MiniLM-L6-v2-32"}
    assert extract(str(demo_shards), out, [ImageTower("efficientnet_lite0", 64, "backbone")], []) == {}  # resumed
    return out


def test_joined_towers_write_their_one_view_and_eight_view_sets_from_one_pass(
    tiny_features: Path, demo_shards: Path
) -> None:
    joined = ImageTower("efficientnet_lite0+efficientnet_lite0", 64, "backbone", dihedral=True)
    name = "img-efficientnet_lite0-efficientnet_lite0-64-backbone"
    assert joined.outputs == [name, f"{name}-d8"]
    timings = extract(str(demo_shards), tiny_features, [joined], [])
    assert set(timings) == set(joined.outputs)
    single = np.load(tiny_features / "img-efficientnet_lite0-64-backbone.npz")["features"]
    one, eight = (np.load(tiny_features / f"{name}.npz")["features"] for name in joined.outputs)
    # joined towers put their scales side by side; view 1 is the tile as it is
    np.testing.assert_array_equal(one, np.concatenate([single, single], axis=1))
    assert eight.shape == one.shape and not np.allclose(eight, one, atol=1e-2)


def test_ablation_rows_train_measure_and_resume(tiny_features: Path, tmp_path: Path) -> None:
    recipe = HeadsRecipe(
        image="img-efficientnet_lite0-64-backbone", epochs=4, batch_size=32, hidden=128, embed_dim=64, dropout=0.1
    )
    rows = [
        ablation.Row("floor", "heads", recipe, seeds=(0, 1)),
        ablation.Row("dup", "duplicate-aware + re-rank", with_changes(recipe, duplicate_aware=True), rerank_k=5),
        ablation.Row("other test features", "tested on other features", with_changes(recipe, test_image=FLIPPED)),
    ]
    runner = ablation.Ablation(tmp_path, Corpus(tiny_features))
    results = runner.run(rows)
    floor = results["floor"]
    assert set(floor["seeds"]) == {"0", "1"} and floor["summary"]["seeds"] == 2
    for outcome in floor["seeds"].values():
        assert 1 <= outcome["epoch"] <= 4 and len(outcome["val_history"]) == 4
        assert outcome["test"]["mR"] > 10  # chance on the demo's ~70 test tiles is ~ 4
    assert floor["seeds"]["0"]["test"] != floor["seeds"]["1"]["test"]  # seeds differ
    assert "test_rerank" in results["dup"]["seeds"]["0"]
    # the same training (seed 0), a different test set of features
    assert results["other test features"]["seeds"]["0"]["val_history"] != floor["seeds"]["0"]["val_history"]
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert saved == json.loads(json.dumps(results))
    # a second run finds every (row, seed) done and trains nothing
    stamp = (tmp_path / "ablation.json").stat().st_mtime_ns
    assert runner.run(rows) == saved
    assert (tmp_path / "ablation.json").stat().st_mtime_ns == stamp
    table = ablation.markdown(saved)
    assert table.count("\n") == 5 and "| floor |" in table and "+0.00" in table
    ablation.bar_chart(saved, tmp_path / "ablation.png", {"floor": 20.0})
    assert (tmp_path / "ablation.png").read_bytes()[:4] == b"\x89PNG"


FLIPPED = "img-efficientnet_lite0-64-backbone-flipped"


@pytest.fixture(scope="module", autouse=True)
def flipped_features(tiny_features: Path) -> None:
    """A second image feature set of the same width (the features reversed), for rows tested on other features."""
    base = np.load(tiny_features / "img-efficientnet_lite0-64-backbone.npz")
    np.savez(tiny_features / f"{FLIPPED}.npz", features=base["features"][:, ::-1], seconds=base["seconds"])


def test_a_pipeline_row_without_a_runner_is_refused(tiny_features: Path, tmp_path: Path) -> None:
    runner = ablation.Ablation(tmp_path, Corpus(tiny_features))
    with pytest.raises(ValueError, match="pipeline"):
        runner.run([ablation.Row("e2e", "through Ray Train", preset="demo")])


def test_image_views_benchmark_measures_each_view_count_for_every_run(
    demo_shards: Path, untrained_checkpoint: Path
) -> None:
    from image_views import measure

    results = measure(
        [str(untrained_checkpoint), str(untrained_checkpoint)], str(demo_shards), splits=("val",), rerank_k=5
    )
    variants = [
        "1 view", "4 views, feature mean", "8 views, feature mean (model.test_views=8)",
        "4 views, embedding mean", "8 views, embedding mean",
    ]  # fmt: skip
    assert set(results) == {*variants, *(f"{name} + re-rank k=5" for name in variants)}
    assert results["1 view + re-rank k=5"]["val"]["mean"] != results["1 view"]["val"]["mean"]
    one, eight = results["1 view"]["val"], results["8 views, feature mean (model.test_views=8)"]["val"]
    assert len(one["per_run"]) == 2 and one["per_run"][0] == one["per_run"][1] and one["std"] == 0
    assert 0 < one["mean"] <= 100 and eight["mean"] != one["mean"]
