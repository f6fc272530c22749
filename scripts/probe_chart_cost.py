"""What does a live chart cost the browser? CPU of headless Chromium per fragment rerun, by what it re-sends.

On a 2-core machine every CPU-second the browser spends while a run trains is taken from the
training worker, so the Train page's live view was designed from these numbers. The script writes
a small Streamlit app into a temporary folder whose fragment reruns every ``--every`` seconds and
re-sends, depending on the mode:

- ``text``: one changed line of text (the cost of a fragment rerun itself);
- ``same``: the Train page's live figure, unchanged;
- ``apart``: a changed loss figure and a changed speed figure (two panels), as two charts;
- ``combined``: the same data as one changed three-panel figure (``pages._common.live_figure``);
- ``first``: nothing for 12 s, then the live figure for the first time on a page without any
  chart before (the browser loads its Plotly code then); ``first-preloaded``: the same on a page
  that already shows the empty loss figure.

It opens the app in headless Chromium at 1280x720 and reads the browser's and the server's CPU
time from /proc over ``--seconds``. Usage::

    python scripts/probe_chart_cost.py                    # every mode, 20 s each (~4 min)
    python scripts/probe_chart_cost.py --modes text combined --seconds 30

Needs Playwright and Debian's chromium (as the browser tests do); Linux only. Numbers vary
with the machine's load: run it alone, and compare modes of one run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import browser as ui  # noqa: E402  (tests/browser.py: the browser helpers the tests use)

MODES = ("text", "same", "apart", "combined", "first", "first-preloaded")

APP = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {root!r})
    import streamlit as st
    from pages._common import PLOT_CONFIG, empty_loss_figure, live_figure, loss_figure
    {speed_apart}

    MODE = os.environ["PROBE_MODE"]
    EVERY = float(os.environ["PROBE_EVERY"])


    def records(n_epochs):
        out = []
        for method in ("classic", "batchensemble"):
            for e in range(1, n_epochs + 1):
                for step in (1, 2):
                    loss = 2.0 / (e - 1 + step / 2) + (0.1 if method == "classic" else 0.0)
                    out.append({{"kind": "step", "method": method, "epoch": e, "step": step, "steps_per_epoch": 2,
                                "loss": loss, "member_loss": [loss * (1 + 0.02 * k) for k in range(5)]}})
                out.append({{"kind": "epoch", "method": method, "epoch": e, "loss": loss,
                            "member_loss": [loss] * 5, "epoch_seconds": 3.0 + 0.1 * e,
                            "examples_per_second": 10000.0 / (3.0 + 0.1 * e)}})
        return out


    def show(fig):
        st.plotly_chart(fig, width="stretch", theme=None, config=PLOT_CONFIG)


    st.title("probe")
    for i in range(12):  # a page with widgets, like the Train page
        st.slider(f"setting {{i}}", 0, 10, 3, key=f"s{{i}}")
    st.session_state.setdefault("t0", time.time())
    if MODE == "first-preloaded":
        show(empty_loss_figure(8))


    @st.fragment(run_every=EVERY)
    def live():
        tick = int(time.time() / EVERY)
        changing = records(2 + tick % 6)  # another number of epochs at every rerun
        if MODE == "text":
            st.write(f"tick {{tick}}")
        elif MODE == "same":
            show(live_figure(records(4)))
        elif MODE == "apart":
            show(loss_figure(changing))
            show(speed_figure_apart(changing))
        elif MODE == "combined":
            show(live_figure(changing))
        elif time.time() - st.session_state["t0"] > 12:  # first, first-preloaded
            show(live_figure(records(4)))
        else:
            st.write("waiting")


    live()
    """
)

