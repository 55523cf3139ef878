import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import shapely
import torch
from contracts_doc import documented

from rsitr.cli import main as cli_main
from rsitr.config import load_config
from rsitr.data.preprocess import decode_image, tokenize
from rsitr.errors import EmbeddingsNotFoundError, IndexNotFoundError
from rsitr.io import shards
from rsitr.models.checkpoint import CheckpointError, save_checkpoint
from rsitr.models.msa import build_model
from rsitr.retrieval import embed, reindex
from rsitr.retrieval import index as index_module
from rsitr.retrieval.embed import embed_archive
from rsitr.retrieval.index import build_index, open_index
from rsitr.retrieval.index_meta import CellGrid
from rsitr.retrieval.search import Searcher, SearchError, SearchFilter, nearest
from rsitr.retrieval.search_inputs import TextQuery
from rsitr.retrieval.tile_rows import SortedTiles, index_rows

PROJECT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def built_index(demo_index_folder: Path) -> Path:
    return demo_index_folder  # shared with other modules: these tests only read it


@pytest.mark.ray
def test_embeddings_are_geoparquet_with_one_row_per_tile(built_index: Path) -> None:
    table = pq.read_table(built_index / "embeddings.parquet")
    assert table.num_rows == 432
    assert table.schema.field("embedding").type.list_size == 256
    assert json.loads(table.schema.metadata[b"geo"])["columns"]["geometry"]["encoding"] == "WKB"
    assert len(set(table["model_version"].to_pylist())) == 1


@pytest.mark.ray
def test_embeddings_and_index_json_hold_what_docs_contracts_says(built_index: Path) -> None:
    assert pq.read_schema(built_index / "embeddings.parquet").names == documented("Embeddings")
    meta = json.loads((built_index / index_module.INDEX_META).read_text())
    assert set(documented("Index")) <= set(meta)


@pytest.mark.ray
def test_search_returns_ranked_tiles_with_footprints(built_index: Path) -> None:
    searcher = Searcher(str(built_index))
    hits = searcher.search("a lake in the north of dense forest", k=7)
    assert [h.rank for h in hits] == list(range(1, 8))
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:], strict=False))
    assert all(shapely.from_wkt(h.footprint).is_valid for h in hits)
    table, _ = open_index(str(built_index))
    assert table.count_rows() == 432


