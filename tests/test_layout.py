"""The package layout's promises: small modules and functions, light imports where they matter.

The layer contracts themselves (which stage may import which) are import-linter's, in ``pyproject.toml``, checked
by ``make lint``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rsitr"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def test_modules_and_functions_stay_readable_on_a_screen_or_a_few() -> None:
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        name = path.relative_to(PACKAGE.parent)
        if text.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}:{node.lineno} {node.name}: {lines} lines")
    assert not too_long, too_long


def _imported_by(code: str) -> set[str]:
    probe = f"import sys; {code}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=300)
    return set(out.stdout.split())


def test_searching_and_reading_checkpoints_import_no_ray() -> None:
    # a laptop search or a checkpoint's metadata must not pay for starting Ray's import (seconds)
    loaded = _imported_by("import rsitr.retrieval.search, rsitr.models.checkpoint, rsitr.evaluation.evaluate")
    assert not {m for m in loaded if m == "ray" or m.startswith("ray.")}


def test_the_cli_parser_imports_no_torch_ray_or_lancedb() -> None:
    # `rsitr --help` and a mistyped argument answer at once
    loaded = _imported_by("from rsitr.cli import build_parser; build_parser()")
    heavy = {m.split(".")[0] for m in loaded} & {"torch", "ray", "lancedb", "transformers", "timm", "prefect"}
    assert not heavy, heavy
