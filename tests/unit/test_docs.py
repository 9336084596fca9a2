"""The docs hold together: README.md is the front page (short, the two set-up commands, a link to
every doc in docs/); every relative link in README.md, docs/ and loadtests/README.md reaches a
file and a heading; every repository path the docs name in code exists; and nothing is written
twice."""

from __future__ import annotations

import re
from pathlib import Path

from tests.helpers import ROOT

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
LOADTESTS = ROOT / "loadtests" / "README.md"

README_MAX_LINES = 200
TRY_IT = "python3 -m venv .venv && .venv/bin/pip install -q -e . && .venv/bin/laneswitch demo"
RUN_THE_TESTS = "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && .venv/bin/pytest"

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# A path into the repository, as the docs name files in code spans (`tests/unit/test_docs.py`).
REPO_PATH = re.compile(r"^(?:proxy|tests|loadtests|deploy|config|scripts|docs)/[\w./-]*$")
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)


def prose(text: str) -> str:
    """The text without code blocks and code spans: a link inside them is not a link."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    names = set()
    for _, title in HEADING.findall(FENCE.sub("", path.read_text())):
        base = slug(title)
        count = seen.get(base, 0)
        seen[base] = count + 1
        names.add(base if count == 0 else f"{base}-{count}")
    return names


def links(path: Path) -> list[str]:
    return LINK.findall(prose(path.read_text()))


def paragraphs(path: Path) -> list[str]:
    """Paragraphs and code blocks of some length, whitespace folded, for finding copies."""
    text = path.read_text()
    blocks = FENCE.findall(text) + re.split(r"\n\s*\n", FENCE.sub("", text))
    folded = (" ".join(block.split()) for block in blocks)
    return [block for block in folded if len(block) >= 80]


def test_the_readme_is_a_front_page() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    assert f"```sh\n{TRY_IT}\n```" in text
    assert f"```sh\n{RUN_THE_TESTS}\n```" in text
    # CI runs the README's test command as it is written there.
    assert f"\n{RUN_THE_TESTS}\n" in (ROOT / ".ci" / "run").read_text()


def test_the_readme_links_every_doc() -> None:
    assert DOCS, "no docs/*.md"
    linked = {
        (README.parent / target.split("#", 1)[0]).resolve()
        for target in links(README)
        if not target.startswith(("http://", "https://", "#"))
    }
    missing = [doc.name for doc in DOCS if doc.resolve() not in linked]
    assert not missing, f"docs the README does not link: {missing}"


def test_every_relative_link_reaches_a_file_and_a_heading() -> None:
    broken = []
    for page in [README, *DOCS, LOADTESTS]:
        for target in links(page):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_link_check_sees_a_broken_link(tmp_path: Path) -> None:
    """The check above is not vacuous: a missing file and a missing heading are both seen."""
    page = tmp_path / "page.md"
    page.write_text(
        "# A page\n\n## Second part\n\n[ok](#second-part) [file](gone.md) [head](#nowhere)\n"
        "`[code](not-a-link.md)`\n\n```\n[fenced](not-a-link-either.md)\n```\n"
    )
    assert links(page) == ["#second-part", "gone.md", "#nowhere"]
    assert anchors(page) == {"a-page", "second-part"}


def test_the_slugs_are_githubs() -> None:
    assert slug("Workers: using every core") == "workers-using-every-core"
    assert slug("Coming from Flagger, Argo Rollouts or nginx-ingress") == (
        "coming-from-flagger-argo-rollouts-or-nginx-ingress"
    )
    assert slug("Locust: sticky users while weights move") == (
        "locust-sticky-users-while-weights-move"
    )


def test_every_page_has_one_title() -> None:
    for page in [README, *DOCS]:
        titles = [
            title
            for hashes, title in HEADING.findall(FENCE.sub("", page.read_text()))
            if hashes == "#"
        ]
        assert len(titles) == 1, (page.name, titles)


def test_nothing_is_written_twice() -> None:
    """No paragraph, table or code block is both on the front page and in a doc, in two docs,
    or twice in one."""
    where: dict[str, list[str]] = {}
    for page in [README, *DOCS]:
        for block in paragraphs(page):
            where.setdefault(block, []).append(page.name)
    copies = {block[:60]: pages for block, pages in where.items() if len(pages) > 1}
    assert not copies, copies


def named_paths(path: Path) -> list[str]:
    """Repository paths in the page's code spans and code blocks (globs and placeholders out)."""
    text = path.read_text()
    code = " ".join([*FENCE.findall(text), *CODE_SPAN.findall(FENCE.sub("", text))])
    words = (word.strip("`'\",;:()[]") for word in code.split())
    return [word for word in words if REPO_PATH.match(word)]


def test_every_path_the_docs_name_exists() -> None:
    missing = [
        f"{page.relative_to(ROOT)}: {name}"
        for page in [README, *DOCS]
        for name in named_paths(page)
        if not (ROOT / name).exists()
    ]
    assert not missing, "\n".join(missing)


def test_the_path_check_reads_spans_and_blocks(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "See `tests/unit/test_docs.py` and `python loadtests/bench.py --only nginx`, not proxy/x.\n"
        "\n```sh\nscripts/check\n```\nGlobs are left out: `tests/e2e/test_fleet_*.py`.\n"
    )
    assert named_paths(page) == ["scripts/check", "tests/unit/test_docs.py", "loadtests/bench.py"]
