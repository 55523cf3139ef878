"""Inference precision: bfloat16 autocast on CPUs that multiply bf16 in hardware, float32 elsewhere.

bf16 autocast keeps a query's vector within a cosine of ~0.9999 of float32's and an archive's retrieval quality
within a few hundredths of mR, at a fraction of the time; ``benchmarks/query_precision.py`` measures both on a
given machine (docs/results.md).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import torch

from rsitr.config import PRECISIONS
from rsitr.errors import ConfigError

ModelT = TypeVar("ModelT", bound=torch.nn.Module)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX; read from /proc/cpuinfo on Linux)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def checked(precision: str) -> str:
    """``precision`` itself.

    Raises:
        ConfigError: it is not one of ``rsitr.config.PRECISIONS``.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    return precision


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether inference on ``device`` runs in bf16 autocast for ``precision`` (auto: on CPUs with bf16 hardware).

    Raises:
        ConfigError: ``precision`` is not one of ``rsitr.config.PRECISIONS``.
    """
    if device.type != "cpu" or checked(precision) == "float32":
        return False
    return precision == "bfloat16" or cpu_has_native_bf16()


@contextlib.contextmanager
def inference(bf16: bool) -> Iterator[None]:
    """No gradients, and CPU bf16 autocast when ``bf16``."""
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        yield


def with_text_weights_in_bf16(model: ModelT) -> ModelT:
    """A copy of ``model`` for queries under :func:`inference` with bf16: its text tower copied with the linear
    weights stored in bf16 (:func:`store_linear_weights_in_bf16`), every other part shared with ``model``, which
    stays as it was (float32 callers keep working)."""
    queries = copy.copy(model)
    queries._modules = dict(model._modules)  # the shallow copy would otherwise share the dict of submodules
    text = copy.deepcopy(model.get_submodule("text"))
    store_linear_weights_in_bf16(text)
    queries.text = text
    return queries


def store_linear_weights_in_bf16(module: torch.nn.Module) -> None:
    """Keep ``module``'s linear layers in bfloat16, for use under :func:`inference` with bf16 only.

    Autocast casts a float32 weight to bf16 on every forward; a weight already in bf16 is used as it is, so the
    results are bit for bit the same. The casts read and write every weight once per forward, a fixed cost per pass:
    about a third of the time of eight short queries through the four-tower text towers.
    """
    for layer in module.modules():
        if isinstance(layer, torch.nn.Linear):
            layer.to(torch.bfloat16)


def unit_float32(vectors: torch.Tensor) -> torch.Tensor:
    """Float32 unit vectors (after bf16 rounding the norms are only close to 1)."""
    return torch.nn.functional.normalize(vectors.float(), dim=-1)
