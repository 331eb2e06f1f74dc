"""The HTML report in a real headless browser (Debian's chromium, driven over the DevTools protocol): the page
renders, its three charts are there and drawn, and the console stays free of errors, opened from a file and
inside a frame as the Airflow tab shows it (a page on 127.0.0.1 that frames the report)."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_report import QUEUE_WITH_TENANTS, sample_report

from batchplan.app.report import Report, sections, write_report
from batchplan.core.storage import Storage

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed here (apt-get install -y chromium; .ci/run installs it)"
)

# Without the background-networking flags chromium keeps dialling out of this closed network (STACK.md).
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
    "--window-size=1400,2400",
]

# What the page says about itself, read through the DOM (the report's own document, or the framed one).
DOM_PROBE = """JSON.stringify((() => {
  const frame = document.querySelector('iframe');
  const doc = frame ? frame.contentDocument : document;
  const charts = [...doc.querySelectorAll('figure > svg')];
  return {
    framed: !!frame,
    svgs: doc.querySelectorAll('svg').length,
    titles: charts.map(s => s.querySelector(':scope > title').textContent),
    captions: [...doc.querySelectorAll('figcaption')].map(c => c.textContent),
    sizes: charts.map(s => { const r = s.getBoundingClientRect(); return [r.width, r.height]; }),
    marks: charts.map(s => s.querySelectorAll('path, use').length),
    sections: [...doc.querySelectorAll('h2')].map(h => h.textContent),
  };
})())"""


class Chromium:
    """One headless chromium; ``load`` opens a URL in its page and returns the DOM probe and every console
    error, uncaught exception and error-level log entry (failed loads, blocked content) seen meanwhile."""

    def __init__(self, profile: Path) -> None:
        assert CHROMIUM is not None
        self.process = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        self.port = int(port_file.read_text().split()[0])
        self._id = 0

    def _page_socket(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=10) as response:
            targets = json.load(response)
        return str(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"])

    def load(self, url: str, timeout: float = 60.0) -> tuple[dict[str, Any], list[str]]:
        from websockets.sync.client import connect

        errors: list[str] = []
        with connect(self._page_socket(), max_size=None, open_timeout=10) as ws:

            def call(method: str, **params: Any) -> dict[str, Any]:
                self._id += 1
                ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
                while True:
                    message = json.loads(ws.recv(timeout=timeout))
                    if message.get("id") == self._id:
                        return dict(message.get("result", {}))
                    collect(message)

            def collect(message: dict[str, Any]) -> None:
                method, params = message.get("method"), message.get("params", {})
                if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                    errors.append(
                        "console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
                    )
                elif method == "Runtime.exceptionThrown":
                    errors.append("exception: " + json.dumps(params["exceptionDetails"])[:500])
                elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                    errors.append("log: " + params["entry"]["text"])
                elif method == "Page.loadEventFired":
                    loaded.set()

            loaded = threading.Event()
            for domain in ("Runtime", "Log", "Page"):
                call(f"{domain}.enable")
            call("Page.navigate", url=url)
            deadline = time.monotonic() + timeout
            while not loaded.is_set():
                collect(json.loads(ws.recv(timeout=max(deadline - time.monotonic(), 0.1))))
            result = call("Runtime.evaluate", expression=DOM_PROBE, returnByValue=True)
        return json.loads(result["result"]["value"]), errors

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    browser = Chromium(tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield browser
    finally:
        browser.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on 127.0.0.1 over a folder: (base URL, folder)."""
    root = tmp_path_factory.mktemp("site")
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


FRONTIER = [
    {"budget_usd": b, "planned_cost_usd": min(b, 11.0), "planned_accuracy": a, "deferred": d, "gap": 0.0}
    for b, a, d in [(0.5, 0.0, 2), (1.0, 0.45, 1), (5.0, 0.45, 1), (11.0, 0.85, 0), (20.0, 0.85, 0)]
]
CHART_TITLES = [
    "Cost against accuracy: the frontier, this run and the baselines",
    "Planned against realized accuracy per task",
    "Spend per model",
]


def _report() -> Report:
    return sample_report(queue=QUEUE_WITH_TENANTS, run_id="browser", frontier=FRONTIER)


def _check(probe: dict[str, Any], errors: list[str], report: Report) -> None:
    assert errors == []
    assert probe["svgs"] == 3
    assert probe["titles"] == CHART_TITLES
    assert probe["captions"] == CHART_TITLES
    assert all(w > 300 and h > 100 for w, h in probe["sizes"]), probe["sizes"]  # laid out, not collapsed
    assert all(marks > 5 for marks in probe["marks"]), probe["marks"]  # something is drawn in each
    assert probe["sections"] == [s.title for s in sections(report)]


def test_report_renders_from_a_file(chromium: Chromium, tmp_path: Path) -> None:
    report = _report()
    paths = write_report(report, str(tmp_path), Storage())
    probe, errors = chromium.load(Path(paths["html"]).as_uri())
    assert not probe["framed"]
    _check(probe, errors, report)


def test_report_renders_framed_like_the_airflow_tab(chromium: Chromium, served: tuple[str, Path]) -> None:
    base, root = served
    report = _report()
    write_report(report, str(root / "reports"), Storage())
    (root / "run.html").write_text(
        "<!doctype html><html><body><h1>DAG run</h1>"
        "<iframe src='/reports/report.html' style='width:1300px;height:2200px'></iframe></body></html>"
    )
    probe, errors = chromium.load(f"{base}/run.html")
    assert probe["framed"]
    _check(probe, errors, report)


def test_the_console_check_sees_errors(chromium: Chromium, served: tuple[str, Path]) -> None:
    """The error collection is not vacuous: a console error and a missing image are both caught."""
    base, root = served
    (root / "broken.html").write_text(
        "<!doctype html><html><body><img src='/missing.png'><script>console.error('boom')</script></body></html>"
    )
    _, errors = chromium.load(f"{base}/broken.html")
    assert any("boom" in e for e in errors), errors
    assert any("404" in e or "missing" in e for e in errors), errors
