"""The rendered book, as a reader meets it: launch links, scripts, search box, citations.

Inspects ``_build/html`` when it is newer than every input of the build (what `make book`
leaves), otherwise builds the book first, into pytest's cache folder (about 30 s on 2 idle
cores, no network; reused while the inputs are unchanged). ``MINISGM_BOOK_HTML=path``
inspects another build.
"""

import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from bs4 import BeautifulSoup

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
NBSP = "\u00a0"


def _inputs() -> list:
    paths = [ROOT / "_config.yml", ROOT / "_toc.yml", ROOT / "requirements.txt",
             *(ROOT / "book").glob("*.*"), *(ROOT / "book" / "_ext").glob("*.*")]
    return sorted(p for p in paths if p.is_file())


def _fingerprint() -> str:
    digest = hashlib.sha256()
    for path in _inputs():
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def html(request, tmp_path_factory) -> Path:
    """The built HTML: MINISGM_BOOK_HTML, else a fresh _build/html, else a build of this very
    source kept in pytest's cache (so `make test`'s second pass reuses the first one's)."""
    if os.environ.get("MINISGM_BOOK_HTML"):
        return Path(os.environ["MINISGM_BOOK_HTML"])
    built = ROOT / "_build" / "html"
    stamp = built / "book" / "intro.html"
    if stamp.is_file() and stamp.stat().st_mtime > max(p.stat().st_mtime for p in _inputs()):
        return built
    key = _fingerprint()
    cache = getattr(request.config, "cache", None)
    folder = cache.mkdir("rendered-book") if cache is not None else tmp_path_factory.mktemp("book")
    out = folder / "_build" / "html"
    if (folder / "key").is_file() and (folder / "key").read_text() == key and (out / "book" / "intro.html").is_file():
        return out
    shutil.rmtree(folder / "_build", ignore_errors=True)
    jb = shutil.which("jupyter-book", path=str(Path(sys.executable).parent)) or "jupyter-book"
    # Not -W: without `make book`'s vendored widget files html_extra_path is missing, a warning
    # that does not matter here (`make book` builds with -W).
    run = subprocess.run([jb, "build", str(ROOT), "--path-output", str(folder), "--keep-going"],
                         capture_output=True, text=True, timeout=1200, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (folder / "key").write_text(key)
    return out


def chapter_pages(html: Path) -> list:
    pages = sorted((html / "book").glob("*.html"))
    assert len(pages) >= 2, f"no pages built under {html}"
    return pages


BULK = re.compile(r"data:[a-z]+/[a-z0-9.+-]+;base64,[A-Za-z0-9+/=]+"  # embedded images
                  r"|(?<=<script type=\"application/vnd.jupyter.widget-state\+json\">).*?(?=</script>)", re.S)


@functools.lru_cache(maxsize=None)
def soup(page: Path) -> BeautifulSoup:
    # Parsing is the slow part: drop the megabytes of images and widget state first.
    return BeautifulSoup(BULK.sub("", page.read_text(encoding="utf-8")), "html.parser")


def launch_target(url: str) -> tuple:
    """(service, org/repo, branch, path in the repository) of a Binder or Colab launch link."""
    parts = urlsplit(url)
    if parts.netloc == "mybinder.org":
        _, _, _, org, repo, branch = parts.path.split("/", 5)  # /v2/gh/org/repo/branch
        urlpath = parse_qs(parts.query)["urlpath"][0]
        return "binder", f"{org}/{repo}", branch, urlpath.split("/", 1)[1]  # tree/<path>
    if parts.netloc == "colab.research.google.com":
        _, _, org, repo, _, branch, path = parts.path.split("/", 6)  # /github/org/repo/blob/branch/path
        return "colab", f"{org}/{repo}", branch, path
    raise ValueError(url)


def test_launch_links_open_the_page_s_own_notebook_in_the_repository(html):
    repo = urlsplit(CONFIG["repository"]["url"]).path.strip("/")
    notebooks = 0
    for page in chapter_pages(html):
        links = [a["href"] for a in soup(page).find_all("a", href=True)
                 if urlsplit(a["href"]).netloc in ("mybinder.org", "colab.research.google.com")]
        source = ROOT / "book" / (page.stem + ".ipynb")
        if not source.is_file():
            assert not links, f"{page.name} has launch links but no notebook"
            continue
        notebooks += 1
        services = Counter()
        for link in links:
            service, org_repo, branch, path = launch_target(link)
            services[service] += 1
            assert (org_repo, branch) == (repo, CONFIG["repository"]["branch"]), link
            assert (ROOT / path).is_file(), f"{page.name}: {link} names {path}, which is not in the repository"
            assert path == f"book/{source.name}", f"{page.name}: {link} opens {path}"
        assert services == {"binder": 1, "colab": 1}, f"{page.name}: launch links {links}"
    assert notebooks >= 2


def test_each_script_once_per_page(html):
    # Sphinx 7.4 added sphinx-thebe's `const THEBE_JS_URL = ...` twice: a SyntaxError in the browser.
    for page in [*chapter_pages(html), html / "search.html"]:
        scripts = [s.get("src") or s.get_text() for s in soup(page).find_all("script")
                   if s.get("type") in (None, "text/javascript")]
        repeated = [s[:80] for s, n in Counter(scripts).items() if n > 1]
        assert not repeated, f"{page.name} loads these scripts more than once: {repeated}"
        assert sum("THEBE_JS_URL" in s for s in scripts) <= 1


def test_one_search_box_per_page(html):
    for page in chapter_pages(html):
        boxes = soup(page).select(".search-button-field, form.bd-search")
        # the search dialog's form only opens from the box, it is not a second one
        boxes = [b for b in boxes if not b.find_parent(id="pst-search-dialog")]
        assert len(boxes) == 1, f"{page.name}: {len(boxes)} search boxes"


LABEL = re.compile(r"^[^,]+, (?:\d{4}|n\.d\.)[a-z]?$")  # "Ho et al., 2020", "Song et al., 2021b"


def _labels(page_soup) -> dict:
    """Citation id -> label text of the page's reference lists."""
    return {div["id"]: div.select_one("span.label").get_text().strip("[]")
            for div in page_soup.select("div.citation[id]")}


def test_citations_are_author_year_in_the_text_and_in_the_lists(html):
    cited = 0
    all_labels: dict = {}
    for page in chapter_pages(html):
        page_soup = soup(page)
        labels = _labels(page_soup)
        for label in labels.values():
            assert LABEL.match(label), f"{page.name}: reference list label {label!r} is not author-year"
            authors = label.rpartition(", ")[0]
            assert " " not in authors, f"{page.name}: {label!r} may break inside the authors"
        for cid, label in labels.items():
            entry = page_soup.find(id=cid).find("p").get_text()
            # one work, one label on every page
            assert all_labels.setdefault(entry, label) == label, f"{entry!r}: {label!r} vs {all_labels[entry]!r}"
        for span in page_soup.select("span.bibtex-citation"):
            text = span.get_text()
            # "(Ho et al., 2020)", "(Ho et al., 2020; Song et al., 2021b)", "Ho et al. (2020)" or
            # "Ho et al. (2020, eq. 6)"; {cite:alp}, inside the text's own parentheses, has none
            # of its own: "Ho et al., 2020" or "Ho et al., 2020; Song et al., 2021b"
            bare = all(LABEL.match(part) for part in text.split("; "))
            assert bare or (text.endswith(")") and re.search(r"(?:\d{4}|n\.d\.)[a-z]?[),;]", text)), \
                f"{page.name}: citation {text!r}"
            for a in span.find_all("a", href=True):
                if a["href"].startswith("#") and a["href"][1:] in labels:
                    label = labels[a["href"][1:]]
                    assert a.get_text() in (label, label.rpartition(", ")[2]), f"{page.name}: {a.get_text()!r} cites [{label}]"
                    cited += 1
    assert cited > 20, "too few citations resolved to their page's reference list"


def test_search_page_asks_for_no_excerpts_on_file_urls(html):
    # Browsers block the search page's fetch of each result's page from file:// (a CORS error
    # per result); there it shows results without excerpts (over http, with them).
    bodies = [s.get_text() for s in soup(html / "search.html").find_all("script")]
    assert any('location.protocol === "file:"' in b and "SHOW_SEARCH_SUMMARY = false" in b for b in bodies)
