"""``dvc plots show``'s page, opened in headless Chromium: every chart is drawn with its data
and every image loads, without the internet.

dvc-render's default page loads vega, vega-lite and vega-embed from a CDN, which CI (and
many users) cannot reach, so the charts would stay blank. The project ships
``.dvc/plots/template.html``, the same page with those libraries inlined, for
``dvc plots show --html-template``; this test renders with it.

Chromium is driven through the DevTools protocol over ``--remote-debugging-pipe`` (JSON
messages on file descriptors 3 and 4, so nothing beyond the standard library is needed).
Before the page loads, a small hook records what each ``vegaEmbed`` call resolved to; after
it, the test reads each chart's vega scenegraph (the marks vega drew, with their data) and
the canvas pixels, each ``<img>``'s decoded size, every network request and every script
error. A control run on a deliberately broken copy of the page shows that these checks do
catch a chart without data and an image that does not load.

Skipped, saying why, only where no Chromium is installed (CI installs Debian's).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO_ROOT, DvcRepo
from dvc_pipeline import (
    DeclaredPlot,
    Pipeline,
    bar_axes,
    datum_point,
    declared_plots,
    expected_bars,
    expected_confusion,
    expected_points,
    page_specs,
    plots_show,
)
from dvc_render.vega import VegaRenderer
from PIL import Image

TEMPLATE = REPO_ROOT / ".dvc" / "plots" / "template.html"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
PAGE_TIMEOUT = 30.0

#: Runs before the page's scripts: wraps vegaEmbed (when the inlined library defines it) to
#: record, per chart, its title, the vega View it produced or the error it failed with.
HOOK = r"""
window.__embeds = [];
Object.defineProperty(window, 'vegaEmbed', {configurable: true,
  get() { return this.__vegaEmbed; },
  set(embed) {
    this.__vegaEmbed = (el, spec, options) => {
      const title = spec && spec.title ? (spec.title.text || spec.title) : null;
      const record = {el: String(el), title: title, view: null, error: null};
      window.__embeds.push(record);
      return embed(el, spec, options).then(
        result => { record.view = result.view; return result; },
        error => { record.error = String(error); throw error; });
    };
  }});
