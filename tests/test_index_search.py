import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import shapely

from rsitr.checkpoint import CheckpointError, save_checkpoint
from rsitr.config import load_config
from rsitr.embed import embed_archive
from rsitr.index import IndexNotFoundError, build_index, open_index
from rsitr.models.msa import build_model
from rsitr.search import Searcher, SearchError


@pytest.fixture(scope="module")
def built_index(ray_local: None, demo_shards: Path, untrained_checkpoint: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("index")
    summary = embed_archive(str(untrained_checkpoint), str(demo_shards), str(out))
    build_index(summary["embeddings"], str(out), summary["checkpoint"])
    return out


def test_embeddings_are_geoparquet_with_one_row_per_tile(built_index: Path) -> None:
    table = pq.read_table(built_index / "embeddings.parquet")
    assert table.num_rows == 432
    assert table.schema.field("embedding").type.list_size == 256
    assert json.loads(table.schema.metadata[b"geo"])["columns"]["geometry"]["encoding"] == "WKB"
    assert len(set(table["model_version"].to_pylist())) == 1


def test_search_returns_ranked_tiles_with_footprints(built_index: Path) -> None:
    searcher = Searcher(str(built_index))
    hits = searcher.search("a lake in the north of dense forest", k=7)
    assert [h.rank for h in hits] == list(range(1, 8))
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:], strict=False))
    assert all(shapely.from_wkt(h.footprint).is_valid for h in hits)
    table, _ = open_index(str(built_index))
    assert table.count_rows() == 432


def test_search_rejects_bad_input(built_index: Path, tmp_path: Path) -> None:
    with pytest.raises(SearchError, match="empty query"):
        Searcher(str(built_index)).search("   ")
    with pytest.raises(IndexNotFoundError, match="no index"):
        Searcher(str(tmp_path / "nowhere"))
    other = tmp_path / "other"
    config = load_config("demo")
    save_checkpoint(other, build_model(config.model), None, config, epoch=0, metrics={})
    with pytest.raises(SearchError, match="model version"):
        Searcher(str(built_index), checkpoint=str(other))
    with pytest.raises(CheckpointError):
        Searcher(str(built_index), checkpoint=str(tmp_path / "no-checkpoint"))


def test_rebuild_keeps_one_consistent_table(built_index: Path, tmp_path: Path) -> None:
    meta = build_index(str(built_index / "embeddings.parquet"), str(tmp_path / "copy"))
    assert meta["rows"] == 432 and meta["kind"] == "exact"
    meta = build_index(str(built_index / "embeddings.parquet"), str(tmp_path / "copy"))
    table, _ = open_index(str(tmp_path / "copy"))
    assert table.count_rows() == 432
