"""The documentation holds: its links resolve, its commands parse, its results are the recorded ones, and it speaks
of the product, not of how it was built."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from benchmarks import report
from rsitr.cli import build_parser
from rsitr.config import DEFAULT_PRESET, available_presets
from rsitr.train import command

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted(
    [ROOT / "README.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").glob("*.md")]
    + [ROOT / folder / "README.md" for folder in ("benchmarks", "experiments", "infra", "infra/prefect")]
)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"```bash\n(.*?)```", re.S)


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists() or (anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved)):
            broken.append(target)
    assert not broken, broken


def _commands(page: Path) -> list[str]:
    """The shell commands of a page's bash blocks: continuations joined, comments and [optional] parts dropped."""
    commands = []
    for block in FENCE.findall(page.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s#\s.*$", "", line)  # a trailing comment
            line = re.sub(r"\[[^\[\]]*\]", "", line).strip()  # [--optional things]
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def _argv(line: str, program: str) -> list[str] | None:
    words = shlex.split(line)
    for start in range(len(words)):
        if words[start : start + len(program.split())] == program.split():
            return words[start + len(program.split()) :]
    return None


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_documented_command_parses(page: Path) -> None:
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    for line in _commands(page):
        if (argv := _argv(line, "python -m rsitr.train")) is not None:
            assert command.build_parser().parse_args(argv).config in available_presets(), line
        elif line.startswith("rsitr ") and (argv := _argv(line, "rsitr")) is not None:
            args = build_parser().parse_args(argv)
            assert getattr(args, "config", DEFAULT_PRESET) in available_presets(), line
        elif line.startswith("make "):
            assert shlex.split(line)[1] in targets, line


def test_the_results_page_is_what_the_recorded_results_say() -> None:
    page = report.PAGE.read_text()
    assert report.BEGIN in page
    assert report.render(page) == page, "docs/results.md is not current: run python -m benchmarks.report"


# what a user's documentation and the product never speak of: the work that built them
WORK_LOG = [
    re.compile(r"\bstops? \d+\b", re.I),  # numbered work stops
    re.compile(r"`[0-9a-f]{7,40}`"),  # commit hashes
    re.compile(r"\.\./shared\b"),  # a folder beside this checkout that users do not have
    re.compile(r"\b(DESIGN|STACK)\.md\b"),
]
PRODUCT = ["README.md", "CHANGELOG.md", "docs", "rsitr", "pipelines", "benchmarks", "experiments", "prefect.yaml"]


def test_no_work_log_references_in_the_product_or_its_docs() -> None:
    found = []
    for name in PRODUCT:
        base = ROOT / name
        files = [base] if base.is_file() else [p for p in base.rglob("*") if p.suffix in {".py", ".md", ".yaml", ".sh"}]
        for path in files:
            for number, line in enumerate(path.read_text().splitlines(), 1):
                found += [f"{path.relative_to(ROOT)}:{number}: {line.strip()}" for p in WORK_LOG if p.search(line)]
    assert not found, "\n".join(found)


def test_the_readme_stays_short() -> None:
    assert (ROOT / "README.md").read_text().count("\n") <= 200
