"""Sphinx extension of the minisgm book (loaded by ``sphinx.local_extensions`` in _config.yml).

1. Author-year citations everywhere. The labels of the reference lists are "Ho et al., 2020"
   (pybtex formatting style ``minisgm``, label style ``minisgm_author_year``), and ``{cite}``
   / ``{cite:t}`` render "(Ho et al., 2020)" / "Ho et al. (2020)" (reference style
   ``minisgm_author_year``), both read from the label. A label is unique in the whole .bib
   file, so a work is named the same on every page ("Song et al., 2021a" and "2021b").
2. Each ``<script>`` once per page. Sphinx 7.4 adds a body-only script registered after the
   builder started (sphinx-thebe's ``THEBE_JS_URL``, sphinx-togglebutton's selector) twice,
   once as filename ``None`` and once as ``''``, and the second ``const THEBE_JS_URL`` is a
   SyntaxError in the browser. The duplicates are removed from each page's script list.
3. Search from ``file://``: Sphinx's search page fetches each result's page for an excerpt,
   which browsers block on file:// (a CORS error and an uncaught rejection per result).
   There the search page shows results without excerpts; over http it shows them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
import shutil
from pathlib import Path
from typing import Iterable, List

import pybtex.plugin
import sphinxcontrib.bibtex.plugin
from pybtex.richtext import Text
from pybtex.style.formatting.alpha import Style as AlphaStyle
from pybtex.style.labels import BaseLabelStyle
from pybtex.style.template import Node
from sphinxcontrib.bibtex.style.referencing import (
    BaseReferenceStyle,
    BracketStyle,
    GroupReferenceStyle,
    PersonStyle,
)
from sphinxcontrib.bibtex.style.referencing.extra_author import ExtraAuthorReferenceStyle
from sphinxcontrib.bibtex.style.referencing.extra_empty import ExtraEmptyReferenceStyle
from sphinxcontrib.bibtex.style.referencing.extra_label import ExtraLabelReferenceStyle
from sphinxcontrib.bibtex.style.referencing.extra_year import ExtraYearReferenceStyle
from sphinxcontrib.bibtex.style.template import entry_label, join, join2, node, post_text, pre_text, reference

SEP = ", "  # between the authors and the year, in labels and in parenthetical citations
LETTERS = "abcdefghijklmnopqrstuvwxyz"
NBSP = "\u00a0"


# ----- 1. author-year labels and citations -------------------------------------------------


def last_names(entry) -> list[str]:
    """Plain-text last names of the authors (or editors), LaTeX accents resolved."""
    style = pybtex.plugin.find_plugin("pybtex.style.names", "last")()
    persons = entry.persons.get("author") or entry.persons.get("editor") or []
    return [style.format(person, True).format().render_as("text") for person in persons]


def authors_text(names: list[str]) -> str:
    """"Song", "Song and Ermon", "Song et al.", with no-break spaces: a citation breaks over
    lines, in a narrow table cell say, only after its comma ("(Song et al.," / "2021b)")."""
    if not names:
        text = "Anonymous"
    elif len(names) == 1:
        text = names[0]
    elif len(names) == 2:
        text = f"{names[0]} and {names[1]}"
    else:
        text = f"{names[0]} et al."
    return text.replace(" ", NBSP)


def author_year_labels(entries: Iterable) -> dict[str, str]:
    """Entry key -> label "Authors, year", unique over ``entries`` (the whole .bib file).

    Works whose labels would be the same get a, b, ... in the order of their titles:
    "Song et al., 2021a" (maximum likelihood training), "Song et al., 2021b" (SDEs). Letters
    rather than more names keep a citation short enough for a table cell.
    """
    by_label: dict[str, list] = {}
    for entry in entries:
        label = authors_text(last_names(entry)) + SEP + entry.fields.get("year", "n.d.")
        by_label.setdefault(label, []).append(entry)
    labels = {}
    for label, same in by_label.items():
        same.sort(key=lambda entry: entry.fields.get("title", "").lower())
        for letter, entry in zip(LETTERS, same):
            labels[entry.key] = label + (letter if len(same) > 1 else "")
    return labels


_LABELS: dict[str, str] = {}  # filled from the whole .bib file when the build starts


def _collect_labels(app) -> None:
    _LABELS.clear()
    _LABELS.update(author_year_labels(app.env.get_domain("cite").bibdata.data.entries.values()))


class AuthorYearLabelStyle(BaseLabelStyle):
    """The labels of :func:`author_year_labels`: one label per work on every page."""

    def format_labels(self, sorted_entries):
        for entry in sorted_entries:
            yield _LABELS.get(entry.key) or author_year_labels([entry])[entry.key]


class MinisgmStyle(AlphaStyle):
    """pybtex's alpha style (sorted by author, year, title) with author-year labels."""

    default_label_style = "minisgm_author_year"


def _split_label(label: str) -> tuple[str, str]:
    authors, _, year = label.rpartition(SEP)
    return authors, year


@node
def label_authors(children, data) -> Text:
    """The authors as the entry's label names them ("Song et al.")."""
    assert not children
    return Text(_split_label(data["formatted_entry"].label)[0])


