"""Caption corpora → ``{image file name: (split, [captions], label)}``.

Formats: Karpathy-style JSON (``images[].filename/split/sentences[].raw``, as RSICD/RSITMD/UCM/Sydney and the
demo ship) and the VT-RSBS CSV (``filename, split, label, sentence`` with Python-literal lists).
"""

from __future__ import annotations

import ast
import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

FORMATS = ("karpathy", "vt-rsbs")


class CaptionFormatError(ValueError):
    """A caption file that is not in (or not valid for) the requested format."""


@dataclass
class CaptionRecord:
    """The captions of one image."""

    split: str
    captions: list[str] = field(default_factory=list)
    label: str | None = None


def detect_format(path: Path) -> str:
    """Guess the format from the file's extension and first bytes."""
    if path.suffix.lower() == ".csv":
        return "vt-rsbs"
    if path.suffix.lower() == ".json":
        head = path.read_text(encoding="utf-8", errors="replace")[:4096]
        if '"images"' in head:
            return "karpathy"
    raise CaptionFormatError(f"{path}: unknown caption format; supported: {', '.join(FORMATS)}")


def _clean(captions: list[object]) -> list[str]:
    return [" ".join(str(c).split()) for c in captions if isinstance(c, str) and c.strip()]


def read_captions(path: str | Path, fmt: str = "auto") -> dict[str, CaptionRecord]:
    """Parse a caption file into records keyed by image file name.

    Raises:
        CaptionFormatError: unknown format, or a file that does not parse as the format says.
    """
    path = Path(path)
    fmt = detect_format(path) if fmt == "auto" else fmt
    try:
        if fmt == "karpathy":
            return _read_karpathy(path)
        if fmt == "vt-rsbs":
            return _read_vt_rsbs(path)
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, SyntaxError) as err:
        raise CaptionFormatError(f"{path}: not a valid {fmt} caption file ({type(err).__name__}: {err})") from err
    raise CaptionFormatError(f"{path}: unknown caption format {fmt!r}; supported: {', '.join(FORMATS)}")


def _read_karpathy(path: Path) -> dict[str, CaptionRecord]:
    data = json.loads(path.read_text(encoding="utf-8"))
    records: dict[str, CaptionRecord] = {}
    for entry in data["images"]:
        raw = [s.get("raw", "") for s in entry.get("sentences", [])]
        records[entry["filename"]] = CaptionRecord(entry.get("split", "none"), _clean(raw), entry.get("label"))
    return records


def _read_vt_rsbs(path: Path) -> dict[str, CaptionRecord]:
    records: dict[str, CaptionRecord] = {}
    with path.open(encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            sentences = ast.literal_eval(row["sentence"])
            records[row["filename"]] = CaptionRecord(row.get("split") or "none", _clean(sentences), row.get("label"))
    return records
