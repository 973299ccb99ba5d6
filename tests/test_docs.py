"""The README is the front door and docs/ holds the topics: every relative link
between them resolves, to a file that exists and, with ``#anchor``, to one of its
headings (GitHub's anchors); the README stays short and names the test command."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted([REPO / "README.md", *(REPO / "docs").rglob("*.md")])

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a ``# comment`` in a bash block is no heading)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped (letters,
    digits, ``_``, ``-`` and spaces kept), spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in ``path``; a repeated heading gets ``-1``, ``-2``... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(path.read_text()):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(path: Path) -> list[str]:
    """``path``'s relative links whose file is missing or whose anchor is no heading there."""
    bad = []
    for line in prose_lines(path.read_text()):
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                bad.append(f"{target}: no file {dest}")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{target}: no heading #{anchor} in {dest.name}")
    return bad


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path: Path) -> None:
    assert broken_links(path) == []


def test_checker_catches_a_missing_file_and_a_missing_anchor(tmp_path: Path) -> None:
    (tmp_path / "topic.md").write_text("# A topic\n\n## The paper's tables: 3–4\n")
    doc = tmp_path / "README.md"
    doc.write_text(
        "# Front\n\n## Stopping and resuming\n\n"
        "[ok](topic.md#the-papers-tables-34) [ok](#stopping-and-resuming) [web](https://x.org/a#b)\n"
        "[gone](missing.md) [no anchor](topic.md#tables) ![img](gone.png)\n"
        "```bash\n# Not a heading\n[in code](nowhere.md)\n```\n"
        "[not here](#not-a-heading) `[code](nowhere.md)`\n"
    )
    bad = broken_links(doc)
    assert [b.split(":")[0] for b in bad] == [
        "missing.md",
        "topic.md#tables",
        "gone.png",
        "#not-a-heading",
    ]


def test_readme_is_the_short_front_door() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) < 350, "README.md is the front door: move long topics to docs/"
    assert "make test" in readme and "make run" in readme
    linked = set(LINK.findall(readme))
    topics = sorted(p for p in (REPO / "docs").glob("*.md"))
    assert topics, "docs/ holds the topics"
    for p in topics:  # every topic file is reachable from the front door
        assert f"docs/{p.name}" in linked, f"README.md does not link docs/{p.name}"
