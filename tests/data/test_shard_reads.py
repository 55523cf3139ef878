"""Shards read and transformed a slice at a time in Ray Data's read tasks (rsitr.data.shard_reads), on real Parquet
files and a real local Ray."""

import functools
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rsitr.data.preprocess import caption_rows, decode_with_paths
from rsitr.data.shard_reads import read_shard_slices

pytestmark = [pytest.mark.ray]


def write_shards(folder: Path, shards: int, rows: int) -> list[str]:
    """Shards of ``rows`` images each (``s<shard>-<n>``), image n with 1 + n % 3 captions (``c<j>``)."""
    folder.mkdir()
    for s in range(shards):
        ids = [f"s{s}-{n}" for n in range(rows)]
        captions = [[f"c{j}" for j in range(1 + n % 3)] for n in range(rows)]
        pq.write_table(
            pa.table({"image_id": ids, "captions": captions, "image": [b"x"] * rows}), folder / f"{s}.parquet"
        )
    return sorted(str(p) for p in folder.iterdir())


def test_each_shard_is_read_once_a_slice_per_block_with_its_path(ray_local: None, tmp_path: Path) -> None:
    uris = write_shards(tmp_path / "shards", shards=3, rows=25)
    columns = ["image_id", "captions"]
    # a block size below one slice's rows: Ray Data cuts each read's output into blocks (decoded_tiles in
    # tests/retrieval checks a batch per block), never joining two shards
    ds = read_shard_slices(uris, columns, caption_rows, slice_rows=10, tasks=1, num_cpus=0.25, block_bytes=64)
    blocks = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    assert len(blocks) >= 9 and all(len(set(b["path"])) == 1 for b in blocks)
    got = sorted((str(i), str(c), Path(str(p)).name) for b in blocks for i, c, p in zip(*b.values(), strict=True))
    expected = [
        (f"s{s}-{n}#{j}", f"c{j}", f"{s}.parquet") for s in range(3) for n in range(25) for j in range(1 + n % 3)
    ]
    assert got == sorted(expected)
    # without a block size, Ray Data's default joins a read's slices into one block (and splits none further)
    joined = read_shard_slices(uris, columns, caption_rows, slice_rows=10, tasks=3, num_cpus=0.25)
    assert sorted(len(b["path"]) for b in joined.iter_batches(batch_size=None)) == [49, 49, 49]


def test_an_unreadable_shard_is_named_with_the_reason(ray_local: None, tmp_path: Path) -> None:
    uris = write_shards(tmp_path / "shards", shards=1, rows=4)
    (tmp_path / "shards" / "shard-999.parquet").write_bytes(b"not parquet")
    ds = read_shard_slices(
        [*uris, str(tmp_path / "shards" / "shard-999.parquet")], ["image_id", "captions"], caption_rows, 4, 1, 0.25
    )
    with pytest.raises(
        Exception, match=r"shard-999\.parquet: not a readable Parquet file with columns \['image_id', 'captions'\]"
    ):
        ds.take_all()
    missing = read_shard_slices(
        [str(tmp_path / "shards" / "gone.parquet")], ["image_id", "captions"], caption_rows, 4, 1, 0.25
    )
    with pytest.raises(Exception, match=r"gone\.parquet: not a readable Parquet file"):
        missing.take_all()


def test_a_tile_that_does_not_decode_is_not_blamed_on_the_shard(ray_local: None, tmp_path: Path) -> None:
    uris = write_shards(tmp_path / "shards", shards=1, rows=4)  # their "image" bytes are no image
    ds = read_shard_slices(uris, ["image_id", "image"], functools.partial(decode_with_paths, image_size=8), 4, 1, 0.25)
    with pytest.raises(Exception, match="cannot identify image file") as raised:
        ds.take_all()
    assert "not a readable Parquet file" not in str(raised.value)
