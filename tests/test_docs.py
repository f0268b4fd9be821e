"""The docs stay true where a test can tell: the README's Quick use runs as pasted, every relative
link in README.md, docs/ and the packages' READMEs reaches its file and heading, and architecture.md's
table of `train:` settings lists every setting with its default and whether `--resume` may change it."""

import dataclasses
import json
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
    assert re.search(r"convert_norms -> dyt: replaced [1-9]", proc.stdout), proc.stdout  # "replaced 0" converted nothing


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


def test_the_train_settings_table_matches_train_config():
    """Each ``TrainConfig`` field is one row of architecture.md's table: its default as YAML writes
    it, "may change" exactly for ``RESUME_MAY_CHANGE``, and of those "not in a comparison" exactly for
    ``RESUME_CHANGES_RESULTS``."""
    from dyt.train.config import TrainConfig

    section = (ROOT / "docs" / "architecture.md").read_text().split("### The `train:` settings", 1)[1]
    rows = dict(re.findall(r"^\| `(\w+)` \| (.*?) \|$", section.split("\n\n#", 1)[0], re.M))
    fields = {field.name: field.default for field in dataclasses.fields(TrainConfig)}
    assert sorted(rows) == sorted(fields)
    for name, default in fields.items():
        shown, resume = (cell.strip() for cell in rows[name].split(" | ")[:2])
        expected = json.dumps(list(default) if isinstance(default, tuple) else default)
        assert shown.strip("`") == (default if isinstance(default, str) else expected), name
        expected = "fixed"
        if name in TrainConfig.RESUME_MAY_CHANGE:
            expected = "may change (not in a comparison)" if name in TrainConfig.RESUME_CHANGES_RESULTS else "may change"
        assert resume == expected, name


def test_help_descriptions_keep_what_a_paragraph_ending_in_a_colon_introduces():
    """``--help`` shows a command's docstring up to its first paragraph, and the example or list a
    paragraph ending in a colon introduces (dyt-llama-prepare's example was cut off before)."""
    from dyt.errors import help_description
    from dyt_llama import prepare

    assert help_description("One.\n\nTwo.") == "One."
    assert help_description("Builds it, e.g.::\n\n    cmd --x\n\nMore.") == "Builds it, e.g.::\n\n    cmd --x"
    assert help_description(None) == ""
    assert "dyt-llama-prepare --config" in help_description(prepare.__doc__)
    shown = subprocess.run([sys.executable, "-m", "dyt_llama.prepare", "--help"], capture_output=True, text=True,
                           check=True).stdout  # as printed: the example on a line of its own, not reflowed
    assert "\n    dyt-llama-prepare --config recipes/llama/tiny.yaml --num-proc 8\n" in shown