"""

#: What the page shows, as plain JSON.
REPORT = r"""
(() => {
  const dataOf = (view, marktype) => {
    const found = [];
    const walk = mark => {
      if (!mark || !mark.items) return;
      if (mark.marktype === marktype && mark.role === 'mark') mark.items.forEach(item => found.push(item.datum));
      mark.items.forEach(item => (item.items || []).forEach(walk));
    };
    walk(view.scenegraph().root);
    return found;
  };
  const ink = el => {
    const canvas = el && el.querySelector('canvas');
    if (!canvas || !canvas.width || !canvas.height) return 0;
    const px = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    let count = 0;
    for (let i = 0; i < px.length; i += 4) {
      if (px[i + 3] > 0 && (px[i] < 230 || px[i + 1] < 230 || px[i + 2] < 230)) count++;
    }
    return count;
  };
  const linesOf = view => {  // each drawn line (one line mark of a facet) and its points
    const found = [];
    const walk = mark => {
      if (!mark || !mark.items) return;
      if (mark.marktype === 'line' && mark.role === 'mark') found.push(mark.items.map(item => item.datum));
      mark.items.forEach(item => (item.items || []).forEach(walk));
    };
    walk(view.scenegraph().root);
    return found;
  };
  const legendsOf = view => {  // what each legend reads: its title and its labels
    const found = [];
    const texts = (mark, role, out) => {
      if (!mark || !mark.items) return;
      if (mark.role === role) mark.items.forEach(item => out.push(item.text));
      mark.items.forEach(item => (item.items || []).forEach(child => texts(child, role, out)));
    };
    const walk = mark => {
      if (!mark || !mark.items) return;
      if (mark.role === 'legend') {
        mark.items.forEach(legend => {
          const title = [], labels = [];
          (legend.items || []).forEach(child => {
            texts(child, 'legend-title', title);
            texts(child, 'legend-label', labels);
          });
          found.push({title: title.join(' '), labels: labels});
        });
        return;
      }
      mark.items.forEach(item => (item.items || []).forEach(walk));
    };
    walk(view.scenegraph().root);
    return found;
  };
  const embeds = window.__embeds || [];
  return {
    loaded: document.readyState === 'complete',
    charts: embeds.map(r => {
      const el = document.querySelector(r.el);
      return {
        title: r.title, error: r.error, settled: !!(r.view || r.error),
        embedded: !!el && el.classList.contains('vega-embed'),
        ink: r.view ? ink(el) : 0,
        lines: r.view ? dataOf(r.view, 'line') : [],
        rects: r.view ? dataOf(r.view, 'rect') : [],
        drawn: r.view ? linesOf(r.view) : [],
        legends: r.view ? legendsOf(r.view) : [],
      };
    }),
    images: [...document.images].map(img => ({
      src: img.getAttribute('src'), complete: img.complete,
      width: img.naturalWidth, height: img.naturalHeight,
    })),
  };
})()
"""


def find_chromium() -> str | None:
    """``$CHROMIUM``, or a Chromium/Chrome on PATH."""
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


class DevTools:
    """Headless Chromium and a minimal DevTools-protocol client over its debugging pipe:
    commands go in on the browser's fd 3 and answers and events come out on its fd 4,
    each one JSON message ended by a NUL byte."""

    def __init__(self, executable: str, profile: Path) -> None:
        to_browser, self._commands = os.pipe()
        self._answers, from_browser = os.pipe()
        # Move the browser's ends above 4, so that putting them on 3 and 4 clobbers neither.
        to_browser, from_browser = (self._above_four(fd) for fd in (to_browser, from_browser))
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
                 "--window-size=1280,1600", f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"]
        # A tiny launcher puts the pipe ends on fds 3 and 4, where Chromium expects them.
        launcher = "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); " \
                   "os.execv(sys.argv[3], sys.argv[3:])"
        self.process = subprocess.Popen(
            [sys.executable, "-c", launcher, str(to_browser), str(from_browser), executable, *flags],
            pass_fds=(to_browser, from_browser),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self._buffer = b""
        self._last_id = 0
        self.events: list[dict[str, Any]] = []

    @staticmethod
    def _above_four(fd: int) -> int:
        moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
        os.close(fd)
        return moved

    def _next_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("Chromium did not answer in time")
            if select.select([self._answers], [], [], left)[0]:
                chunk = os.read(self._answers, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"Chromium closed its pipe (exit code {self.process.poll()})")
                self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float = 20.0) -> dict[str, Any]:
        """Send one command and wait for its answer; events that arrive meanwhile are kept."""
        self._last_id += 1
        message: dict[str, Any] = {"id": self._last_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            answer = self._next_message(deadline)
            if answer.get("id") == self._last_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer.get("result", {})
            self.events.append(answer)

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError, TimeoutError):
            self.send("Browser.close", timeout=5)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._commands)
        os.close(self._answers)


@dataclass
class Rendered:
    """What a page showed once every chart had settled (or the time ran out)."""

    report: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)
    screenshot: Path | None = None

    def events_named(self, method: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("method") == method]

    @property
    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events_named("Network.requestWillBeSent")]

    @property
    def failed_loads(self) -> list[str]:
        """URLs of requests that failed (a missing file, a refused connection)."""
        urls = {e["params"]["requestId"]: e["params"]["request"]["url"]
                for e in self.events_named("Network.requestWillBeSent")}
        return [urls.get(e["params"]["requestId"], "?") for e in self.events_named("Network.loadingFailed")]

    @property
    def errors(self) -> list[str]:
        """Uncaught script errors and console.error calls."""
        found = [json.dumps(e["params"]["exceptionDetails"])[:500]
                 for e in self.events_named("Runtime.exceptionThrown")]
        found += [json.dumps(e["params"]["args"])[:500] for e in self.events_named("Runtime.consoleAPICalled")
                  if e["params"].get("type") == "error"]
        return found


def render(browser: DevTools, page: Path, screenshot: Path) -> Rendered:
    """Open ``page`` in a new tab, wait until each of its charts settles (drawn or failed)
    and its images load, and report (see :data:`REPORT`); a screenshot is saved to look at
    when a check fails."""
    charts = page.read_text(encoding="utf-8").count("vegaEmbed('#")
    target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    first_event = len(browser.events)
    for domain in ("Page", "Runtime", "Network"):
        browser.send(f"{domain}.enable", session=session)
    browser.send("Page.addScriptToEvaluateOnNewDocument", {"source": HOOK}, session=session)
    browser.send("Page.navigate", {"url": page.as_uri()}, session=session)
    deadline = time.monotonic() + PAGE_TIMEOUT
    while True:
        report = browser.send("Runtime.evaluate", {"expression": REPORT, "returnByValue": True},
                              session=session)["result"]["value"]
        done = (report["loaded"] and len(report["charts"]) == charts
                and all(c["settled"] for c in report["charts"]) and all(i["complete"] for i in report["images"]))
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    shot = browser.send("Page.captureScreenshot", {"captureBeyondViewport": True}, session=session)
    screenshot.write_bytes(base64.b64decode(shot["data"]))
    events = [e for e in browser.events[first_event:] if e.get("sessionId") == session]
    browser.send("Target.closeTarget", {"targetId": target})
    return Rendered(report, events, screenshot)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevTools]:
    """One headless Chromium for this module's pages; skip, saying why, if there is none."""
    executable = find_chromium()
    if executable is None:
        pytest.skip("no Chromium to render the plots page with: install Debian's `chromium` package "
                    "(or set $CHROMIUM to a Chrome/Chromium executable)")
    devtools = DevTools(executable, tmp_path_factory.mktemp("chromium-profile"))
    try:
        devtools.send("Browser.getVersion", timeout=60)  # the first start can be slow
        yield devtools
    finally:
        devtools.close()


