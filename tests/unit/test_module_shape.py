"""Every module in proxy/ is a small room with one job: a docstring whose first line says the
job, and at most MAX_LINES lines (STYLE.md, issue 13).

A newcomer finds a behaviour by reading first lines; a module past the bound usually holds
two jobs. Modules are read as text and with `ast`, never imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT

PACKAGE = ROOT / "proxy"

MAX_LINES = 500

# Modules still over MAX_LINES, to be split by job. The list only shrinks: the test asserts
# equality, so it fails on a new oversized module and when a listed one has been split.
KNOWN_OVERSIZED: list[str] = []


def modules(root: Path = PACKAGE) -> list[Path]:
    return sorted(root.rglob("*.py"))


def relative(path: Path, root: Path = PACKAGE) -> str:
    return path.relative_to(root.parent).as_posix()


def summary_problem(source: str) -> str | None:
    """Why the module docstring does not open with a one-line statement of the job, or None.

    The first line must be a whole sentence on its own: non-empty, ended by a full stop, and
    followed by nothing or a blank line (PEP 257's summary line), so it reads alone in a list.
    """
    docstring = ast.get_docstring(ast.parse(source), clean=False)
    if docstring is None:
        return "no module docstring"
    lines = docstring.splitlines() or [""]
    first = lines[0].strip()
    if not first:
        return "the docstring's first line is empty"
    if len(lines) > 1 and lines[1].strip():
        return "the first line runs on into the next: make it one line, then a blank line"
    if not first.endswith("."):
        return "the first line is not a sentence ending in a full stop"
    return None


def line_count(path: Path) -> int:
    return len(path.read_text().splitlines())


def oversized(root: Path = PACKAGE) -> list[str]:
    return [relative(p, root) for p in modules(root) if line_count(p) > MAX_LINES]


def test_every_module_says_its_job_in_its_first_line() -> None:
    problems = [
        f"{relative(p)}: {problem}"
        for p in modules()
        if (problem := summary_problem(p.read_text())) is not None
    ]
    assert problems == []


def test_no_new_oversized_module() -> None:
    assert oversized() == KNOWN_OVERSIZED


def test_the_summary_check_refuses_what_it_should() -> None:
    assert summary_problem("x = 1\n") == "no module docstring"
    assert summary_problem('""""""\n') == "the docstring's first line is empty"
    assert summary_problem('"""\nLater."""\n') == "the docstring's first line is empty"
    assert summary_problem('"""Half of a sentence that goes\non here."""\n') is not None
    assert summary_problem('"""No full stop"""\n') is not None
    assert summary_problem('"""One job.\n\nMore on it\nhere."""\n') is None
    assert summary_problem('"""One job."""\n') is None


def test_the_size_check_counts_lines(tmp_path: Path) -> None:
    package = tmp_path / "proxy"
    package.mkdir()
    (package / "small.py").write_text("x = 1\n" * MAX_LINES)
    (package / "big.py").write_text("x = 1\n" * (MAX_LINES + 1))
    assert oversized(package) == ["proxy/big.py"]
