"""The one way tests wait: on progress (a condition), never on a fixed sleep, with a deadline that names what was
awaited, and failing at once when the process doing the work ends first."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    what: str,
    check: Callable[[], T],
    timeout: float,
    every: float = 0.2,
    process: subprocess.Popen[bytes] | subprocess.Popen[str] | None = None,
    log: Path | None = None,
) -> T:
    """``check()``'s first truthy value, polled every ``every`` s.

    Fails (AssertionError) naming ``what`` after ``timeout`` s, or as soon as ``process`` has ended (with the tail of
    ``log``, where the process wrote its output).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
            raise AssertionError(f"waiting for {what}: the process ended first (exit {process.returncode})\n{tail}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)
