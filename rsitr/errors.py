"""Errors whose message is meant for the user: the CLI prints them on one line (exit status 2).

They live here, away from the stages that raise them, so ``rsitr --help`` and the CLI's error handling import no
torch, Ray or LanceDB.
"""

from __future__ import annotations


class IngestError(RuntimeError):
    """The inputs do not exist, the output holds a different ingest, or nothing usable remained."""


class CheckpointError(FileNotFoundError):
    """A checkpoint or run folder that is missing or incomplete."""


class IndexNotFoundError(FileNotFoundError):
    """No index at the given URI."""


class IndexBusyError(RuntimeError):
    """Another re-index of the same index is running."""


class EmbeddingsNotFoundError(FileNotFoundError):
    """No embeddings file (or ``rsitr embed --out`` folder holding one) at the given URI."""


class StorageUnreachableError(ConnectionError):
    """The object store did not answer (after the client's own retries). Writes publish whole objects only, so
    nothing partial is left behind: running the same command again, once the store is back, resumes."""


class UnsafeFileError(ValueError):
    """A ``torch.save`` file (optimizer state, ``.pth`` weights) that holds more than tensors: it could run code."""


class WeightsError(RuntimeError):
    """Pretrained weights that are missing or do not fit the architecture."""
