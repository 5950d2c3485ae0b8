"""Every book section cited in the package (``:ref:`sec-...``` in minisgm/**/*.py) exists in the book.

A target is a MyST label line ``(sec-...)=`` in book/*.md or in a markdown cell of
book/*.ipynb.
"""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"

CITE = re.compile(r":ref:`(?:[^`<]*<)?(sec-[A-Za-z0-9_-]+)>?`")
TARGET = re.compile(r"^\((sec-[A-Za-z0-9_-]+)\)=\s*$", re.MULTILINE)


def cited_labels() -> dict:
    """label -> set of modules (paths relative to ROOT) citing it."""
    out: dict = {}
    for path in sorted((ROOT / "minisgm").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for label in CITE.findall(path.read_text(encoding="utf-8")):
            out.setdefault(label, set()).add(rel)
    return out


def book_targets() -> list:
    """All labels defined in the book, with repeats (a repeat is a bug)."""
    labels = []
    for path in sorted(BOOK.glob("*.md")):
        labels += TARGET.findall(path.read_text(encoding="utf-8"))
    for path in sorted(BOOK.glob("*.ipynb")):
        nb = json.loads(path.read_text(encoding="utf-8"))
        for cell in nb["cells"]:
            if cell["cell_type"] == "markdown":
                source = cell["source"]
                labels += TARGET.findall("".join(source) if isinstance(source, list) else source)
    return labels


def test_the_package_cites_labels_and_the_book_defines_some():
    # Guards against a regex that silently matches nothing.
    assert "sec-gmm-score" in cited_labels()
    assert "sec-gmm-score" in book_targets()


def test_book_labels_are_unique():
    labels = book_targets()
    repeats = sorted({label for label in labels if labels.count(label) > 1})
    assert not repeats, f"labels defined more than once in book/: {repeats}"


def test_every_cited_label_exists_in_the_book():
    defined = set(book_targets())
    missing = [
        f"{label} (cited in {', '.join(sorted(modules))})"
        for label, modules in sorted(cited_labels().items())
        if label not in defined
    ]
    assert not missing, "cited in the package but not defined as (label)= in book/: " + "; ".join(missing)
