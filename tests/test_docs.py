"""The documentation holds together: README.md and docs/*.md link only to files and headings that exist,
code comments point to sections of docs/reference.md that exist, no tracked file cites the private
specification, and README.md stays a front page."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 260

# The word is assembled so that this file does not mention it itself.
_private_spec_word = re.compile(r"\b" + "SP" + r"EC\b")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_REFERENCE_SECTION = re.compile(r"docs/reference\.md, '([^']+)'")
_SKIPPED_DIRS = {".git", "__pycache__", "runs", "data"}


def _doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, with inline code spans blanked out."""
    out, fenced = [], False
    for no, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((no, re.sub(r"`[^`]*`", "``", line)))
    return out


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: inline markup dropped, lower case, punctuation removed, spaces
    to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = text.replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def headings(path: Path) -> list[str]:
    """The heading texts of a Markdown file, outside code blocks."""
    out, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else _HEADING.match(line)
        if m:
            out.append(m.group(2))
    return out


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for h in headings(path):
        slug = github_slug(h)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(files: list[Path]) -> list[str]:
    problems = []
    for md in files:
        for no, line in _prose_lines(md.read_text(encoding="utf-8")):
            for target in _LINK.findall(line):
                if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
                    continue  # external (http:, mailto:, ...)
                path_part, _, anchor = target.partition("#")
                dest = (md.parent / path_part).resolve() if path_part else md
                where = f"{md.relative_to(REPO)}:{no}: ({target})"
                if not dest.exists():
                    problems.append(f"{where} no such file")
                elif REPO not in dest.parents and dest != REPO:
                    problems.append(f"{where} points outside the repository")
                elif anchor:
                    if dest.suffix != ".md":
                        problems.append(f"{where} anchor into a file that is not Markdown")
                    elif anchor not in anchors(dest):
                        problems.append(f"{where} no heading with anchor #{anchor} in {dest.name}")
    return problems


def tracked_files() -> list[Path]:
    """Tracked files (git ls-files), or every file outside .git, caches, runs/ and data/ without git."""
    if (REPO / ".git").exists():
        try:
            res = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
            return [REPO / p for p in res.stdout.decode().split("\0") if p]
        except (OSError, subprocess.CalledProcessError):
            pass
    out = []
    for root, dirs, names in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in _SKIPPED_DIRS]
        out += [Path(root) / n for n in names]
    return out


def _text(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return None if b"\0" in data else data.decode("utf-8", errors="replace")


def _lines(files: list[Path]):
    """(path, line number, line) of every text file among ``files``."""
    for path in files:
        text = _text(path)
        if text is not None:
            for no, line in enumerate(text.splitlines(), 1):
                yield path, no, line


def spec_mentions(files: list[Path]) -> list[str]:
    return [f"{path.relative_to(REPO)}:{no}: {line.strip()[:100]}"
            for path, no, line in _lines(files) if _private_spec_word.search(line)]


def unknown_reference_sections(files: list[Path]) -> list[str]:
    known = set(headings(REPO / "docs" / "reference.md"))
    problems = []
    for path, no, line in _lines(files):
        for title in _REFERENCE_SECTION.findall(line):
            if title not in known:
                where = f"{path.relative_to(REPO)}:{no}"
                problems.append(f"{where}: no section '{title}' in docs/reference.md")
    return problems


def test_markdown_links_and_anchors_resolve():
    problems = broken_links(_doc_files())
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_every_docs_page_is_linked_from_the_readme():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    linked = {(REPO / t.partition("#")[0]).resolve() for t in _LINK.findall(readme) if t}
    missing = [p.name for p in sorted((REPO / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"docs pages not linked from README.md: {missing}"


def test_code_points_to_existing_reference_sections():
    problems = unknown_reference_sections(tracked_files())
    assert not problems, "\n".join(problems)


def test_no_tracked_file_cites_the_private_spec():
    problems = spec_mentions(tracked_files())
    assert not problems, "cite docs/reference.md instead:\n" + "\n".join(problems)


def test_readme_is_a_front_page():
    n = len((REPO / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines, over {README_MAX_LINES}: move detail to docs/"


def test_slugs_follow_github():
    assert github_slug("Video→text with several captions") == "videotext-with-several-captions"
    assert github_slug("Speed–memory table (clips/s, peak GB)") == "speedmemory-table-clipss-peak-gb"
    assert github_slug("EMCL-QA: `video` QA") == "emcl-qa-video-qa"