@pytest.mark.ray
def test_a_query_padded_to_its_length_embeds_as_one_padded_to_max_tokens(built_index: Path) -> None:
    searcher = Searcher(str(built_index), bf16_queries=False)
    query = "a river crosses dense forest"
    full = tokenize([query], searcher.config.model.text_model, searcher.config.model.max_tokens)
    assert int(full["attention_mask"].sum()) < full["attention_mask"].shape[1]  # the shortcut changes the input
    with torch.no_grad():
        expected = searcher.model.encode_text(
            torch.as_tensor(full["input_ids"]), torch.as_tensor(full["attention_mask"])
        )
    torch.testing.assert_close(searcher.encode_query(query), expected[0], atol=1e-5, rtol=1e-4)
    # in a batch beside a longer query (padded further) it embeds the same, and so does the longer one
    longer = "many buildings and green trees are around a playground next to a road"
    batched = searcher.encode_queries([query, longer])
    torch.testing.assert_close(batched[0], expected[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batched[1], searcher.encode_queries([longer])[0], atol=1e-5, rtol=1e-4)


@pytest.mark.ray
def test_a_batch_of_searches_answers_what_each_search_answers_alone(built_index: Path, demo_shards: Path) -> None:
    searcher = Searcher(str(built_index))
    corner = shapely.from_wkt(searcher.search("dense forest", k=432)[-1].footprint).bounds
    queries = [
        TextQuery("a lake in the north of dense forest", 7),
        TextQuery("a river crosses dense forest", 5, SearchFilter(bbox=corner)),
        TextQuery("bare land beside farmland", 10, rerank=20),
        TextQuery("many buildings and green trees are around a playground next to a road", 3),
        TextQuery("dense forest", 4, SearchFilter(after=datetime(2024, 4, 1, tzinfo=UTC))),
    ]
    for query, hits in zip(queries, searcher.search_many(queries), strict=True):
        alone = searcher.search(query.text, query.k, query.where, query.rerank)
        assert [h.image_id for h in hits] == [h.image_id for h in alone] and len(hits) == len(alone) > 0
        # in bfloat16 (CPUs with it) a query padded beside longer ones moves in the fourth decimal
        assert [h.score for h in hits] == pytest.approx([h.score for h in alone], abs=1e-3)
        assert [h.rerank_score for h in hits] == pytest.approx([h.rerank_score for h in alone], abs=1e-3)
    images = [row["image"] for row, _ in zip(shards.iter_rows(str(demo_shards), ["image"]), range(3), strict=False)]
    together = searcher.encode_images([searcher.decode_image(data) for data in images])
    for data, vector in zip(images, together, strict=True):
        torch.testing.assert_close(vector, searcher.encode_image_bytes(data), atol=1e-5, rtol=1e-4)
    with pytest.raises(SearchError, match="'notes.txt': cannot be read as an image"):
        searcher.decode_image(b"not an image", "'notes.txt'")


@pytest.mark.ray
def test_bf16_queries_find_what_float32_queries_find(built_index: Path) -> None:
    exact, fast = Searcher(str(built_index), bf16_queries=False), Searcher(str(built_index), bf16_queries=True)
    queries = ["a lake in the north of dense forest", "a river crosses dense forest", "bare land beside farmland"]
    cosine = (exact.encode_queries(queries) * fast.encode_queries(queries)).sum(dim=1)
    assert float(cosine.min()) > 0.999 and torch.allclose(fast.encode_queries(queries).norm(dim=1), torch.ones(3))
    for query in queries:
        assert [h.image_id for h in fast.search(query, k=5)] == [h.image_id for h in exact.search(query, k=5)]


@pytest.mark.ray
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


@pytest.mark.ray
def test_an_embeddings_file_streams_into_the_rows_index_rows_makes_of_it(built_index: Path, tmp_path: Path) -> None:
    file = built_index / "embeddings.parquet"
    expected = index_rows(index_module.read_embeddings(str(file)))
    with SortedTiles(str(file), batch_rows=50) as tiles:  # 432 rows: nine batches, the last one short
        scratch = tiles._vectors.parent
        streamed = pa.Table.from_batches(list(tiles.batches()), schema=tiles.schema)
        assert scratch.exists() and (tiles.rows, tiles.model_version) == (432, expected["model_version"][0].as_py())
    assert not scratch.exists()  # the spilled vectors go with the build
    assert streamed.schema == expected.schema
    # ties in cell order may come in either order: compare row by row, keyed by id
    assert streamed["cell"].to_pylist() == expected["cell"].to_pylist()
    assert sorted(streamed.to_pylist(), key=lambda r: r["image_id"]) == sorted(
        expected.to_pylist(), key=lambda r: r["image_id"]
    )
    notes = tmp_path / "notes.parquet"
    pq.write_table(pa.table({"image_id": ["a"], "caption": ["no vectors here"]}), notes)
    for bad in (notes, built_index / "index.json"):
        with pytest.raises(EmbeddingsNotFoundError, match=bad.name):
            SortedTiles(str(bad))


@pytest.mark.ray
def test_rebuild_keeps_one_consistent_table(built_index: Path, tmp_path: Path) -> None:
    meta = build_index(str(built_index / "embeddings.parquet"), str(tmp_path / "copy"))
    assert meta["rows"] == 432 and meta["kind"] == "exact"
    meta = build_index(str(built_index / "embeddings.parquet"), str(tmp_path / "copy"))
    table, _ = open_index(str(tmp_path / "copy"))
    assert table.count_rows() == 432


@pytest.mark.ray
def test_filters_return_only_tiles_inside_the_bbox_and_time_range(built_index: Path) -> None:
    searcher = Searcher(str(built_index))
    everything = searcher.search("dense forest", k=432)
    anchor = shapely.from_wkt(everything[-1].footprint)  # the worst match: a filter must bring it forward
    minx, miny, maxx, maxy = anchor.bounds
    box = (minx, miny, (minx + maxx) / 2, (miny + maxy) / 2)
    hits = searcher.search("dense forest", k=20, where=SearchFilter(bbox=box))
    region = shapely.box(*box)
    assert hits and all(shapely.from_wkt(h.footprint).intersects(region) for h in hits)
    assert everything[-1].image_id in {h.image_id for h in hits}
    expected = {h.image_id for h in everything if shapely.from_wkt(h.footprint).intersects(region)}
    assert {h.image_id for h in hits} == expected
    after, before = datetime(2024, 4, 1, tzinfo=UTC), datetime(2024, 4, 19, 10, 30, tzinfo=UTC)
    dated = searcher.search("dense forest", k=432, where=SearchFilter(after=after, before=before))
    acquired = {datetime.fromisoformat(h.acquired_at) for h in dated if h.acquired_at}
    # scenes are weekly: Apr 5 and Apr 12 fall inside, Apr 19 10:30 is the (exclusive) end
    assert acquired == {datetime(2024, 4, 5, 10, 30, tzinfo=UTC), datetime(2024, 4, 12, 10, 30, tzinfo=UTC)}
    assert len(dated) == 2 * 36


@pytest.mark.ray
@pytest.mark.parametrize(
    ("argument", "message"),
    [
        (["--bbox", "10,50,5,60"], "min <= max"),
        (["--bbox", "10,50,200,60"], "±180"),
        (["--bbox", "10,50,20"], "four numbers"),
        (["--after", "yesterday"], "ISO date"),
        (["--after", "2024-05-01", "--before", "2024-04-01"], "is not before"),
        (["-k", "0"], "between 1 and 1000"),
        (["-k", "1001"], "between 1 and 1000"),
    ],
)
def test_bad_filters_get_one_line_errors(
    built_index: Path, argument: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["search", "forest", "--index", str(built_index), *argument]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error


@pytest.mark.ray
def test_html_result_sheet_shows_thumbnails_scores_and_footprints(built_index: Path, tmp_path: Path) -> None:
    sheet = tmp_path / "hits.html"
    assert cli_main(["search", "a river crosses dense forest", "--index", str(built_index), "-k", "4",
                     "--html", str(sheet)]) == 0  # fmt: skip
    page = sheet.read_text()
    assert page.count("data:image/jpeg;base64,") == 4 and page.count("<polygon") == 4
    assert "a river crosses dense forest" in page and "http" not in page  # nothing fetched from a network


@pytest.mark.ray
def test_captions_are_embedded_and_searchable_from_an_image(
    built_index: Path, demo_shards: Path, tmp_path: Path
) -> None:
    captions = pq.read_table(built_index / "captions.parquet")
    shard_rows = list(shards.iter_rows(str(demo_shards), ["image_id", "captions"]))
    assert captions.num_rows == sum(len(r["captions"]) for r in shard_rows) > 432
    assert not (built_index / "_parts").exists()  # per-shard progress is removed once the files are written
    image = tmp_path / "tile.png"
    image.write_bytes(next(shards.iter_rows(str(demo_shards), ["image"]))["image"])
    searcher = Searcher(str(built_index))
    hits = searcher.captions_for_image(str(image), k=5)
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    assert all(h.caption_id.startswith(f"{h.image_id}#") for h in hits)
    with torch.no_grad():  # the caption table is small, so the search is exact: compare with brute force
        pixels = decode_image(image.read_bytes(), searcher.config.model.image_size)
        query = searcher.model.encode_image(torch.as_tensor(pixels[None]))[0].numpy()
    scores = np.stack(captions["embedding"].to_numpy(zero_copy_only=False)) @ query
    # the demo repeats caption texts across tiles, so ids tie: compare the scores
    assert [h.score for h in hits] == pytest.approx(np.sort(scores)[::-1][:5].tolist(), abs=1e-5)
    text = dict(zip(captions["caption_id"].to_pylist(), captions["caption"].to_pylist(), strict=True))
    assert all(text[h.caption_id] == h.caption for h in hits)


@pytest.mark.ray
def test_rerank_scores_follow_the_smr_formula(built_index: Path) -> None:
    query = "a river crosses dense forest"
    searcher = Searcher(str(built_index))
    plain = searcher.search(query, k=20)
    reranked = searcher.search(query, k=20, rerank=20)
    by_id = {h.image_id: h.score for h in plain}
    assert all(abs(by_id[h.image_id] - h.score) < 1e-5 for h in reranked)  # cosine scores unchanged
    # s′ recomputed here from the formula: the query among the caption table's vectors as reference queries
    tokens = {k: torch.as_tensor(v) for k, v in searcher_tokens(searcher, query).items()}
    with torch.no_grad():
        q = searcher.model.encode_text(tokens["input_ids"], tokens["attention_mask"])[0].numpy()
    references = np.stack(searcher.captions.to_arrow()["vector"].to_numpy(zero_copy_only=False))
    tiles = {row["image_id"]: row["vector"] for row in searcher.table.to_arrow().to_pylist()}
    candidates = np.stack([tiles[h.image_id] for h in plain])  # in forward (cosine) order
    columns = np.concatenate([q[None], references]) @ candidates.T
    own = q @ candidates.T
    reverse = (columns[1:] > own[None]).sum(0)  # the query's rank in each candidate's column
    reverse_position = np.argsort(np.argsort(reverse, kind="stable"), kind="stable")
    ranks = np.arange(len(plain))
    expected = own / columns.sum(0) + np.exp(-0.05 * (ranks + 1)) + 0.7 * np.exp(-0.05 * (reverse_position + 1))
    got = {h.image_id: h.rerank_score for h in reranked}
    np.testing.assert_allclose([got[h.image_id] for h in plain], expected, rtol=1e-4, atol=1e-5)
    assert [h.image_id for h in reranked] == [plain[i].image_id for i in np.argsort(-expected, kind="stable")]
    assert [h.image_id for h in searcher.search(query, k=5, rerank=20)] == [h.image_id for h in reranked[:5]]


def searcher_tokens(searcher: Searcher, text: str) -> dict[str, np.ndarray]:
    from rsitr.data.preprocess import tokenize

    return tokenize([text], searcher.config.model.text_model, searcher.config.model.max_tokens)


@pytest.mark.ray
def test_image_search_and_rerank_need_a_caption_table(
    built_index: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bare = tmp_path / "bare"
    build_index(str(built_index / "embeddings.parquet"), str(bare), open_index(str(built_index))[1]["checkpoint"])
    assert cli_main(["search", "forest", "--index", str(bare), "--rerank", "10"]) == 2
    assert "no caption table" in capsys.readouterr().err
    assert cli_main(["search", "--image", str(tmp_path / "missing.png"), "--index", str(built_index)]) == 2
    assert "missing.png" in capsys.readouterr().err
    assert cli_main(["search", "forest", "--image", "x.png", "--index", str(built_index)]) == 2
    assert "either a text query" in capsys.readouterr().err


@pytest.mark.ray
def test_an_interrupted_embedding_resumes_with_the_shards_it_had_not_finished(
    ray_local: None,
    built_index: Path,
    demo_shards: Path,
    untrained_checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "embedded"
    saved: list[str] = []
    write_part = embed._write_part

    def failing_after_three(uri: str, vectors: dict[str, np.ndarray]) -> None:  # the run dies (disk full, S3 error…)
        if len(saved) == 3:
            raise OSError("injected: storage went away")
        write_part(uri, vectors)
        saved.append(uri)

    monkeypatch.setattr(embed, "_write_part", failing_after_three)
    with pytest.raises(OSError, match="injected"):
        embed_archive(str(untrained_checkpoint), str(demo_shards), str(out))
    monkeypatch.undo()
    assert len(list(out.glob("_parts/*/images-*.parquet"))) == 3 and not (out / "embeddings.parquet").exists()
    summary = embed_archive(str(untrained_checkpoint), str(demo_shards), str(out))
    assert summary["resumed_shards"] == 3 and summary["rows"] == 432
    resumed, whole = pq.read_table(out / "embeddings.parquet"), pq.read_table(built_index / "embeddings.parquet")
    assert resumed["image_id"].to_pylist() == whole["image_id"].to_pylist()
    # embedding runs in bf16 where the CPU has it (--precision auto), and a resumed run batches the tiles differently,
    # so kernels may round a value one bf16 step apart (5 values of 110,592 by up to 4.9e-4, bf16's step at ~0.1);
    # distinct tiles differ by >= 0.027
    np.testing.assert_allclose(
        np.stack(resumed["embedding"].to_numpy(zero_copy_only=False)),
        np.stack(whole["embedding"].to_numpy(zero_copy_only=False)),
        atol=2e-3,
    )
    assert not (out / "_parts").exists()
    # parts embedded with another view count are other vectors: a run with --test-views 4 resumes none of them
    monkeypatch.setattr(embed, "_write_part", failing_after_three)
    saved.clear()
    with pytest.raises(OSError, match="injected"):
        embed_archive(str(untrained_checkpoint), str(demo_shards), str(out))
    monkeypatch.undo()
    four = embed_archive(str(untrained_checkpoint), str(demo_shards), str(out), test_views=4)
    assert four["resumed_shards"] == 0 and four["test_views"] == 4 and summary["test_views"] == 1
    averaged = np.stack(pq.read_table(out / "embeddings.parquet")["embedding"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(np.linalg.norm(averaged, axis=1), 1.0, atol=1e-4)
    assert not np.allclose(averaged, np.stack(whole["embedding"].to_numpy(zero_copy_only=False)), atol=1e-3)


@pytest.mark.ray
def test_tiles_and_captions_reach_the_embedding_actors_a_batch_at_a_time(ray_local: None, demo_shards: Path) -> None:
    # each block is one input of the actor pool: a shard in one block would be embedded by one actor alone
    uri = shards.shard_uris(str(demo_shards))[0]
    rows = pq.read_metadata(uri).num_rows
    captions = sum(len(c) for c in pq.read_table(uri, columns=["captions"])["captions"].to_pylist())
    assert rows > 32 and captions > rows
    for stream, count in [
        (embed.decoded_tiles([uri], image_size=64, batch_size=16, decoders=1), rows),
        (embed.caption_texts([uri], batch_size=16, readers=1), captions),
    ]:
        sizes = [len(block["path"]) for block in stream.iter_batches(batch_size=None)]
        assert sum(sizes) == count and max(sizes) <= 16 and len(sizes) >= count / 16, sizes


@pytest.mark.ray
@pytest.mark.s3
def test_the_index_lives_on_s3_too(ray_local: None, built_index: Path, demo_shards: Path, s3_bucket: str) -> None:
    summary = embed_archive(open_index(str(built_index))[1]["checkpoint"], str(demo_shards), f"{s3_bucket}/embedded")
    assert summary["embeddings"] == f"{s3_bucket}/embedded/embeddings.parquet"
    meta = build_index(summary["embeddings"], f"{s3_bucket}/index", summary["checkpoint"])
    assert meta["rows"] == 432
    remote, local = Searcher(f"{s3_bucket}/index"), Searcher(str(built_index))
    box = SearchFilter(bbox=shapely.from_wkt(local.search("farmland", k=1)[0].footprint).bounds)
    for where in (None, box):
        expected = [h.image_id for h in local.search("a lake beside farmland", k=8, where=where)]
        assert [h.image_id for h in remote.search("a lake beside farmland", k=8, where=where)] == expected
    rebuilt = build_index(summary["embeddings"], f"{s3_bucket}/index", summary["checkpoint"])
    assert rebuilt["rows"] == 432 and Searcher(f"{s3_bucket}/index").table.count_rows() == 432


@pytest.fixture
def ann_rows(built_index: Path, monkeypatch: pytest.MonkeyPatch) -> pa.Table:
    """The demo's index rows, with the ANN threshold lowered so that its 432 tiles get an ANN index."""
    monkeypatch.setattr(index_module, "ANN_THRESHOLD", 200)
    return index_rows(index_module.read_embeddings(str(built_index / "embeddings.parquet")))


@pytest.mark.ray
def test_an_append_keeps_the_ann_settings_the_index_was_built_with(ann_rows: pa.Table, tmp_path: Path) -> None:
    rows = ann_rows
    table = index_module.connect(str(tmp_path)).create_table("tiles", data=rows.slice(0, 300))
    pq_settings = index_module.AnnSettings("IVF_PQ", sub_vectors=16, nprobes=4, refine_factor=None)
    meta = index_module.publish(str(tmp_path), table, "v", None, {}, ann=pq_settings)
    assert meta["kind"] == "ivf_pq" and meta["ann"]["sub_vectors"] == 16
    table.add(rows.slice(300))
    meta = index_module.publish(str(tmp_path), table, "v", None, {})  # the default settings are IVF-SQ
    assert (meta["rows"], meta["kind"], meta["ann"]["nprobes"]) == (432, "ivf_pq", 4)
    assert index_module.ann_settings(meta) == pq_settings


@pytest.mark.ray
def test_a_filter_that_keeps_few_rows_ranks_them_exactly(ann_rows: pa.Table, tmp_path: Path) -> None:
    rows = ann_rows
    table = index_module.connect(str(tmp_path)).create_table("tiles", data=rows)
    coarse = index_module.AnnSettings("IVF_PQ", sub_vectors=4, nprobes=1, refine_factor=None)  # recall suffers
    index_module.publish(str(tmp_path), table, "v", None, {}, ann=coarse)
    north = float(np.sort(rows["max_lat"].to_numpy())[-40])  # the northern 40 or so tiles
    narrow, wide = f"max_lat >= {north!r}", "max_lat >= -90"
    kept = table.count_rows(narrow)
    exact_below = replace(coarse, exact_below=kept)
    assert exact_below.exact_for(table, narrow) and not exact_below.exact_for(table, wide)
    assert not exact_below.exact_for(table, None) and not coarse.exact_for(table, narrow)
    vectors = rows.filter(pc.field("max_lat") >= north)
    query = vectors["vector"][0].values.to_numpy()
    scores = np.stack(vectors["vector"].to_numpy(zero_copy_only=False)) @ query
    truth = [vectors["image_id"][int(i)].as_py() for i in np.argsort(-scores)[:10]]
    where = SearchFilter(bbox=(-180, north, 180, 90))
    found = [r["image_id"] for r in nearest(table, query, 10, where, exact_below)]
    assert found == truth


@pytest.mark.ray
def test_index_build_takes_the_folder_rsitr_embed_wrote(
    built_index: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "from-folder"
    assert cli_main(["index", "build", "--embeddings", str(built_index), "--out", str(out)]) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["rows"] == open_index(str(built_index))[1]["rows"]
    assert built["caption_rows"] > 0  # the folder's captions.parquet came along
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "not.parquet").write_text("tile,vector\n")
    for wrong in (empty, tmp_path / "missing", tmp_path / "not.parquet"):
        assert cli_main(["index", "build", "--embeddings", str(wrong), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert str(wrong) in err and "embeddings" in err and len(err.strip().splitlines()) == 1


def test_every_footprint_meeting_a_bbox_starts_in_a_cell_the_bbox_keeps() -> None:
    rng = np.random.default_rng(0)
    corner_lon = np.concatenate([rng.uniform(-180, 178, 20_000), np.arange(-180, 171, 10.0)])  # on cell edges too
    corner_lat = np.concatenate([rng.uniform(-90, 88, 20_000), np.full(36, 40.0)])
    max_lon = np.minimum(corner_lon + rng.uniform(0, 2, len(corner_lon)), 180)
    max_lat = np.minimum(corner_lat + rng.uniform(0, 2, len(corner_lat)), 90)
    grid = CellGrid(widest_lon=float((max_lon - corner_lon).max()), widest_lat=float((max_lat - corner_lat).max()))
    cells = grid.cell(corner_lon, corner_lat)
    boxes = [(float(max_lon[-5]), 20.0, float(max_lon[-5]) + 5, 41.0)]  # touches footprints only at their edge
    for _ in range(300):
        lon, lat, size = rng.uniform(-180, 170), rng.uniform(-90, 80), rng.uniform(0, 30)
        boxes.append((lon, lat, min(lon + size, 180.0), min(lat + size, 90.0)))
    for box in boxes:
        meets = (max_lon >= box[0]) & (corner_lon <= box[2]) & (max_lat >= box[1]) & (corner_lat <= box[3])
        kept = grid.cells_meeting(box)
        assert kept is not None and len(kept) <= 25  # a ≤ 30° box keeps at most 5 × 5 of the 37 × 19 cells
        assert set(cells[meets].tolist()) <= set(kept), box
    assert grid.cells_meeting((-180, -90, 180, 90)) is None  # every cell: the bounds test alone


def _spread_over_the_globe(table: pa.Table) -> pa.Table:
    """The demo's tiles moved scene by scene to places around the globe (several grid cells apart)."""
    scenes = sorted(set(table["source_uri"].to_pylist()))
    offsets = {scene: (-150.0 + 47.0 * (i % 7), -50.0 + 23.0 * (i % 5)) for i, scene in enumerate(scenes)}
    moved = [
        shapely.to_wkb(shapely.transform(shapely.from_wkb(wkb), lambda xy, d=offsets[uri]: xy + d))  # type: ignore[misc]
        for wkb, uri in zip(table["geometry"].to_pylist(), table["source_uri"].to_pylist(), strict=True)
    ]
    return table.set_column(table.schema.get_field_index("geometry"), "geometry", pa.array(moved, pa.binary()))


@pytest.mark.ray
def test_bbox_search_starts_from_the_index_cells_and_finds_what_the_bounds_alone_find(
    built_index: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = open_index(str(built_index))[1]["checkpoint"]
    spread = _spread_over_the_globe(pq.read_table(built_index / "embeddings.parquet"))
    pq.write_table(spread, tmp_path / "embeddings.parquet")
    meta = build_index(str(tmp_path / "embeddings.parquet"), str(tmp_path / "exact"), checkpoint)
    rows = index_rows(spread)
    assert rows["cell"].to_pylist() == sorted(rows["cell"].to_pylist())  # stored in cell order
    assert len(set(rows["cell"].to_pylist())) > 5
    grid = CellGrid.from_meta(meta)
    assert grid is not None and 0 < grid.widest_lon < 1
    footprints = {
        r["image_id"]: shapely.from_wkb(r["geometry"]) for r in spread.select(["image_id", "geometry"]).to_pylist()
    }
    centres = [shapely.centroid(footprints[i]) for i in list(footprints)[::97]]
    boxes = [(c.x - 0.2, c.y - 0.2, c.x + 0.3, c.y + 0.1) for c in centres] + [(-170.0, -60.0, 40.0, 30.0)]
    exact = Searcher(str(tmp_path / "exact"))
    monkeypatch.setattr(index_module, "ANN_THRESHOLD", 200)  # the same tiles with an ANN index and the cell bitmap
    ann_meta = build_index(str(tmp_path / "embeddings.parquet"), str(tmp_path / "ann"), checkpoint)
    ann = Searcher(str(tmp_path / "ann"))
    assert ann_meta["kind"] == "ivf_sq" and ["cell"] in [i.columns for i in ann.table.list_indices()]
    vector = exact.encode_query("dense forest").numpy()
    for box in boxes:
        where = SearchFilter(bbox=box)
        assert "cell IN (" in str(where.where(grid))
        inside = {i for i, f in footprints.items() if f.intersects(shapely.box(*box))}
        assert inside and {h.image_id for h in exact.search("dense forest", k=432, where=where)} == inside
        by_cells = [r["image_id"] for r in nearest(ann.table, vector, 10, where, ann.ann, ann.grid)]
        by_bounds = [r["image_id"] for r in nearest(ann.table, vector, 10, where, ann.ann)]
        assert by_cells == by_bounds and set(by_cells) <= inside


@pytest.mark.ray
def test_an_index_from_before_the_cell_grid_keeps_answering_bbox_searches_after_an_append(
    built_index: Path, tmp_path: Path
) -> None:
    rows = index_rows(index_module.read_embeddings(str(built_index / "embeddings.parquet")))
    db = index_module.connect(str(tmp_path))
    first = rows.slice(0, 300).drop_columns(["cell"])
    old = db.create_table("tiles", data=first.append_column("batch", [["batch-old"] * first.num_rows]))
    table = reindex._publish_batch(db, "tiles", old, rows.slice(300), "batch-new")
    checkpoint = open_index(str(built_index))[1]["checkpoint"]
    meta = index_module.publish(str(tmp_path), table, rows["model_version"][0].as_py(), checkpoint, {})
    assert "cell" not in table.schema.names and "cells" not in meta and meta["rows"] == 432
    newest = shapely.from_wkb(rows["geometry"][431].as_py()).bounds
    hits = Searcher(str(tmp_path)).search("dense forest", k=432, where=SearchFilter(bbox=newest))
    assert rows["image_id"][431].as_py() in {h.image_id for h in hits}


@pytest.mark.ray
def test_the_recorded_grid_widens_with_a_wide_footprint_and_never_narrows(built_index: Path, tmp_path: Path) -> None:
    embeddings = index_module.read_embeddings(str(built_index / "embeddings.parquet"))
    table = index_module.connect(str(tmp_path)).create_table("tiles", data=index_rows(embeddings.slice(1)))
    narrow = index_module.publish(str(tmp_path), table, "v", None, {})["cells"]
    minx, miny, _, _ = shapely.from_wkb(embeddings["geometry"][0].as_py()).bounds
    wide = pa.array([shapely.to_wkb(shapely.box(minx, miny, minx + 3, miny + 2))], pa.binary())  # a scene as one tile
    first = embeddings.slice(0, 1)
    table.add(index_rows(first.set_column(first.schema.get_field_index("geometry"), "geometry", wide)))
    widened = index_module.publish(str(tmp_path), table, "v", None, {})["cells"]
    assert narrow["widest_lon"] < 1 and (widened["widest_lon"], widened["widest_lat"]) == pytest.approx((3, 2))
    table.delete(f"image_id = {index_module.sql_text(first['image_id'][0].as_py())}")
    # a reader that opened the version holding the wide tile may read index.json as this publish writes it
    assert index_module.publish(str(tmp_path), table, "v", None, {})["cells"] == widened
    assert open_index(str(tmp_path))[1]["cells"] == widened
