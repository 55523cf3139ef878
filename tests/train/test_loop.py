"""Pieces of the per-worker training loop that need no Ray cluster."""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from rsitr.config import load_config
from rsitr.data.preprocess import tokenize
from rsitr.models.msa import MSA, build_model
from rsitr.train.feed import EpochStream, KeptBatches, RunStream
from rsitr.train.loop import _agree, stale_for
from rsitr.train.losses import total_loss
from rsitr.train.step import leave_unread_modules_out


class CountedStream:
    """Batches of ``rows`` float32 values each, counting how often the stream is read from its start."""

    def __init__(self, batches: int, rows: int = 4) -> None:
        self.batches, self.rows, self.reads, self.yielded = batches, rows, 0, 0

    def __call__(self) -> Iterator[dict[str, np.ndarray]]:
        self.reads += 1
        for i in range(self.batches):
            self.yielded += 1
            yield {"value": np.full(self.rows, i, np.float32), "image_id": np.asarray([f"t{i}"] * self.rows, object)}


def test_a_split_is_read_once_and_replayed_from_memory_after() -> None:
    stream = CountedStream(3)
    kept = KeptBatches(stream)
    first = list(kept)
    first[0]["value"][:] = 9  # the stream's own buffer (in Ray, a block of the object store) changes afterwards
    second = list(kept)
    assert stream.reads == 1
    assert [b["value"][0] for b in second] == [0, 1, 2]  # memory holds copies
    assert [list(b["image_id"]) for b in second] == [[f"t{i}"] * 4 for i in range(3)]


def test_a_split_larger_than_the_budget_is_read_again_each_pass() -> None:
    stream = CountedStream(3)
    kept = KeptBatches(stream, budget=2 * 4 * 4 + 2 * 4 * 8)  # two batches' float32 values and object pointers
    assert len(list(kept)) == 3 and len(list(kept)) == 3
    assert stream.reads == 2


def test_a_pass_stopped_early_keeps_nothing() -> None:
    stream = CountedStream(3)
    kept = KeptBatches(stream)
    for _ in kept:
        break
    assert [b["value"][0] for b in kept] == [0, 1, 2]
    assert stream.reads == 2
    list(kept)
    assert stream.reads == 2


def test_a_split_read_ahead_is_replayed_and_one_over_the_budget_stops_being_read() -> None:
    stream = CountedStream(3)
    kept = KeptBatches(stream)
    kept.fill()
    kept.fill()
    assert [b["value"][0] for b in kept] == [0, 1, 2] and stream.reads == 1
    large = CountedStream(10)
    kept = KeptBatches(large, budget=2 * 4 * 4 + 2 * 4 * 8)  # two batches
    kept.fill()
    assert large.yielded == 3  # stopped at the batch that outgrew the budget, not at the end of the split
    assert len(list(kept)) == 10 and large.reads == 2


class EpochsOf:
    """A train shard's interface (``iter_torch_batches``) over ``sizes[i]`` batches in epoch ``i``."""

    def __init__(self, *sizes: int) -> None:
        self.sizes, self.opened = list(sizes), 0

    def iter_torch_batches(self, **_: object) -> Iterator[dict[str, torch.Tensor]]:
        if self.opened >= len(self.sizes):
            raise RuntimeError("the shard has no more epochs")
        size, self.opened = self.sizes[self.opened], self.opened + 1
        return iter([{"epoch": torch.tensor(self.opened), "batch": torch.tensor(i)} for i in range(size)])


def test_an_epoch_begun_early_yields_the_same_batches_and_its_errors_surface_when_it_is_read() -> None:
    shard = EpochsOf(3, 2, 0)
    stream = EpochStream(shard, batch_size=4, device=torch.device("cpu"))
    assert [int(b["batch"]) for b in stream.epoch()] == [0, 1, 2]
    stream.begin_next()
    assert [(int(b["epoch"]), int(b["batch"])) for b in stream.epoch()] == [(2, 0), (2, 1)]
    stream.begin_next()
    assert list(stream.epoch()) == [] and shard.opened == 3
    stream.begin_next()
    with pytest.raises(RuntimeError, match="no more epochs"):
        list(stream.epoch())


def test_the_stream_says_when_its_first_batch_has_arrived() -> None:
    # the val read-ahead waits for it, so as not to compete with the first epoch's cold start
    stream = EpochStream(EpochsOf(0, 2), batch_size=4, device=torch.device("cpu"))
    assert list(stream.epoch()) == [] and not stream.flowing.is_set()
    stream.begin_next()
    batches = stream.epoch()
    assert not stream.flowing.is_set()  # begun, but no batch has been read yet
    next(batches)
    assert stream.flowing.is_set()


def test_a_run_stream_is_opened_once_and_cut_into_epochs_of_its_steps() -> None:
    shard = EpochsOf(7)  # a dataset of the whole run: one epoch for Ray Data
    stream = RunStream(shard, batch_size=4, device=torch.device("cpu"), steps=3)
    assert not stream.flowing.is_set()
    assert [int(b["batch"]) for b in stream.epoch()] == [0, 1, 2] and stream.flowing.is_set()
    stream.begin_next()
    assert [int(b["batch"]) for b in stream.epoch()] == [3, 4, 5]
    assert [int(b["batch"]) for b in stream.epoch()] == [6]  # the run's rows end: a short last epoch
    assert list(stream.epoch()) == [] and shard.opened == 1


def test_patience_stops_only_after_that_many_epochs_without_a_gain() -> None:
    history = [{"val_mR": v} for v in (10.0, 12.0, 11.0, 12.0)]
    assert stale_for(history, 2) and not stale_for(history, 3) and not stale_for(history, 0)


@pytest.mark.parametrize(
    "backend",
    [
        "gloo",
        pytest.param(
            "nccl",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="NCCL needs a CUDA device"),
        ),
    ],
)
def test_rank_zeros_decision_travels_through_the_process_groups_backend(backend: str, tmp_path: Path) -> None:
    # NCCL moves only CUDA tensors: a CPU flag made the first GPU run fail at its first epoch's end
    if backend == "nccl":
        torch.cuda.set_device(0)
    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert _agree(True) is True
        assert _agree(False) is False
    finally:
        dist.destroy_process_group()


def test_an_mscmat_that_no_loss_term_reads_is_left_out_of_ddp_training(tmp_path: Path) -> None:
    # MSA's term ablation computes MSCMAT with its loss weights at 0
    config = load_config("demo", ["model.mscmat=true", "loss.mscma_weight=0", "model.image_pretrained=false"])
    images = torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8)
    texts = ["a river", "two planes beside a terminal", "green fields", "a harbour with boats"]
    tokens = {k: torch.as_tensor(v) for k, v in tokenize(texts, config.model.text_model, 16).items()}

    def two_steps(model: MSA) -> None:
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        for _ in range(2):
            out = ddp(images, tokens["input_ids"], tokens["attention_mask"])
            image, text, temperature = out.members[0]
            loss = total_loss(image @ text.t(), config.loss, out.mscmat, None, temperature)["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        with pytest.raises(RuntimeError, match="did not receive grad"):
            two_steps(build_model(config.model))
        model = build_model(config.model)
        leave_unread_modules_out(model, config)
        two_steps(model)
        assert model.mscmat is not None and not any(p.requires_grad for p in model.mscmat.parameters())
    finally:
        dist.destroy_process_group()
