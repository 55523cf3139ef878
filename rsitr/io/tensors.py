"""Reading ``torch.save`` files that may come from anyone: tensors and plain containers only."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from rsitr.errors import UnsafeFileError


def load_tensors_only(path: str | Path) -> Any:
    """The tensors (in dicts, lists, numbers, strings) a ``torch.save`` file holds, on the CPU.

    Raises:
        UnsafeFileError: the file asks the unpickler for any other object (a crafted ``__reduce__``, a class);
            nothing of it is executed.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = str(err).strip().splitlines()
        reason = lines[-1][:200] if lines else type(err).__name__
        raise UnsafeFileError(
            f"{path}: refused, it holds objects other than tensors (nothing was executed): {reason}"
        ) from None
