"""The package layout's promises: the training names load on demand, and inference does not import Ray."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import rsitr.train


def test_every_training_name_is_the_object_its_module_defines_even_after_the_modules_load() -> None:
    # a lazily exported name must never be shadowed by a same-named submodule (``from rsitr.train import fit``
    # handed out the module ``rsitr.train.fit`` once that module had been imported)
    first = {name: getattr(rsitr.train, name) for name in rsitr.train.__all__}
    for home in {"command", "trainer", "loop", "optim", "checkpoint", "losses"}:
        importlib.import_module(f"rsitr.train.{home}")
    for name in rsitr.train.__all__:
        defined = getattr(importlib.import_module(f"rsitr.train.{rsitr.train._HOME[name]}"), name)
        assert getattr(rsitr.train, name) is defined is first[name], name
        exec(f"from rsitr.train import {name} as imported", namespace := {})  # noqa: S102
        assert namespace["imported"] is defined, name


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
