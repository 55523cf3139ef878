"""The package layout's promises: the training names load on demand, and inference does not import Ray."""

from __future__ import annotations

import subprocess
import sys

import pytest

import rsitr.train


def test_every_training_name_resolves_to_its_module() -> None:
    for name in rsitr.train.__all__:
        value = getattr(rsitr.train, name)
        assert not callable(value) or value.__module__.startswith("rsitr.train."), name


def test_an_unknown_training_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        rsitr.train.no_such_name  # type: ignore[attr-defined]  # noqa: B018


def test_searching_and_reading_checkpoints_import_no_ray() -> None:
    # a laptop search or a checkpoint's metadata must not pay for starting Ray's import (seconds)
    code = (
        "import sys, rsitr.retrieval.search, rsitr.train.checkpoint, rsitr.evaluation.evaluate; "
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "[]", out.stdout
