"""docs/: the pages stay in step with the code they describe.

- docs/variants.md has a section for every registered variant (and none for a variant that
  doesn't exist);
- docs/onnx.md lists exactly the ONNX importer's op table, in its order;
- every link between the pages (and to a heading) resolves, and every repository path the
  pages name exists.
"""

from __future__ import annotations

import re
from pathlib import Path

from dropcli.backends.torch.importer import ONNX_OPS
from dropcli.variants import load_all

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_every_variant_has_a_section():
    text = (DOCS / "variants.md").read_text()
    sections = set(re.findall(r"^### ([\w-]+)\s*$", text, flags=re.M))
    assert sections == set(load_all()), (set(load_all()) - sections, sections - set(load_all()))


def test_onnx_page_lists_the_importer_table():
    text = (DOCS / "onnx.md").read_text()
    block = re.search(r"<!-- importer-ops.*?-->(.*?)<!-- /importer-ops -->", text, flags=re.S)
    assert block, "docs/onnx.md lost its importer-ops block"
    assert tuple(re.findall(r"`(\w+)`", block.group(1))) == ONNX_OPS


def test_links_and_paths_resolve():
    assert {p.name for p in PAGES} >= {"variants.md", "analysis.md", "onnx.md", "learned.md"}
    bad = []
    for page in PAGES:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://")):
                continue
            file, _, anchor = target.partition("#")
            dest = (page.parent / file) if file else page
            if not dest.exists():
                bad.append(f"{page.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"{page.name}: {target} (no such heading)")
        for path in re.findall(r"`((?:dropcli|tests|benchmarks)/[\w/.]*)`", text):
            if not (ROOT / path).exists():
                bad.append(f"{page.name}: {path} (no such path)")
    assert not bad, bad
