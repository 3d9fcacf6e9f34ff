"""The README stays short and every relative link of README.md and docs/*.md reaches a file (and,
with an anchor, one of that file's headings)."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 300


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _links(doc: Path) -> list[str]:
    prose = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)  # code blocks hold no links
    return [m.group(1) for m in re.finditer(r"\]\(([^)\s]+)\)", prose) if not m.group(1).startswith("http")]


def test_the_readme_is_short():
    assert len((REPO / "README.md").read_text().splitlines()) <= README_MAX_LINES


def test_every_relative_link_reaches_its_file_and_heading():
    headings = {doc: {_anchor(m.group(1)) for m in re.finditer(r"^#+ (.*)$", doc.read_text(), re.M)} for doc in DOCS}
    broken = []
    for doc in DOCS:
        for link in _links(doc):
            path, _, anchor = link.partition("#")
            target = (doc.parent / path).resolve() if path else doc
            if not target.exists():
                broken.append(f"{doc.name}: {link} (no such file)")
            elif anchor and target in headings and anchor not in headings[target]:
                broken.append(f"{doc.name}: {link} (no such heading)")
    assert broken == []
    assert sum(len(_links(doc)) for doc in DOCS) > 50  # the pattern finds the links there are


def test_a_broken_link_is_found(tmp_path):
    doc = tmp_path / "a.md"
    doc.write_text("# Title\n\n[x](missing.md) [y](#title) [z](#nope)\n```\n[w](in-code.md)\n```\n")
    assert _links(doc) == ["missing.md", "#title", "#nope"]
    assert _anchor("Choosing a strategy: `auto`, the cost model") == "choosing-a-strategy-auto-the-cost-model"
