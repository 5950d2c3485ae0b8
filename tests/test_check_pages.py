"""book/_ext/check_pages.py, which `make book` runs, sees what a reader's browser console shows.

Runs it on two small pages in headless Chromium; skipped where Chromium is not installed.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = next((shutil.which(c) for c in ("chromium", "chromium-browser", "google-chrome") if shutil.which(c)), None)

SEARCH = '<div class="bd-sidebar-primary"><button class="search-button-field">Search</button></div>'
CLEAN = f"<!doctype html><html><head><title>ok</title></head><body>{SEARCH}<p>fine</p></body></html>"
BROKEN = f"""<!doctype html><html><head><title>broken</title>
<script>const THEBE_JS_URL = "x";</script>
<script>const THEBE_JS_URL = "x";</script>
</head><body>{SEARCH}{SEARCH}<img src="missing.woff2.png">
<script>console.error("something broke");</script>
<div class="highlight"><pre style="width: 300px">{"x = 1  # " + "a long line " * 40}</pre></div>
<div class="highlight"><pre style="width: 300px">short = 1</pre></div></body></html>"""


def check(html: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "book" / "_ext" / "check_pages.py"), str(html), "--settle", "0.5"],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed")
def test_check_pages_reports_console_errors_failed_files_and_search_boxes(tmp_path):
    (tmp_path / "book").mkdir()
    (tmp_path / "book" / "good.html").write_text(CLEAN)
    (tmp_path / "book" / "bad.html").write_text(BROKEN)
    run = check(tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr
    bad = run.stdout.split("FAIL book/bad.html", 1)[1]
    assert "Identifier 'THEBE_JS_URL' has already been declared" in bad
    assert "console.error: something broke" in bad
    assert "failed to load book/missing.woff2.png" in bad
    assert "2 visible search boxes" in bad
    assert "1 of 2 code/output blocks scroll sideways at 1280 px" in bad and "x = 1  # a long line" in bad
    assert "ok   book/good.html: 0 errors" in run.stdout
    assert "2 pages opened" in run.stdout and "1 with errors" in run.stdout


def test_check_pages_without_chromium_passes_with_a_note(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "book" / "_ext" / "check_pages.py"), str(tmp_path), "--chromium", ""],
                         capture_output=True, text=True, timeout=60, env={"PATH": str(tmp_path)})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "skipped, no Chromium found" in run.stdout