SPEED_APART = textwrap.dedent(
    """
    # The speed figure as the Train page drew it apart from the loss figure (two panels).
    from plotly.subplots import make_subplots
    from pages._common import SECONDS_METRIC, THROUGHPUT_METRIC, _epoch_methods, _epoch_metric_trace, style


    def speed_figure_apart(records):
        metrics = (SECONDS_METRIC, THROUGHPUT_METRIC)
        fig = make_subplots(rows=1, cols=2, subplot_titles=[t for _, t, _ in metrics], horizontal_spacing=0.12)
        for col, (key, _, y_title) in enumerate(metrics, start=1):
            for method in _epoch_methods(records):
                trace = _epoch_metric_trace(records, method, key, legendgroup=method, showlegend=col == 1)
                fig.add_trace(trace, row=1, col=col)
            fig.update_yaxes(title_text=y_title, row=1, col=col)
        return style(fig, "Speed per epoch", "epoch", height=380)
    """
)


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def browser_pids(browser_root: int) -> list[int]:
    """Chromium's processes: the descendants of the Playwright driver's browser process."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [browser_root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def measure(mode: str, every: float, seconds: float, folder: Path, chromium) -> dict:
    env = dict(os.environ, PROBE_MODE=mode, PROBE_EVERY=str(every))
    port = ui.free_port()
    cmd = [sys.executable, "-m", "streamlit", "run", str(folder / "app.py"), "--server.port", str(port),
           "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--runner.postScriptGC", "false", "--server.fileWatcherType", "none"]  # fmt: skip
    server = subprocess.Popen(cmd, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        context = chromium.new_context(viewport={"width": 1280, "height": 720})
        page = context.new_page()
        ui.wait_for(lambda: _answers(page, port), 60, what="the probe app")
        page.get_by_text("probe").first.wait_for()
        time.sleep(3)  # the page's first render done
        root = _browser_root()
        b0, s0, t0 = cpu_seconds(browser_pids(root)), cpu_seconds([server.pid]), time.monotonic()
        time.sleep(seconds)
        b1, s1, t1 = cpu_seconds(browser_pids(root)), cpu_seconds([server.pid]), time.monotonic()
        context.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    reruns = (t1 - t0) / every
    return {"mode": mode, "seconds": t1 - t0, "browser_cpu_s": b1 - b0, "server_cpu_s": s1 - s0, "reruns": reruns}


def _answers(page, port: int) -> bool:
    try:
        page.goto(f"http://127.0.0.1:{port}", timeout=5000)
    except Exception:  # not up yet
        return False
    return True


def _browser_root() -> int:
    """The Chromium browser process this script launched (the one whose parent is the Playwright driver)."""
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            grand = int(Path(f"/proc/{ppid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if cmd and b"chrom" in Path(cmd[0].decode(errors="ignore")).name.encode() and grand == me:
            return int(entry.name)
    raise RuntimeError("the browser process was not found")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--every", type=float, default=1.0, help="seconds between fragment reruns (default 1)")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds measured per mode (default 20)")
    args = parser.parse_args(argv)
    missing = ui.missing_requirements()
    if missing:
        print(f"can't drive a browser: {missing}", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    rows = []
    with tempfile.TemporaryDirectory(prefix="probe-chart-") as tmp:
        folder = Path(tmp)
        (folder / "app.py").write_text(APP.format(root=str(ROOT), speed_apart=SPEED_APART))
        with sync_playwright() as p:
            chromium = ui.launch_chromium(p)
            try:
                for mode in args.modes:
                    rows.append(measure(mode, args.every, args.seconds, folder, chromium))
                    r = rows[-1]
                    print(f"{mode}: browser {r['browser_cpu_s']:.2f} CPU-s, server {r['server_cpu_s']:.2f} in "
                          f"{r['seconds']:.0f} s", flush=True)  # fmt: skip
            finally:
                chromium.close()
    print()
    print(f"{'mode':<17} {'browser CPU-s':>13} {'ms / rerun':>10} {'server CPU-s':>12}  (headless Chromium, 1280x720)")
    for r in rows:
        per = "" if r["mode"].startswith("first") else f"{1000 * r['browser_cpu_s'] / r['reruns']:.0f}"
        print(f"{r['mode']:<17} {r['browser_cpu_s']:>13.2f} {per:>10} {r['server_cpu_s']:>12.2f}")
    print(f"\nmachine: {os.cpu_count()} cores; load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
