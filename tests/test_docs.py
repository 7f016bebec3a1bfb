"""The result tables of the README and docs/ are the ones the committed results print.

``benchmarks/summarize.py`` prints every result table from the JSON files in
``benchmarks/results/``; a table in the docs with one of its header rows must be one of those tables,
row for row, and every table it prints with rows must be shown somewhere in the docs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def markdown_tables(text: str) -> list[tuple[str, ...]]:
    """Every run of consecutive lines starting with ``|``, as a tuple of lines."""
    tables, current = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(tuple(current))
            current = []
    return tables


def summarize_tables() -> list[tuple[str, ...]]:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "summarize.py")], capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout
    return markdown_tables(out)


def test_docs_tables_equal_summarize_output() -> None:
    printed = summarize_tables()
    assert len(printed) >= 20, "summarize.py printed fewer tables than the docs hold"
    headers = {t[0] for t in printed}
    shown = []
    for path in DOCS:
        for table in markdown_tables(path.read_text()):
            if table[0] in headers:
                assert table in printed, (f"{path.relative_to(ROOT)}: a table headed {table[0][:80]!r} is not what "
                                          "benchmarks/summarize.py prints from benchmarks/results/ - rerun it")
                shown.append(table)
    missing = [t[0][:80] for t in printed if len(t) > 2 and t not in shown]  # tables with rows
    assert not missing, f"tables summarize.py prints that no doc shows: {missing}"


def test_markdown_tables_parses_consecutive_rows() -> None:
    text = "intro\n| a | b |\n|---|---|\n| 1 | 2 |\n\n| c |\n|---|\ntext"
    assert markdown_tables(text) == [("| a | b |", "|---|---|", "| 1 | 2 |"), ("| c |", "|---|")]
