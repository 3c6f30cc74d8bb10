"""The documentation site builds strictly: every API page resolves its module, every nav entry exists, and no
warning (e.g. a docstring mkdocstrings cannot parse, a missing page, a cross-reference to nothing) passes silently.
The docstrings are Markdown: no Sphinx role or math directive reaches the rendered API pages, and math goes through
arithmatex (typeset by MathJax)."""

import glob
import html
import os
import re
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_docs_build_strictly(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir",
                          str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for page in ("api/functional/index.html", "api/callbacks/index.html", "conventions/index.html",
                 "examples/wang_jacot2023/index.html"):
        assert (tmp_path / "site" / page).stat().st_size > 5000, page
    text = (tmp_path / "site" / "api" / "callbacks" / "index.html").read_text()
    assert "HessianTrace" in text and "every_n_steps" in text  # rendered from the docstrings
    pages = sorted(glob.glob(str(tmp_path / "site" / "api" / "*" / "index.html")))
    assert len(pages) >= 10, pages
    for page in pages:
        # the page's text (tags dropped, entities decoded): what a reader sees, code spans included
        seen = html.unescape(re.sub(r"<[^>]+>", "", (tmp_path / "site" / page).read_text()))
        for raw in (":func:`", ":class:`", ":meth:`", ":attr:`", ":data:`", ":mod:`", ":math:`", ".. math::"):
            assert raw not in seen, f"{raw} in {os.path.relpath(page, tmp_path / 'site')}"
    functional = (tmp_path / "site" / "api" / "functional" / "index.html").read_text()
    assert 'class="arithmatex"' in functional
    assert '<a class="autorefs' in functional  # cross-references resolved to links