def offline_page(repo: DvcRepo, out: Path) -> Path:
    """``dvc plots show`` with the project's offline template; the page's path."""
    plots_show(repo, out, "--html-template", str(repo.root / TEMPLATE.relative_to(REPO_ROOT)))
    return out / "index.html"


def test_template_makes_the_page_self_contained(pipeline: Pipeline, tmp_path: Path) -> None:
    """dvc-render's own page links the libraries on a CDN (why the template exists); with
    the template the page holds them, of the same major versions, and links no script."""
    linked = dict(re.findall(r'cdn\.jsdelivr\.net/npm/([a-z-]+)@(\d+)\.', VegaRenderer.SCRIPTS))
    assert sorted(linked) == ["vega", "vega-embed", "vega-lite"]
    template = TEMPLATE.read_text(encoding="utf-8")
    assert "{plot_divs}" in template and "{scripts}" not in template
    assert '<meta charset="utf-8">' in template  # the minified libraries are not all ASCII
    inlined = dict(re.findall(r"\b(vega|vega-lite|vega-embed) (\d+)\.\d+\.\d+", template.split("<script>")[0]))
    assert inlined == linked

    html = offline_page(pipeline.repo, tmp_path / "offline").read_text(encoding="utf-8")
    assert "<script src" not in html and "cdn.jsdelivr" not in html
    assert html.count("vegaEmbed('#") == sum(not p.is_image for p in declared_plots(pipeline.repo.root))


def test_charts_and_images_render_offline(pipeline: Pipeline, browser: DevTools, tmp_path: Path) -> None:
    """Every declared chart (dvc.yaml's top-level and stage-level plots) is drawn by vega with
    exactly its CSV data (each history point, each confusion-matrix cell count, each per-class
    bar), every image decodes at its file's size, no script fails, and nothing but the page's
    own files is requested."""
    root = pipeline.repo.root
    page = offline_page(pipeline.repo, tmp_path / "out")
    shown = render(browser, page, tmp_path / "screenshot.png")
    report, where = shown.report, f"(screenshot: {shown.screenshot})"

    assert shown.errors == [], where
    assert shown.requests and all(url.startswith(("file:", "data:")) for url in shown.requests), shown.requests
    assert shown.failed_loads == [], where

    plots = declared_plots(root)
    charts = {c["title"]: c for c in report["charts"]}
    assert len(charts) == len(report["charts"]), "two charts with one title"
    assert set(charts) == {p.title for p in plots if not p.is_image}, where
    for plot in plots:
        if plot.is_image:
            continue
        assert plot.props is not None
        chart = charts[plot.title]
        assert chart["error"] is None and chart["embedded"], (plot.id, chart["error"], where)
        assert chart["ink"] > 500, f"{plot.id}: nothing painted on the canvas {where}"
        if plot.template == "confusion":
            x = plot.props["x"]
            ((_, y),) = plot.series()
            cells = {(d[x], d[y]): d["xy_count"] for d in chart["rects"] if not d.get("_impute")}
            assert cells == expected_confusion(plot, root), f"{plot.id} {where}"
        elif plot.template.startswith("bar"):
            category, value = bar_axes(plot)
            bars = {d[category]: float(d[value]) for d in chart["rects"]}
            assert len(chart["rects"]) == len(bars), f"{plot.id}: one bar per category {where}"
            assert bars == expected_bars(plot, root), f"{plot.id} {where}"
        else:
            points = {p for p in (datum_point(d, plot) for d in chart["lines"]) if p is not None}
            assert points == expected_points(plot, root), f"{plot.id} {where}"
            if plot.stage is None:  # the top-level charts: every strategy in one
                assert_one_line_per_series(plot, chart, {"workspace"}, where)

    images = {Path(i["src"]).name: i for i in report["images"]}
    declared_images = [p.id for p in plots if p.is_image]
    assert len(images) == len(declared_images), report["images"]
    for png in declared_images:
        img = images["workspace_" + png.replace("/", "_")]
        with Image.open(root / png) as picture:
            size = picture.size
        assert img["complete"] and (img["width"], img["height"]) == size, (png, img, where)


