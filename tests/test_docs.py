"""The docs stay true where a test can tell: the README's Quick use runs as pasted, and every
relative link in README.md, docs/ and the packages' READMEs reaches its file and heading."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted(ROOT.glob("packages/*/README.md"))]
FENCED = re.compile(r"^```.*?^```", re.S | re.M)


def test_the_readme_quick_use_runs():
    """The README's Quick use block, as a user pastes it into a fresh interpreter."""
    block = re.search(r"## Quick use\s+```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "the README has no Quick use python block"
    proc = subprocess.run([sys.executable, "-c", block.group(1)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "convert_norms -> dyt: replaced" in proc.stdout, proc.stdout


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for a markdown file's headings: lower case, punctuation dropped, spaces to
    hyphens, a repeated heading suffixed -1, -2, ..."""
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6} (.+)$", FENCED.sub("", text), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_reach_their_file_and_heading(doc):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", FENCED.sub("", doc.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path) if path else doc
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in heading_anchors(dest.read_text()):
            broken.append(f"{target}: no such heading")
    assert not broken, broken