@node
def label_year(children, data) -> Text:
    """The year as the entry's label gives it ("2021", or "2021a")."""
    assert not children
    return Text(_split_label(data["formatted_entry"].label)[1])


@dataclass
class _Parenthetical(BaseReferenceStyle):
    """{cite}, {cite:p}: "(Song et al., 2021; Ho et al., 2020)"."""

    bracket: BracketStyle = field(default_factory=lambda: BracketStyle(left="(", right=")", sep="; "))

    def role_names(self) -> Iterable[str]:
        return [f"{alt}p{full}" for alt in ("", "al") for full in ("", "s")]

    def outer(self, role_name: str, children: List) -> Node:
        return self.bracket.outer(children, brackets="al" not in role_name, capfirst=False)

    def inner(self, role_name: str) -> Node:
        return join2(sep1=" ", sep2=SEP)[pre_text, reference[entry_label], post_text]


@dataclass
class _Textual(BaseReferenceStyle):
    """{cite:t}: "Song et al. (2021)"."""

    bracket: BracketStyle = field(
        default_factory=lambda: BracketStyle(left="(", right=")", sep=", ", sep2=" and ", last_sep=", and ")
    )

    def role_names(self) -> Iterable[str]:
        return [f"{cap}t{full}" for cap in ("", "c") for full in ("", "s")]

    def outer(self, role_name: str, children: List) -> Node:
        return self.bracket.outer(children, brackets=False, capfirst="c" in role_name)

    def inner(self, role_name: str) -> Node:
        return join(sep=" ")[
            label_authors,
            join[self.bracket.left, join2(sep1=" ", sep2=SEP)[pre_text, reference[label_year], post_text], self.bracket.right],
        ]


@dataclass
class MinisgmReferenceStyle(GroupReferenceStyle):
    """Author-year citations that name a work as its label in the reference list does."""

    def __post_init__(self):
        round_ = BracketStyle(left="(", right=")")
        self.styles.extend(
            [
                _Parenthetical(),
                _Textual(),
                ExtraAuthorReferenceStyle(bracket=round_, person=PersonStyle(other=" et al.")),
                ExtraLabelReferenceStyle(bracket=round_),
                ExtraYearReferenceStyle(bracket=round_),
                ExtraEmptyReferenceStyle(),
            ]
        )
        super().__post_init__()


# ----- 2. each script once ------------------------------------------------------------------


def _script_key(js) -> tuple:
    return (str(js.filename or ""), js.priority, tuple(sorted(js.attributes.items())))


def dedupe_scripts(app, pagename, templatename, context, doctree) -> None:
    scripts: List = context.get("script_files")
    if not isinstance(scripts, list):
        return
    seen: set = set()
    unique = []
    for js in scripts:
        key = _script_key(js) if hasattr(js, "attributes") else (str(js),)
        if key not in seen:
            seen.add(key)
            unique.append(js)
    scripts[:] = unique


# ----- 3. search without excerpts on file:// -----------------------------------------------

NO_FETCH_ON_FILE = 'if (location.protocol === "file:") DOCUMENTATION_OPTIONS.SHOW_SEARCH_SUMMARY = false;'


def search_without_fetch_on_file(app, pagename, templatename, context, doctree) -> None:
    if pagename == "search":  # after documentation_options.js (priority 200)
        app.add_js_file(None, body=NO_FETCH_ON_FILE, priority=210)


def _add_static(app, config):
    """The book's CSS (book/_ext/static/minisgm_book.css) is copied and linked on every page."""
    config.html_static_path.append(str(Path(__file__).parent / "static"))


def _refresh_static(app, exception):
    """Copy the book's CSS again after every build: an incremental build in which no page is out
    of date returns before Sphinx copies the static files, so an edit of the CSS alone would
    not reach the HTML."""
    if exception is None and app.builder.format == "html":
        for f in (Path(__file__).parent / "static").iterdir():
            shutil.copyfile(f, Path(app.outdir) / "_static" / f.name)


def setup(app):
    app.connect("config-inited", _add_static)
    app.connect("build-finished", _refresh_static)
    app.add_css_file("minisgm_book.css")
    pybtex.plugin.register_plugin("pybtex.style.labels", "minisgm_author_year", AuthorYearLabelStyle)
    pybtex.plugin.register_plugin("pybtex.style.formatting", "minisgm", MinisgmStyle)
    sphinxcontrib.bibtex.plugin.register_plugin(
        "sphinxcontrib.bibtex.style.referencing", "minisgm_author_year", MinisgmReferenceStyle
    )
    app.connect("builder-inited", _collect_labels, priority=900)  # after sphinxcontrib-bibtex read the .bib
    app.connect("html-page-context", search_without_fetch_on_file)
    app.connect("html-page-context", dedupe_scripts, priority=900)
    # A new env_version makes Sphinx re-read every page: an edit of this file (labels, citation
    # style) then shows in the next incremental build, as an edit of _config.yml would.
    env_version = int(hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:8], 16)
    return {"version": "1", "env_version": env_version, "parallel_read_safe": True, "parallel_write_safe": True}
