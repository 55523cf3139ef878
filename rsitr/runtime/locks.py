"""One process at a time: an OS file lock holding the holder's pid (released even when the holder is killed)."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class LockHeldError(RuntimeError):
    """Another process holds the lock; ``holder`` is its pid as it wrote it ('?' when unknown)."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"lock {path} is held by process {holder}")
        self.path, self.holder = path, holder


@contextmanager
def pid_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created with its folder), writing this process's pid into it.

    Raises:
        LockHeldError: another process holds it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise LockHeldError(path, handle.read().strip() or "?") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
