"""A whole run's epochs as one Ray Data stream (rsitr.data.run_rows), on real Parquet files and a real local Ray."""

import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rsitr.data.run_rows import FILES_PER_READ, RunOfEpochs, pausing_while_held_back, read_run


def write_files(folder: Path, files: int, rows: int, payload: int = 0) -> list[int]:
    """``files`` Parquet files of ``rows`` rows each (ids 0, 1, …; every fourth row in ``val``); the train ids."""
    folder.mkdir()
    for f in range(files):
        ids = list(range(f * rows, (f + 1) * rows))
        table = pa.table(
            {
                "id": ids,
                "split": ["val" if i % 4 == 3 else "train" for i in ids],
                "payload": [b"x" * payload] * rows,
            }
        )
        pq.write_table(table, folder / f"part-{f:03d}.parquet")
    return [i for i in range(files * rows) if i % 4 != 3]


@pytest.mark.ray
def test_each_epoch_reads_every_row_of_the_split_once_in_its_own_order(ray_local: None, tmp_path: Path) -> None:
    train_ids = write_files(tmp_path / "rows", files=9, rows=20)
    run = read_run(str(tmp_path / "rows"), ["id"], "train", epochs=3, seed=7, order="full", num_cpus=0.25)
    ids = run.to_pandas()["id"].tolist()
    assert len(ids) == 3 * len(train_ids)
    epochs = [ids[i * len(train_ids) : (i + 1) * len(train_ids)] for i in range(3)]
    # one read at a time, so the stream keeps the epochs apart
    assert all(sorted(epoch) == train_ids for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    in_order = read_run(str(tmp_path / "rows"), ["id"], "train", epochs=2, seed=7, order="none", num_cpus=0.25)
    assert in_order.to_pandas()["id"].tolist() == train_ids * 2


def test_file_orders_are_seeded_and_unknown_orders_refused() -> None:
    files = {f"f{i}.parquet": 1 for i in range(12)}
    one, again = (RunOfEpochs(files, ["id"], "train", epochs=2, seed=3) for _ in range(2))
    assert one.epoch_order(1) == again.epoch_order(1) != one.epoch_order(0)
    assert RunOfEpochs(files, ["id"], "train", epochs=2, seed=3, order="none").epoch_order(1) == sorted(files)
    for count in (1, FILES_PER_READ, FILES_PER_READ + 1, 12):  # read_run asks Ray Data for one block per read
        run = RunOfEpochs(dict(list(files.items())[:count]), ["id"], "train", epochs=3, seed=3)
        assert run.read_count() == len(run.get_read_tasks(1)) == 3 * -(-count // FILES_PER_READ)
    with pytest.raises(ValueError, match="train.shuffle 'random'"):
        RunOfEpochs(files, ["id"], "train", epochs=2, seed=3, order="random")
    with pytest.raises(FileNotFoundError, match="no Parquet files"):
        read_run("/nonexistent/rows", ["id"], "train", epochs=1, seed=0, order="full", num_cpus=0.25)


@pytest.mark.ray
@pytest.mark.timing
def test_a_stream_held_back_by_its_consumer_leaves_the_cpu_alone(ray_local: None, tmp_path: Path) -> None:
    # A run's stream waits on training most of the time; Ray Data's scheduler loop spun a core meanwhile (0.9).
    write_files(tmp_path / "rows", files=8, rows=50, payload=20_000)
    run = read_run(str(tmp_path / "rows"), ["id", "payload"], "train", epochs=50, seed=0, order="full", num_cpus=0.25)
    ds = pausing_while_held_back(run)
    limits = ds.context.execution_options.resource_limits
    ds.context.execution_options.resource_limits = limits.copy(object_store_memory=8 * 1024**2)
    batches = iter(ds.iter_batches(batch_size=16))
    next(batches)

    def cpu_share(seconds: float) -> float:  # of this process (where the scheduler loop runs), over ``seconds``
        used, started = time.process_time(), time.monotonic()
        time.sleep(seconds)
        return (time.process_time() - used) / (time.monotonic() - started)

    deadline = time.monotonic() + 60  # until its read-ahead is done and the stream is held back (<1 s idle here)
    while cpu_share(1.0) >= 0.25 and time.monotonic() < deadline:
        pass
    assert cpu_share(3.0) < 0.25
    assert len(next(batches)["id"]) == 16


@pytest.mark.ray
def test_an_unreadable_file_is_named_with_the_reason(ray_local: None, tmp_path: Path) -> None:
    write_files(tmp_path / "rows", files=2, rows=8)
    (tmp_path / "rows" / "part-999.parquet").write_bytes(b"not parquet")
    run = read_run(str(tmp_path / "rows"), ["id"], "train", epochs=1, seed=0, order="none", num_cpus=0.25)
    with pytest.raises(Exception, match=r"part-999\.parquet: not a readable Parquet file"):
        run.take_all()
