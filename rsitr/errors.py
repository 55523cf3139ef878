"""Errors whose message is meant for the user, all under :class:`UserError`: the CLI prints them on one line
(exit status 2). Any other exception is a bug and keeps its traceback.

They live here, away from the stages that raise them, so ``rsitr --help`` and the CLI's error handling import no
torch, Ray or LanceDB. Each also derives from the built-in exception a caller would expect (``FileNotFoundError``
for a missing input, ``ValueError`` for a bad setting), so ``except ValueError`` around a stage keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of every error caused by what the user gave (a path, a setting, an input file), not by a bug."""


class ConfigError(UserError, ValueError):
    """A preset, file, override or option that does not describe a valid configuration."""


class DatasetError(UserError, ValueError):
    """An ingested dataset that lacks what a stage needs (a split, readable shards, captions for its images)."""


class IngestError(UserError, RuntimeError):
    """The inputs do not exist, the output holds a different ingest, or nothing usable remained."""


class CheckpointError(UserError, FileNotFoundError):
    """A checkpoint or run folder that is missing or incomplete."""


class IndexNotFoundError(UserError, FileNotFoundError):
    """No index at the given URI."""


class IndexBusyError(UserError, RuntimeError):
    """Another re-index of the same index is running."""


class EmbeddingsNotFoundError(UserError, FileNotFoundError):
    """No embeddings file (or ``rsitr embed --out`` folder holding one) at the given URI."""


class EmbeddingsMismatchError(UserError, ValueError):
    """Embeddings that cannot share one index: written by several model versions."""


class StorageUnreachableError(UserError, ConnectionError):
    """The object store did not answer (after the client's own retries). Writes publish whole objects only, so
    nothing partial is left behind: running the same command again, once the store is back, resumes."""


class UnsafeFileError(UserError, ValueError):
    """A ``torch.save`` file (optimizer state, ``.pth`` weights) that holds more than tensors: it could run code."""


class WeightsError(UserError, RuntimeError):
    """Pretrained weights that are missing or do not fit the architecture."""
