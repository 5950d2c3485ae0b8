"""Open every page of the rendered book in headless Chromium and report what a reader's browser
console would show: uncaught exceptions, console errors, files that failed to load. Also checks
that a page shows one search box, that its stored widgets rendered, that no code or output
block scrolls sideways in a 1280-px window, and that a search finds something.

    python tools/check_pages.py [_build/html] [--screenshots DIR]

Talks to Chromium over the DevTools protocol on a pipe (--remote-debugging-pipe), so it needs
nothing but the standard library. Exit status 1 if any page has an error, 0 otherwise; where
Chromium is not installed it prints a note and exits 0 (CI machines may not have it).
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHROMIUMS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# Evaluated in the page once it has settled: what the reader sees.
PAGE_FACTS = """(() => {
  const visible = (e) => !!(e.offsetWidth || e.offsetHeight || e.getClientRects().length);
  // the search page's own form, in the main column, is not a second search box
  const search = [...document.querySelectorAll('.search-button-field, form.bd-search')]
    .filter((e) => visible(e) && !e.closest('.bd-main'));
  const views = document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]');
  const rendered = [...document.querySelectorAll('.widget-subarea')].filter((e) => e.children.length > 0);
  const results = document.querySelectorAll('#search-results li').length;
  // code and printed output that scroll sideways in the article column (a 1280-px window)
  const blocks = [...document.querySelectorAll('div.highlight pre, div.cell_output pre, div.output pre')]
    .filter(visible);
  const wide = blocks.filter((p) => p.scrollWidth > p.clientWidth + 1).map((p) =>
    `${p.scrollWidth - p.clientWidth} px: ` +
    p.textContent.split('\\n').reduce((a, b) => (a.length >= b.length ? a : b)).trim().slice(0, 50));
  return JSON.stringify({search_boxes: search.length, widget_views: views.length,
                         widgets_rendered: rendered.length, search_results: results,
                         code_blocks: blocks.length, wide_blocks: wide});
})()"""


class Browser:
    """Headless Chromium driven over --remote-debugging-pipe (fd 3: commands in, fd 4: out)."""

    def __init__(self, executable: str, profile: str):
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        # The child's ends, moved above fd 9 so that putting them at 3 and 4 cannot clobber them.
        high_r = fcntl.fcntl(to_child_r, fcntl.F_DUPFD_CLOEXEC, 10)
        high_w = fcntl.fcntl(from_child_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_child_r)
        os.close(from_child_w)

        def child_fds():
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        self.proc = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-extensions", "--hide-scrollbars", "--mute-audio",
             f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=child_fds, pass_fds=(3, 4),
        )
        os.close(high_r)
        os.close(high_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list = []

    def _read_message(self, deadline: float) -> dict | None:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                return None
            ready, _, _ = select.select([self._from_child], [], [], max(0.0, min(0.2, deadline - time.monotonic())))
            if ready:
                chunk = os.read(self._from_child, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe")
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30.0) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply is None:
                raise TimeoutError(f"no reply to {method} within {timeout} s")
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def pump(self, seconds: float) -> None:
        """Collect events for up to ``seconds``."""
        deadline = time.monotonic() + seconds
        while True:
            message = self._read_message(deadline)
            if message is None:
                return
            if "method" in message:
                self.events.append(message)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_child)
        os.close(self._from_child)


def _location(url: str | None, line: int | None, root: Path) -> str:
    if not url:
        return ""
    short = url.replace(root.resolve().as_uri() + "/", "")
    return f" ({short}:{line + 1})" if line is not None else f" ({short})"


def check_page(browser: Browser, url: str, root: Path, settle: float, timeout: float, screenshot: Path | None):
    """Load one page; return (errors, warnings, facts)."""
    target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Runtime", "Log", "Network", "Page"):
        browser.send(f"{domain}.enable", session=session)
    browser.send("Emulation.setDeviceMetricsOverride",
                 {"width": 1280, "height": 1600, "deviceScaleFactor": 1, "mobile": False}, session=session)
    browser.events.clear()
    browser.send("Page.navigate", {"url": url}, session=session)

    # Wait for the load event, then until nothing new has happened for `settle` seconds (the
    # widget manager renders on load and MathJax typesets after it).
    start = time.monotonic()
    loaded = False
    seen = 0
    quiet_since = time.monotonic()
    while time.monotonic() - start < timeout:
        browser.pump(0.25)
        mine = [e for e in browser.events if e.get("sessionId") == session]
        if any(e["method"] == "Page.loadEventFired" for e in mine):
            loaded = True
        if len(mine) != seen:
            seen, quiet_since = len(mine), time.monotonic()
        if loaded and time.monotonic() - quiet_since >= settle:
            break

    errors: list[str] = []
    warnings: list[str] = []
    if not loaded:
        errors.append(f"no load event within {timeout:.0f} s")
    for event in (e for e in browser.events if e.get("sessionId") == session):
        method, p = event["method"], event.get("params", {})
        if method == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            text = d.get("exception", {}).get("description") or d.get("text", "")
            errors.append("uncaught: " + text.splitlines()[0] + _location(d.get("url"), d.get("lineNumber"), root))
        elif method == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert", "warning"):
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            frame = (p.get("stackTrace", {}).get("callFrames") or [{}])[0]
            line = f"console.{p['type']}: {text}" + _location(frame.get("url"), frame.get("lineNumber"), root)
            (warnings if p["type"] == "warning" else errors).append(line)
        elif method == "Log.entryAdded" and p["entry"]["level"] in ("error", "warning"):
            entry = p["entry"]
            if entry.get("source") == "network":
                continue  # reported once, with the file, by Network.loadingFailed below
            line = f"{entry['source']} {entry['level']}: {entry['text']}" + _location(entry.get("url"), entry.get("lineNumber"), root)
            (errors if entry["level"] == "error" else warnings).append(line)
        elif method == "Network.loadingFailed" and not p.get("canceled"):
            request = next((e["params"]["request"]["url"] for e in browser.events
                            if e.get("sessionId") == session and e["method"] == "Network.requestWillBeSent"
                            and e["params"]["requestId"] == p["requestId"]), p["requestId"])
            errors.append(f"failed to load {_location(request, None, root).strip(' ()')}: {p.get('errorText')}")
        elif (method == "Network.responseReceived" and p["response"].get("status", 200) >= 400
              and not p["response"]["url"].endswith("/favicon.ico")):  # the browser's own request
            errors.append(f"HTTP {p['response']['status']} for {p['response']['url']}")

    facts = json.loads(browser.send("Runtime.evaluate", {"expression": PAGE_FACTS, "returnByValue": True},
                                    session=session)["result"]["value"])
    if facts["search_boxes"] != 1:
        errors.append(f"{facts['search_boxes']} visible search boxes (one expected)")
    if facts["widgets_rendered"] < facts["widget_views"]:
        errors.append(f"{facts['widgets_rendered']} of {facts['widget_views']} stored widgets rendered")
    if facts["wide_blocks"]:
        errors.append(f"{len(facts['wide_blocks'])} of {facts['code_blocks']} code/output blocks scroll sideways "
                      f"at 1280 px, e.g. " + "; ".join(facts["wide_blocks"][:3]))
    if screenshot is not None:
        data = browser.send("Page.captureScreenshot", {"format": "png"}, session=session)["data"]
        screenshot.write_bytes(base64.b64decode(data))
    browser.send("Target.closeTarget", {"targetId": target})
    browser.events.clear()
    return errors, warnings, facts


def pages(html: Path) -> list[Path]:
    """Every page a reader can open: the chapters, the intro, search and index pages (not the
    root index.html, which only redirects to the intro)."""
    found = [p for p in sorted(html.rglob("*.html"))
             if not p.relative_to(html).parts[0].startswith("_") and p != html / "index.html"]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", nargs="?", default="_build/html", type=Path, help="the built HTML (default: _build/html)")
    parser.add_argument("--screenshots", type=Path, help="write a 1280x1600 PNG of each page's top here")
    parser.add_argument("--chromium", help="the browser executable (default: the first of %s on PATH)" % ", ".join(CHROMIUMS))
    parser.add_argument("--search", default="score", help="a word to search for on the search page (default: score)")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds without new events after load (default 2)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per page at most (default 60)")
    args = parser.parse_args(argv)

    executable = args.chromium or next((shutil.which(c) for c in CHROMIUMS if shutil.which(c)), None)
    if not executable:
        print("check-pages: skipped, no Chromium found (on Debian: apt-get install chromium); "
              "the rendered pages were not opened in a browser.")
        return 0
    if not (args.html / "book").is_dir():
        print(f"check-pages: {args.html} holds no built book; run `make book` first.")
        return 1
    if args.screenshots:
        args.screenshots.mkdir(parents=True, exist_ok=True)

    failed = 0
    todo = [(p.relative_to(args.html).as_posix(), p.resolve().as_uri()) for p in pages(args.html)]
    if (args.html / "search.html").is_file():  # and a search, as a reader makes one from the box
        todo.append((f"search.html?q={args.search}", (args.html / "search.html").resolve().as_uri() + f"?q={args.search}"))
    with tempfile.TemporaryDirectory(prefix="check-pages-", ignore_cleanup_errors=True) as profile:
        browser = Browser(executable, profile)
        try:
            for name, url in todo:
                shot = args.screenshots / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name.replace(".html", "")) + ".png") if args.screenshots else None
                errors, warnings, facts = check_page(browser, url, args.html, args.settle, args.timeout, shot)
                if "?q=" in name and not facts["search_results"]:
                    errors.append("the search found nothing")
                extra = f", {facts['widgets_rendered']}/{facts['widget_views']} widgets rendered" if facts["widget_views"] else ""
                if "?q=" in name:
                    extra += f", {facts['search_results']} results"
                print(f"{'FAIL' if errors else 'ok  '} {name}: {len(errors)} errors, {len(warnings)} warnings{extra}")
                for line in errors:
                    print(f"       error   {line}")
                for line in warnings:
                    print(f"       warning {line}")
                failed += bool(errors)
        finally:
            browser.close()
    print(f"check-pages: {len(todo)} pages opened in {Path(executable).name}, {failed} with errors")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
