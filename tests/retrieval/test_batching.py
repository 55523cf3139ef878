import threading

import pytest
from waiting import wait_for

from rsitr.retrieval.batching import MicroBatcher


def _pending(batcher: MicroBatcher[int, int]) -> int:
    with batcher._lock:
        return len(batcher._pending)


def _callers(batcher: MicroBatcher[int, int], items: list[int]) -> tuple[list[threading.Thread], dict[int, object]]:
    results: dict[int, object] = {}

    def call(item: int) -> None:
        try:
            results[item] = batcher(item)
        except Exception as err:  # the test inspects what each caller got
            results[item] = err

    return [threading.Thread(target=call, args=(item,)) for item in items], results


def _held_first_batch(
    max_batch: int, fail_on: int | None = None
) -> tuple[MicroBatcher[int, int], threading.Event, list[list[int]]]:
    """A batcher whose first batch blocks until the returned event is set; records every batch it encodes."""
    gate, batches = threading.Event(), []

    def encode_many(items: list[int]) -> list[int]:
        batches.append(list(items))
        if len(batches) == 1:
            gate.wait(60)
        if fail_on in items:
            raise ValueError(f"cannot encode {fail_on}")
        return [10 * item for item in items]

    return MicroBatcher(encode_many, max_batch), gate, batches


def _eight_callers_queued_behind_the_first(
    batcher: MicroBatcher[int, int], gate: threading.Event, batches: list[list[int]]
) -> dict[int, object]:
    """Caller 0 starts the (held) first batch, callers 1–7 queue behind it, then the batch is released."""
    threads, results = _callers(batcher, list(range(8)))
    threads[0].start()
    wait_for("the first batch to start", lambda: len(batches) == 1, 60, every=0.005)
    for thread in threads[1:]:
        thread.start()
    wait_for("seven callers to queue", lambda: _pending(batcher) == 7, 60, every=0.005)
    gate.set()
    for thread in threads:
        thread.join(60)
    return results


def test_callers_waiting_behind_a_batch_share_the_next_one_and_each_gets_its_own_output() -> None:
    batcher, gate, batches = _held_first_batch(max_batch=32)
    results = _eight_callers_queued_behind_the_first(batcher, gate, batches)
    assert results == {item: 10 * item for item in range(8)}
    assert [len(b) for b in batches] == [1, 7] and batcher.batches == 2


def test_max_batch_bounds_each_batch_and_every_caller_is_answered() -> None:
    batcher, gate, batches = _held_first_batch(max_batch=3)
    results = _eight_callers_queued_behind_the_first(batcher, gate, batches)
    assert results == {item: 10 * item for item in range(8)}
    assert [len(b) for b in batches] == [1, 3, 3, 1]


def test_an_error_reaches_every_caller_of_its_batch_and_the_batcher_keeps_working() -> None:
    batcher, gate, batches = _held_first_batch(max_batch=32, fail_on=5)
    results = _eight_callers_queued_behind_the_first(batcher, gate, batches)
    assert results[0] == 0
    assert all(isinstance(results[i], ValueError) and "cannot encode 5" in str(results[i]) for i in range(1, 8))
    assert batcher(3) == 30  # nothing stuck: a later call is answered


def test_max_batch_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="max_batch 0"):
        MicroBatcher(lambda items: items, 0)
