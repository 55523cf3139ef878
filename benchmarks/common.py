"""What every benchmark shares: where the real data and the results live, and how a result is written."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# The one setting that says where the real data sets are: a folder holding rsicd/ (images/, captions/,
# rsicd_splits.csv) and geotiff/. A benchmark that needs them stops, naming the path, when they are absent.
DATA_VARIABLE = "RSITR_DATA"
DATA = Path(os.environ.get(DATA_VARIABLE, ROOT.parent / "shared" / "data"))
RSICD = DATA / "rsicd"


def require(path: Path, what: str) -> Path:
    """``path`` itself; stops the benchmark, saying what is missing and how to point at it, when it is absent."""
    if not path.exists():
        raise SystemExit(f"{what} is absent at {path}: set {DATA_VARIABLE} to the folder holding rsicd/ and geotiff/")
    return path


def write_result(path: Path | str, report: dict[str, Any]) -> Path:
    """Write a benchmark's JSON report atomically (a temporary name, then a rename) and say where it went."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(out.suffix + ".partial")
    partial.write_text(json.dumps(report, indent=2))
    partial.replace(out)
    print(f"wrote {out}")
    return out
