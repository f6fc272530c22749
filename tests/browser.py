"""Helpers for driving the dashboard in a real browser (headless Chromium through Playwright).

Used by ``tests/test_browser.py`` and ``scripts/bench_dashboard.py``. Widgets are found the way a
user finds them, by their labels (``get_by_role(..., name=label)``); nothing here depends on
Streamlit's CSS class names.

The dashboard server runs in its own process group; the training workers it launches run in
sessions of their own (``start_new_session``), so ``DashboardServer.stop`` ends them one by one,
by the pids the run store recorded (checked against ``/proc/<pid>/cmdline`` first).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path(os.environ.get("BENCH_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = ROOT / "artifacts" / "browser"


def missing_requirements() -> str | None:
    """Why the browser can't be driven here (None when it can)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright)"
    if not CHROMIUM.is_file() or not os.access(CHROMIUM, os.X_OK):
        return f"no chromium at {CHROMIUM} (apt-get install chromium)"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------- the server


class DashboardServer:
    """``streamlit run app.py`` on a free local port, with its data and run store in ``data_dir``."""

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        log_name: str = "server.log",
        env: dict | None = None,
        file_watcher: str | None = "none",
    ) -> None:
        """``file_watcher``: Streamlit's ``server.fileWatcherType`` ("none" in tests; None: Streamlit's default)."""
        self.data_dir = Path(data_dir)
        self.file_watcher = file_watcher
        self.extra_env = dict(env or {})
        self.store = self.data_dir / "runs.sqlite"
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.data_dir / log_name
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> DashboardServer:
        """Start the server and wait until it answers; a server already running is left as it is.

        So ``with DashboardServer(d).start() as srv`` (``__enter__`` starts too) runs one server,
        not a second one that ``stop`` would leave behind.
        """
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, BENCH_DATA_DIR=str(self.data_dir), BENCH_STORE=str(self.store), PYTHONUNBUFFERED="1")
        env.update(self.extra_env)
        cmd = [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            "app.py",
            "--server.headless",
            "true",
            "--server.port",
            str(self.port),
            "--server.address",
            "127.0.0.1",
            "--browser.gatherUsageStats",
            "false",
        ]
        if self.file_watcher:
            cmd += ["--server.fileWatcherType", self.file_watcher]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the dashboard server exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.healthy():
                return self
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"the dashboard server did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=2) as answer:
                return answer.read().decode().strip() == "ok"
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """End the server's process group, then every worker process of its run store."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        kill_workers(self.store)

    def __enter__(self) -> DashboardServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def worker_pids(store: Path) -> list[int]:
    """Pids of live ``bench_core worker`` processes of this run store.

    Taken from the store's pid column and from /proc, and kept only when the process's command
    line names both ``bench_core worker`` and this store file.
    """
    store = Path(store).resolve()
    candidates: set[int] = set()
    if store.exists():
        with contextlib.suppress(sqlite3.Error):
            conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5)
            try:
                candidates.update(int(pid) for (pid,) in conn.execute("SELECT pid FROM runs WHERE pid IS NOT NULL"))
            finally:
                conn.close()
    proc_root = Path("/proc")
    if proc_root.is_dir():
        candidates.update(int(p.name) for p in proc_root.iterdir() if p.name.isdigit())
    found = []
    for pid in sorted(candidates):
        cmd = _cmdline(pid)
        if "bench_core" in cmd and "worker" in cmd and str(store) in cmd and pid != os.getpid():
            found.append(pid)
    return found


def kill_workers(store: Path, grace: float = 5.0) -> list[int]:
    """SIGTERM every worker of ``store`` (by pid), then SIGKILL those still there after ``grace`` s."""
    pids = worker_pids(store)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(p in worker_pids(store) for p in pids):
        time.sleep(0.1)
    for pid in worker_pids(store):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return pids


# ----------------------------------------------------------------------------- the store


def store_rows(store: Path) -> list[dict]:
    """Every run of the store as (id, status, source, config, stop_requested), newest first; read-only."""
    import json

    if not Path(store).exists():
        return []
    conn = sqlite3.connect(f"file:{Path(store).resolve()}?mode=ro", uri=True, timeout=10)
    try:
        rows = conn.execute("SELECT id, status, source, config, stop_requested FROM runs ORDER BY id DESC").fetchall()
    finally:
        conn.close()
    return [
        {"id": i, "status": s, "source": src, "config": json.loads(c or "{}"), "stop_requested": bool(stop)}
        for i, s, src, c, stop in rows
    ]


def run_status(store: Path, run_id: int) -> str | None:
    return next((r["status"] for r in store_rows(store) if r["id"] == run_id), None)


def latest_run_id(store: Path) -> int | None:
    rows = store_rows(store)
    return rows[0]["id"] if rows else None


def wait_for(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.2, what: str = "a condition"
) -> Any:  # fmt: skip
    """Poll ``predicate`` until it returns something truthy; return that, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# ----------------------------------------------------------------------------- the browser


def launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)


def open_app(page, url: str, timeout: float = 60.0) -> None:
    """Load the dashboard and wait until the page's title heading is drawn."""
    page.goto(url, wait_until="domcontentloaded")
    page.locator('[data-testid="stSidebarNav"]').wait_for(timeout=timeout * 1000)
    page.get_by_role("heading", level=1).first.wait_for(timeout=timeout * 1000)


def nav_link(page, title: str):
    """The sidebar's link to the page titled ``title``."""
    return page.locator('[data-testid="stSidebarNav"] a').filter(has_text=title).first


def heading(page, text: str, level: int = 1):
    return page.get_by_role("heading", level=level, name=text).first


_H1_JS = """
() => Array.from(document.querySelectorAll('[data-testid="stMain"] h1'))
  .filter(el => !el.closest('[data-stale="true"]') && el.offsetParent !== null)
  .map(el => el.innerText.trim())
"""


def go_to(page, title: str, heading_text: str | None = None, timeout: float = 30.0) -> float:
    """Click the sidebar link to ``title``; return the seconds until the new page's title heading shows.

    "Shows" means a visible, current (not stale) h1 other than the one the old page had; with
    ``heading_text`` it must also contain that text.
    """
    link = nav_link(page, title)
    link.wait_for()
    before = page.evaluate(_H1_JS)
    start = time.perf_counter()
    link.click()
    page.wait_for_function(
        f"([before, want]) => ({_H1_JS.strip()})().some(t => !before.includes(t) && (!want || t.includes(want)))",
        arg=[before, heading_text or ""],
        timeout=timeout * 1000,
        polling="raf",
    )
    return time.perf_counter() - start


def slider(page, label: str):
    """A slider by its label (Streamlit 1.5x+: an ``input[type=range]``; older: a ``div[role=slider]``)."""
    css = f'input[type="range"][aria-label="{label}"], [role="slider"][aria-label="{label}"]'
    return page.locator(css).first


def slider_value(page, label: str) -> str:
    handle = slider(page, label)
    return handle.get_attribute("aria-valuetext") or handle.get_attribute("aria-valuenow") or handle.input_value()


def set_slider(page, label: str, value: int, minimum: int | None = None) -> None:
    """Move a slider with the keyboard: focus its thumb, Home, then ArrowRight up to ``value``."""
    handle = slider(page, label)
    handle.wait_for(state="attached")
    if minimum is None:
        minimum = int(float(handle.get_attribute("aria-valuemin") or handle.get_attribute("min") or 0))
    handle.focus()
    handle.press("Home")
    for _ in range(int(value) - minimum):
        handle.press("ArrowRight")
    page.wait_for_function(
        "([el, v]) => (el.getAttribute('aria-valuetext') || el.getAttribute('aria-valuenow') || el.value) == v",
        arg=[handle.element_handle(), str(value)],
        timeout=5000,
    )
    handle.blur()


def set_number(page, label: str, value: int | float) -> None:
    """Type into a number input and commit it (Enter)."""
    box = page.get_by_role("spinbutton", name=label, exact=True).first
    box.wait_for(state="visible")
    box.fill(str(value))
    box.press("Enter")
    page.wait_for_function(
        "([el, v]) => Number(el.value) == Number(v)", arg=[box.element_handle(), str(value)], timeout=5000
    )


def choose(page, label: str, option: str) -> None:
    """Pick ``option`` (its displayed text) in the select box labelled ``label``."""
    box = page.get_by_role("combobox", name=label, exact=True).first
    box.click()
    page.get_by_role("option", name=option, exact=True).first.click()
    page.wait_for_function("([el, v]) => el.value == v", arg=[box.element_handle(), option], timeout=5000)


def open_expander(page, label: str) -> None:
    summary = page.locator("summary").filter(has_text=label).first
    details = summary.locator("xpath=..")
    if details.get_attribute("open") is None:
        summary.click()


def wait_settled(page, timeout: float = 30.0) -> None:
    """Wait until Streamlit is not running a script (its "Running..." status widget is gone)."""
    with contextlib.suppress(Exception):
        page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden", timeout=timeout * 1000)


