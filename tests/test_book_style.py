"""The rendered chapters fit the page and end with checked exercises.

* Code lines and printed lines are at most 88 characters, so no code or output block scrolls
  sideways at the book's content width.
* Figures are at most 760 pixels wide as stored (figure.dpi 80 x 9.5 inches): the page then
  shows them at their own size instead of shrinking their text.
* Every chapter ends with an "Exercises" section of 5-8 exercises; each exercise has a
  solution (hidden in a dropdown), and at least one solution is an executed code cell with
  ``assert`` statements, so nbval checks the solutions like the rest of the chapter.
* A parenthetical citation is not written inside parentheses, which would render as
  "(FID, (Heusel et al., 2017))": there the bracket-less role ``{cite:alp}`` is used.
"""

import base64
import json
import re
import struct
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOC = (ROOT / "_toc.yml").read_text()
CHAPTERS = [ROOT / f"{name}.ipynb" for name in re.findall(r"file:\s*(book/\d\d_\w+)", TOC)]
MAX_LINE = 88
MAX_PNG_WIDTH = 760

EXERCISE = re.compile(r"^(?:```|:::)\{exercise\}[^\n]*\n(?::[a-z]+:[^\n]*\n)*?:label:\s*(\S+)", re.MULTILINE)
SOLUTION = re.compile(r"^(?:```|:::)\{solution(?:-start)?\}\s*(\S+)\s*\n((?::[a-z]+:[^\n]*\n)*)", re.MULTILINE)


def cells(path):
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def source(cell) -> str:
    s = cell["source"]
    return s if isinstance(s, str) else "".join(s)


@pytest.fixture(params=CHAPTERS, ids=lambda p: p.stem)
def chapter(request):
    return request.param


def test_the_toc_lists_the_chapters():
    assert len(CHAPTERS) >= 9 and all(p.is_file() for p in CHAPTERS), CHAPTERS


def test_code_and_printed_lines_fit_the_page(chapter):
    long = []
    for i, cell in enumerate(cells(chapter)):
        if cell["cell_type"] != "code":
            continue
        for line in source(cell).splitlines():
            if len(line) > MAX_LINE:
                long.append(f"cell {i} code ({len(line)}): {line[:60]}...")
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stdout":
                text = out["text"] if isinstance(out["text"], str) else "".join(out["text"])
                for line in text.splitlines():
                    if len(line) > MAX_LINE:
                        long.append(f"cell {i} output ({len(line)}): {line[:60]}...")
    assert not long, "\n".join(long)


def test_figures_fit_the_page(chapter):
    wide = []
    for i, cell in enumerate(cells(chapter)):
        for out in cell.get("outputs", []):
            png = out.get("data", {}).get("image/png")
            if png:
                raw = base64.b64decode(png if isinstance(png, str) else "".join(png))
                width = struct.unpack(">I", raw[16:20])[0]
                if width > MAX_PNG_WIDTH:
                    wide.append(f"cell {i}: {width} px")
    assert not wide, wide


def test_exercises_with_hidden_checked_solutions(chapter):
    md = "\n".join(source(c) for c in cells(chapter) if c["cell_type"] == "markdown")
    assert re.search(r"^#+ Exercises\s*$", md, re.MULTILINE), "no 'Exercises' section"
    labels = EXERCISE.findall(md)
    assert 5 <= len(labels) <= 8, f"{len(labels)} exercises"
    solved = {}
    for label, options in SOLUTION.findall(md):
        solved[label] = options
    missing = [lab for lab in labels if lab not in solved]
    assert not missing, f"exercises without a solution: {missing}"
    shown = [lab for lab in labels if ":class: dropdown" not in solved[lab]]
    assert not shown, f"solutions not hidden (add ':class: dropdown'): {shown}"
    # At least one gated solution holds an executed code cell with an assert.
    inside, checked = False, 0
    for cell in cells(chapter):
        text = source(cell)
        if cell["cell_type"] == "markdown":
            if re.search(r"\{solution-start\}", text):
                inside = True
            if re.search(r"\{solution-end\}", text):
                inside = False if text.rfind("solution-end") > text.rfind("solution-start") else inside
        elif inside and re.search(r"^\s*assert\b", text, re.MULTILINE) and cell.get("outputs") is not None:
            checked += 1
    assert checked >= 1, "no solution code cell with an assert"


def test_no_citation_in_double_brackets(chapter):
    doubled = []
    for i, cell in enumerate(cells(chapter)):
        if cell["cell_type"] != "markdown":
            continue
        text = source(cell)
        for m in re.finditer(r"\{cite:ps?\}`[^`]+`", text):
            paragraph = text[: m.start()].split("\n\n")[-1]
            paragraph = re.sub(r"\$[^$]*\$", "", paragraph)  # parentheses of formulas do not count
            if paragraph.count("(") > paragraph.count(")"):
                doubled.append(f"cell {i}: ...{text[max(0, m.start() - 40):m.end()]}")
    assert not doubled, "use {cite:alp} inside parentheses:\n" + "\n".join(doubled)