def assert_one_line_per_series(plot: DeclaredPlot, chart: dict[str, Any], revisions: set[str], where: str) -> None:
    """Each drawn line is the points of one file (one strategy) of one revision, and every file
    of every revision is one line; the legends name only the real strategies and revisions."""
    series = {(path.split("/")[1], rev) for path, _ in plot.series() for rev in revisions}
    drawn = []
    for line in chart["drawn"]:
        files = {datum_point(d, plot)[0] for d in line if datum_point(d, plot) is not None}  # type: ignore[index]
        revs = {d.get("rev") for d in line}
        assert len(files) == 1 and len(revs) == 1, f"{plot.id}: a line through {files} of {revs} {where}"
        drawn.append((files.pop().split("/")[1], revs.pop()))
    assert sorted(drawn) == sorted(series), f"{plot.id} {where}"
    legends = {legend["title"]: sorted(legend["labels"]) for legend in chart["legends"]}
    assert legends == {"strategy": sorted({s for s, _ in series}), "revision": sorted(revisions)}, \
        f"{plot.id}: {legends} {where}"


def test_a_diff_of_two_revisions_draws_each_strategy_of_each(pipeline: Pipeline, browser: DevTools,
                                                             tmp_path: Path) -> None:
    """``dvc plots diff HEAD`` (the committed run and the workspace): every top-level chart
    draws one line per strategy and revision, and its legends name just those."""
    root = pipeline.repo.root
    pipeline.repo.dvc("plots", "diff", "HEAD", "-o", str(tmp_path / "diff"), "--html-template",
                      str(root / TEMPLATE.relative_to(REPO_ROOT)))
    shown = render(browser, tmp_path / "diff" / "index.html", tmp_path / "screenshot.png")
    charts = {c["title"]: c for c in shown.report["charts"]}
    top = [p for p in declared_plots(root) if p.stage is None]
    assert top and shown.errors == []
    for plot in top:
        assert_one_line_per_series(plot, charts[plot.title], {"workspace", "HEAD"},
                                   f"(screenshot: {shown.screenshot})")


def test_checks_catch_a_broken_page(pipeline: Pipeline, browser: DevTools, tmp_path: Path) -> None:
    """Control: on a copy of the page with one chart's data emptied and one image deleted,
    the same checks see the chart without data and the image that did not load."""
    page = offline_page(pipeline.repo, tmp_path / "out")
    html = page.read_text(encoding="utf-8")
    specs = page_specs(html)
    confusion = next(p for p in declared_plots(pipeline.repo.root) if p.props and p.template == "confusion")
    values = json.dumps(specs[confusion.title]["data"]["values"])
    assert html.count(values) == 1
    page.write_text(html.replace(values, "[]"), encoding="utf-8")
    missing = next((tmp_path / "out" / "static").glob("*.png"))
    missing.unlink()

    shown = render(browser, page, tmp_path / "screenshot.png")
    charts = {c["title"]: c for c in shown.report["charts"]}
    assert [d for d in charts[confusion.title]["rects"] if not d.get("_impute")] == []
    broken = [i for i in shown.report["images"] if i["width"] == 0]
    assert [Path(i["src"]).name for i in broken] == [missing.name]
    assert [Path(url).name for url in shown.failed_loads] == [missing.name]