# Plotly figures in the page, read from plotly.js's own graph divs.
# Points are counted from plotly.js's computed traces (``_fullData[i]._length``), since the data may
# come as typed arrays ({dtype, bdata}) rather than lists. Stale elements (about to be replaced
# by a rerun) are left out.
_PLOTS_JS = """
() => Array.from(document.querySelectorAll('.js-plotly-plot'))
  .filter(el => !el.closest('[data-stale="true"]'))
  .map(el => {
    const t = el.layout && el.layout.title;
    const title = t ? (typeof t === 'string' ? t : (t.text || '')) : '';
    const full = el._fullData || [];
    const count = (tr, i) => {
      if (full[i] && Number.isFinite(full[i]._length)) return full[i]._length;
      if (Array.isArray(tr.x)) return tr.x.length;
      if (Array.isArray(tr.z)) return tr.z.length;
      return 0;
    };
    const data = el.data || [];
    return {
      title: title,
      traces: data.length,
      points: data.reduce((n, tr, i) => n + count(tr, i), 0),
      types: data.map(tr => tr.type || 'scatter'),
    };
  })
"""


def plots(page) -> list[dict]:
    """Every Plotly figure drawn: its title, number of traces and of x values, trace types."""
    return page.evaluate(_PLOTS_JS)


def plot(page, title_start: str) -> dict | None:
    return next((p for p in plots(page) if p["title"].startswith(title_start)), None)


def heatmaps(page) -> list[dict]:
    return [p for p in plots(page) if "heatmap" in p["types"]]


def scroll_to_plot(page, trace_type: str, above: int = 0) -> None:
    """Scroll the main area so the first figure with a ``trace_type`` trace is ``above`` px below the top."""
    page.evaluate(
        """([type, above]) => {
          const plot = Array.from(document.querySelectorAll('.js-plotly-plot'))
            .find(el => (el.data || []).some(tr => tr.type === type));
          if (!plot) return;
          plot.scrollIntoView({block: 'start'});
          let box = plot.parentElement;
          while (box && box.scrollHeight <= box.clientHeight + 1) box = box.parentElement;
          if (box) box.scrollTop -= above;
        }""",
        [trace_type, above],
    )
    page.wait_for_timeout(300)


def progress_text(page) -> str:
    bar = page.locator('[data-testid="stProgress"]')
    return bar.first.inner_text() if bar.count() else ""


def error_texts(page) -> list[str]:
    """Texts of error boxes and exceptions shown on the page."""
    boxes = page.locator('[data-testid="stException"], [data-testid="stAlertContentError"]')
    return [boxes.nth(i).inner_text() for i in range(boxes.count())]


# Streamlit scrolls its main area inside the page, so Playwright's full_page sees one screen only:
# the height of the tallest scrolling element is the page's real height.
_CONTENT_HEIGHT_JS = """
() => Math.max(document.documentElement.scrollHeight,
  ...Array.from(document.querySelectorAll('[data-testid="stMain"], [data-testid="stMain"] *'))
    .filter(el => el.scrollHeight > el.clientHeight + 1)
    .map(el => el.scrollHeight + el.getBoundingClientRect().top))
"""


def screenshot(page, name: str, full_page: bool = True, max_height: int = 6000) -> Path:
    """Save ``artifacts/browser/<name>.png``; ``full_page`` makes the viewport as tall as the content first."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    size = page.viewport_size
    height = int(page.evaluate(_CONTENT_HEIGHT_JS)) if full_page and size else 0
    if size and height > size["height"]:
        page.set_viewport_size({"width": size["width"], "height": min(height, max_height)})
        page.wait_for_timeout(800)  # let Plotly redraw at the new size
        try:
            page.screenshot(path=str(path))
        finally:
            page.set_viewport_size(size)
    else:
        page.screenshot(path=str(path))
    return path


def configure_run(
    page,
    *,
    ensemble_size: int,
    epochs: int,
    train: int,
    test: int,
    seed: int | None = None,
    points_per_epoch: int | None = None,
) -> None:
    """On the Train page: synthetic data of the given sizes, E and epochs (other settings as they are)."""
    choose(page, "Dataset", "synthetic")
    set_slider(page, "Ensemble size E (members)", ensemble_size)
    set_slider(page, "Epochs", epochs)
    open_expander(page, "Advanced settings")
    set_number(page, "Synthetic training examples", train)
    set_number(page, "Synthetic test examples", test)
    if seed is not None:
        set_number(page, "Seed", seed)
    if points_per_epoch is not None:
        set_number(page, "Loss points per epoch", points_per_epoch)
    wait_settled(page)


def tick_row(page, row: int) -> None:
    """Click the tick box of the Runs table's row ``row`` (0: the top one; the table is drawn on a canvas)."""
    box = page.locator('[data-testid="stDataFrame"]').first.bounding_box()
    page.mouse.click(box["x"] + 16, box["y"] + 36 + row * 35 + 17)  # the header row is 36 px, rows 35
    wait_settled(page)


