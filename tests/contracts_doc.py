"""Reading docs/contracts.md: the names in the first column of one section's table."""

from __future__ import annotations

import re
from pathlib import Path

CONTRACTS = Path(__file__).resolve().parents[1] / "docs" / "contracts.md"


def documented(section: str) -> list[str]:
    """The backticked first-column entries of the table under ``## <section>``."""
    text = CONTRACTS.read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return [m.group(1) for m in re.finditer(r"^\| `([^`]+)` \|", body, re.M)]