def train_button(page):
    return page.get_by_role("button", name="Train", exact=False).filter(has_text="Train").first


def stop_button(page):
    return page.get_by_role("button").filter(has_text="Stop").first


def start_run(page, store: Path, timeout: float = 30.0) -> tuple[int, float]:
    """Press Train; return (the new run's id, time.perf_counter() at the click)."""
    before = latest_run_id(store) or 0
    button = train_button(page)
    button.wait_for(state="visible")
    clicked = time.perf_counter()
    button.click()
    run_id = wait_for(
        lambda: next((r["id"] for r in store_rows(store) if r["id"] > before), None), timeout, what="the run to appear"
    )
    return run_id, clicked


# What a widget change visibly answers with: the figures (titles, annotations, data) and the
# metrics of the page. The slider's own thumb label is left out: it moves before the server answers.
# While any of them is stale (a rerun under way, not yet redrawn) there is no answer yet: null.
_ANSWER_JS = """
() => {
  const hash = (text) => {
    let h = 0;
    for (let i = 0; i < text.length; i++) h = (h * 31 + text.charCodeAt(i)) | 0;
    return h;
  };
  const items = Array.from(document.querySelectorAll('.js-plotly-plot, [data-testid="stMetric"]'));
  if (items.some(el => el.closest('[data-stale="true"]'))) return null;
  return JSON.stringify(items.map(el => {
    if (!el.classList.contains('js-plotly-plot')) return el.innerText;
    const layout = el.layout || {};
    const title = layout.title ? (typeof layout.title === 'string' ? layout.title : (layout.title.text || '')) : '';
    const notes = (layout.annotations || []).map(a => a.text).join('|');
    return title + '#' + notes + '#' + hash(JSON.stringify(el.data || []));
  }));
}
"""


def answer_signature(page) -> str | None:
    return page.evaluate(_ANSWER_JS)


def wait_stable(page, quiet: float = 0.4, timeout: float = 30.0) -> str:
    """Wait until the page's figures and metrics stay the same for ``quiet`` seconds; return them."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        now = answer_signature(page)
        if now is None or now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return now
        time.sleep(0.05)
    raise TimeoutError(f"the page kept changing for {timeout:.0f} s")


def timed_slider_step(page, label: str, timeout: float = 30.0) -> float:
    """Move a slider one step right (from its minimum if it is at its maximum); return the seconds
    from the key press until the page's figures or metrics have changed in answer."""
    handle = slider(page, label)
    handle.wait_for(state="attached")
    maximum = int(float(handle.get_attribute("aria-valuemax") or handle.get_attribute("max") or 0))
    value = int(float(slider_value(page, label)))
    handle.focus()
    if value >= maximum:
        handle.press("Home")
        wait_settled(page)
        page.wait_for_timeout(300)
        handle.focus()
    before = wait_stable(page, timeout=timeout)
    start = time.perf_counter()
    handle.press("ArrowRight")
    page.wait_for_function(
        f"(before) => {{ const now = ({_ANSWER_JS.strip()})(); return now !== null && now !== before; }}",
        arg=before,
        timeout=timeout * 1000,
        polling="raf",
    )
    elapsed = time.perf_counter() - start
    wait_settled(page)
    return elapsed


def click_round(page) -> dict[str, float]:
    """Six clicks a user makes while a run trains, each timed from the click to the page's answer.

    Starts and ends on the Train page: sidebar to Learn (answer: its title heading), two steps
    of its "Member k" slider (the member's matrices are redrawn), one of "Ensemble size to mark" (the parameter
    chart and counts change), sidebar to Runs, sidebar back to Train (each: the page's heading).
    """
    latencies: dict[str, float] = {}
    latencies["sidebar: Learn"] = go_to(page, "Learn")
    wait_settled(page)
    for step in (1, 2):
        latencies[f"slider Member k (step {step})"] = timed_slider_step(page, "Member k")
    latencies["slider Ensemble size to mark"] = timed_slider_step(page, "Ensemble size to mark")
    latencies["sidebar: Runs"] = go_to(page, "Runs")
    wait_settled(page)
    latencies["sidebar: Train"] = go_to(page, "Train")
    return latencies
