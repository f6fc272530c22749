"""Is a run launched from the dashboard as fast as the same run from the command line?

The issue asks that a run launched from the dashboard take no more than 1.1 times as long as the
same run from the CLI, and that a click answer within a second while a run is going. This script
measures both on this machine:

1. CLI: ``python -m bench_core train ...`` as a subprocess; the wall time of the whole process
   (start-up, data, training, evaluation, storing) and the training seconds it stored.
2. Dashboard: ``streamlit run app.py`` in the background and headless Chromium driving it like a
   user: the same settings are entered on the Train page, then the time from the click on Train
   until the run store says the run has ended, and the training seconds the worker stored. While
   the run trains the browser watches the live Train page until the run ends, as a user would.
3. Clicks: one more dashboard run, during which a round of six clicks (sidebar navigation,
   sliders on the Learn page) is made, each timed from the click to the page's answer; its
   run time is shown apart, as that of a heavier use than watching (``--clicks during`` puts the
   clicks into the timed runs instead).

The two runs must have the same settings; the script checks that the stored configs match.
Everything lives in a temporary folder (never ./data). Usage::

    python scripts/bench_dashboard.py                      # synthetic 30000/5000, E=5, 4 epochs (~30 s a run)
    python scripts/bench_dashboard.py --order both         # CLI, dashboard, dashboard, CLI
    python scripts/bench_dashboard.py --train 3000 --epochs 2 --json bench.json
    python scripts/bench_dashboard.py --watch none --no-clicks   # the worker alone, no live page

Needs Playwright and Debian's chromium (as the browser tests do). Other work on the machine
skews the timings: the script prints the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import browser as ui  # noqa: E402  (tests/browser.py: the browser helpers the tests use)

from bench_core.store import FINAL_STATUSES, RunStore  # noqa: E402

LIMIT_RATIO = 1.1
CLICK_LIMIT_S = 1.0


class CpuSampler:
    """CPU seconds spent during a run, by whom: this script's descendants by role, and the rest.

    Reads /proc (Linux; elsewhere it reports nothing). Every process is sampled as often as
    ``sample()`` is called; a process born during the run counts from zero, one that ends counts
    up to its last sample.
    """

    def __init__(self, server_pid: int | None = None) -> None:
        self.server_pid = server_pid
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.enabled = Path("/proc/stat").exists()
        self.roles: dict[int, str | None] = {}
        self._ppid: dict[int, int] = {}
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.machine_first = self.machine_last = self._machine()
        if self.enabled:
            self.first = dict(self._procs())
            self.last = dict(self.first)

    def _machine(self) -> float:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return 0.0
        user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        return (user + nice + system + irq + softirq + steal) / self.tick

    def _procs(self):
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                raw = (entry / "stat").read_text()
            except OSError:
                continue
            rest = raw[raw.rfind(")") + 2 :].split()
            if len(rest) < 13:
                continue
            pid = int(entry.name)
            self._ppid[pid] = int(rest[1])
            yield pid, (int(rest[11]) + int(rest[12])) / self.tick

    def sample(self) -> None:
        if not self.enabled:
            return
        for pid, cpu in self._procs():
            self.first.setdefault(pid, 0.0)  # born during the run: all its CPU time counts
            self.last[pid] = cpu
        for pid in list(self._ppid):
            # Classified again at every sample while it lives: its command line is gone once it
            # ends, and just after a fork it is still its parent's.
            role = self._role(pid)
            if role is not None:
                self.roles[pid] = role
        self._ppid.clear()
        self.machine_last = self._machine()

    def _role(self, pid: int) -> str | None:
        """What a live descendant of this script is (None for any other process)."""
        me, seen, p = os.getpid(), set(), pid
        while p not in (0, 1, me) and p not in seen:
            seen.add(p)
            p = self._ppid.get(p, 0)
        if p != me or pid == me:
            return None
        cmd = " ".join(ui._cmdline(pid))
        if not cmd:
            return None  # a zombie: keep what it was seen as while it ran
        if pid == self.server_pid:
            return "dashboard server"
        if "bench_core" in cmd and " worker" in cmd:
            return "training worker"
        if "bench_core" in cmd and " train" in cmd:
            return "CLI process"
        if "streamlit" in cmd:
            return "dashboard server"  # a worker between fork and exec
        return "browser"

    def report(self) -> dict[str, float]:
        if not self.enabled:
            return {}
        out: dict[str, float] = {}
        for pid, cpu in self.last.items():
            role = self.roles.get(pid)
            if role is not None:
                out[role] = out.get(role, 0.0) + max(0.0, cpu - self.first.get(pid, 0.0))
        busy = self.machine_last - self.machine_first
        out["not ours (other work)"] = max(0.0, busy - sum(out.values()))
        out["machine busy"] = busy
        return {k: round(v, 1) for k, v in out.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=30_000, help="synthetic training examples (default 30000)")
    parser.add_argument("--test", type=int, default=5_000, help="synthetic test examples (default 5000)")
    parser.add_argument("--ensemble-size", type=int, default=5, help="default 5")
    parser.add_argument("--epochs", type=int, default=4, help="default 4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--points-per-epoch",
        type=int,
        default=10,
        help="the Train page's 'Loss points per epoch' (the CLI gets the same --log-every); default 10",
    )
    parser.add_argument(
        "--order",
        choices=("cli-first", "dashboard-first", "both"),
        default="cli-first",
        help="both: CLI, dashboard, dashboard, CLI (each way's median is compared)",
    )
    parser.add_argument(
        "--clicks",
        choices=("separate", "during", "none"),
        default="separate",
        help="separate (default): the timed dashboard runs are watched, not clicked, and one more dashboard run "
        "takes the six timed clicks (its ratio is shown apart); during: the timed dashboard runs take the clicks; "
        "none: no clicks",
    )
    parser.add_argument("--no-clicks", dest="clicks", action="store_const", const="none", help="same as --clicks none")
    parser.add_argument(
        "--watch",
        choices=("train", "none"),
        default="train",
        help="train: the browser shows the live Train page until the run ends (default); "
        "none: the tab is closed after the click (and the clicks), leaving the run to its worker",
    )
    parser.add_argument(
        "--worker-threads",
        type=int,
        default=None,
        help="(experiment) OMP_NUM_THREADS for the dashboard server and so its training workers; the CLI keeps "
        "the default",
    )
    parser.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="(experiment) an environment variable for the dashboard server and so its training workers",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one run may take")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (store, logs)")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the figures to this JSON file")
    return parser.parse_args(argv)


def worker_env(args: argparse.Namespace) -> dict[str, str]:
    """The environment the experiment options give the dashboard server and so its workers."""
    env = {"OMP_NUM_THREADS": str(args.worker_threads)} if args.worker_threads else {}
    env.update(item.split("=", 1) for item in args.worker_env)
    return env


def log_every(args: argparse.Namespace, batch_size: int = 128) -> int:
    """What the Train page turns 'Loss points per epoch' into (pages/_common.log_every_for)."""
    if args.points_per_epoch <= 0:
        return 0
    steps = math.ceil(args.train / batch_size)
    return max(1, steps // args.points_per_epoch)


def stored(store_path: Path, run_id: int) -> dict:
    """Status, config and the summed training seconds of one stored run."""
    with RunStore(store_path) as store:
        run = store.get_run(run_id)
    results = run.get("results") or {}
    seconds = {m: r.get("train_seconds") for m, r in results.items()}
    return {
        "status": run["status"],
        "config": run.get("config") or {},
        "device": run.get("device"),
        "train_seconds": sum(s for s in seconds.values() if isinstance(s, (int, float))),
        "train_seconds_by_method": seconds,
    }


def run_cli(args: argparse.Namespace, work: Path) -> dict:
    store_path = work / "runs.sqlite"
    out = work / f"cli-{time.time_ns()}.json"
    cmd = [
        sys.executable,
        "-m",
        "bench_core",
        "train",
        "--dataset",
        "synthetic",
        "--synthetic-train",
        str(args.train),
        "--synthetic-test",
        str(args.test),
        "--ensemble-size",
        str(args.ensemble_size),
        "--epochs",
        str(args.epochs),
        "--seed",
        str(args.seed),
        "--log-every",
        str(log_every(args)),
        "--data-dir",
        str(work),
        "--store",
        str(store_path),
        "--json",
        str(out),
    ]
    env = dict(os.environ, BENCH_DATA_DIR=str(work), BENCH_STORE=str(store_path))
    before = ui.latest_run_id(store_path) or 0
    print(f"CLI: {' '.join(cmd[1:])}", flush=True)
    log = work / "cli.log"
    with open(log, "w") as out_file:
        sampler = CpuSampler()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out_file, stderr=out_file)
        while proc.poll() is None:
            sampler.sample()
            if time.perf_counter() - start > args.timeout:
                proc.kill()
                raise SystemExit(f"the CLI run took over {args.timeout:.0f} s")
            time.sleep(0.1)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"the CLI run failed ({proc.returncode}):\n{log.read_text()[-2000:]}")
    run_id = ui.latest_run_id(store_path)
    assert run_id is not None and run_id > before, "the CLI run is not in the store"
    info = stored(store_path, run_id)
    print(f"CLI: run {run_id} {info['status']} in {wall:.1f} s (training {info['train_seconds']:.1f} s)", flush=True)
    return {"way": "cli", "run_id": run_id, "wall_s": wall, "cpu_s": sampler.report(), **info}


def run_dashboard(args: argparse.Namespace, work: Path, server: ui.DashboardServer, chromium, clicks: bool) -> dict:
    context = chromium.new_context(viewport={"width": 1280, "height": 720})
    context.set_default_timeout(60_000)
    page = context.new_page()
    store = server.store
    try:
        ui.open_app(page, server.url)
        ui.configure_run(
            page,
            ensemble_size=args.ensemble_size,
            epochs=args.epochs,
            train=args.train,
            test=args.test,
            seed=args.seed,
            points_per_epoch=args.points_per_epoch,
        )
        sampler = CpuSampler(server.proc.pid if server.proc else None)
        run_id, clicked = ui.start_run(page, store)

        def status() -> str | None:
            sampler.sample()
            return ui.run_status(store, run_id)

        latencies: dict[str, float] = {}
        if clicks:
            # Click around once the run trains (its first loss points are drawn).
            ui.wait_for(
                lambda: status() not in ("queued", "running") or (ui.plot(page, "Training loss") or {}).get("points"),
                args.timeout,
                interval=0.1,
                what="the run to train",
            )
            if status() == "running":
                latencies = ui.click_round(page)
                if status() != "running":
                    print("  (the run ended before the clicks were done: train longer for a fair measure)")
        if args.watch == "none":
            context.close()  # leave the run to its worker
        ui.wait_for(lambda: status() in FINAL_STATUSES, args.timeout, interval=0.1, what=f"run {run_id} to end")
        wall = time.perf_counter() - clicked
    finally:
        context.close()
    info = stored(store, run_id)
    print(
        f"dashboard: run {run_id} {info['status']} in {wall:.1f} s after the click "
        f"(training {info['train_seconds']:.1f} s)",
        flush=True,
    )
    return {
        "way": "dashboard",
        "run_id": run_id,
        "wall_s": wall,
        "clicks": clicks,
        "click_latencies_s": latencies,
        "cpu_s": sampler.report(),
        **info,
    }


def same_settings(a: dict, b: dict) -> list[str]:
    """The config keys on which two stored runs differ ("data.data_dir" is allowed to)."""
    diffs = []
    for section in sorted(set(a) | set(b)):
        left, right = a.get(section), b.get(section)
        if isinstance(left, dict) and isinstance(right, dict):
            for key in sorted(set(left) | set(right)):
                if f"{section}.{key}" != "data.data_dir" and left.get(key) != right.get(key):
                    diffs.append(f"{section}.{key}: {left.get(key)!r} vs {right.get(key)!r}")
        elif left != right:
            diffs.append(f"{section}: {left!r} vs {right!r}")
    return diffs


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu or "unknown",
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def table(runs: list[dict], info: dict, args: argparse.Namespace) -> str:
    cli = [r for r in runs if r["way"] == "cli"]
    # The timed dashboard runs: all of them with --clicks during, else those that took no clicks.
    dash = [r for r in runs if r["way"] == "dashboard" and (args.clicks == "during" or not r["clicks"])]
    clicked = [r for r in runs if r["way"] == "dashboard" and r["clicks"]]
    med = statistics.median
    cli_wall, dash_wall = med(r["wall_s"] for r in cli), med(r["wall_s"] for r in dash)
    cli_train, dash_train = med(r["train_seconds"] for r in cli), med(r["train_seconds"] for r in dash)
    clicks = [s for r in clicked for s in r.get("click_latencies_s", {}).values()]

    def verdict(ok: bool) -> str:
        return "yes" if ok else "NO"

    wall_ratio, train_ratio = dash_wall / cli_wall, dash_train / cli_train
    lines = [
        f"settings: synthetic {args.train} train / {args.test} test, E={args.ensemble_size}, "
        f"{args.epochs} epochs, seed {args.seed}, methods {', '.join(cli[0]['config'].get('methods', []))}, "
        f"log every {log_every(args)} steps, device {cli[0]['device']}; dashboard: "
        + {
            "none": "no clicks",
            "during": "6 clicks while each training",
            "separate": "timed runs not clicked, 6 clicks in one more run",
        }[args.clicks]
        + ", "
        f"{'live Train page watched to the end' if args.watch == 'train' else 'tab closed after the click'}"
        + "".join(f", dashboard workers with {name}={value}" for name, value in worker_env(args).items()),
        "runs (in order): " + ", ".join(f"{r['way']} #{r['run_id']} {r['wall_s']:.1f} s" for r in runs),
        "",
        f"{'':<38}{'CLI':>8}{'dashboard':>11}{'ratio':>8}   bound",
        f"{'wall s (process; click->end), median':<38}{cli_wall:>8.1f}{dash_wall:>11.1f}{wall_ratio:>8.2f}"
        f"   <= {LIMIT_RATIO}: {verdict(wall_ratio <= LIMIT_RATIO)}",
        f"{'stored training s (sum), median':<38}{cli_train:>8.1f}{dash_train:>11.1f}{train_ratio:>8.2f}"
        f"   <= {LIMIT_RATIO}: {verdict(train_ratio <= LIMIT_RATIO)}",
    ]
    if args.clicks == "separate":
        for r in clicked:  # a user who also clicks around: a heavier load than watching, shown apart
            lines.append(
                f"{'wall s, dashboard run with the clicks':<38}{cli_wall:>8.1f}{r['wall_s']:>11.1f}"
                f"{r['wall_s'] / cli_wall:>8.2f}   (not a bound: six clicks within one run)"
            )
    if len(cli) > 1 or len(dash) > 1:
        # The least disturbed run of each way: other work on the machine only ever slows a run down.
        best = [(min(r[key] for r in cli), min(r[key] for r in dash)) for key in ("wall_s", "train_seconds")]
        lines += [
            f"{'wall s, best run of each':<38}{best[0][0]:>8.1f}{best[0][1]:>11.1f}{best[0][1] / best[0][0]:>8.2f}"
            f"   <= {LIMIT_RATIO}: {verdict(best[0][1] / best[0][0] <= LIMIT_RATIO)}",
            f"{'stored training s, best run of each':<38}{best[1][0]:>8.1f}{best[1][1]:>11.1f}"
            f"{best[1][1] / best[1][0]:>8.2f}   <= {LIMIT_RATIO}: {verdict(best[1][1] / best[1][0] <= LIMIT_RATIO)}",
        ]
    if clicks:
        lines.append(
            f"{'click latency while training, s':<38}median {med(clicks):.2f}, max {max(clicks):.2f} "
            f"({len(clicks)} clicks)   <= {CLICK_LIMIT_S}: median {verdict(med(clicks) <= CLICK_LIMIT_S)}, "
            f"every click {verdict(max(clicks) <= CLICK_LIMIT_S)}"
        )
        for r in clicked:
            lines.append("    " + ", ".join(f"{k} {v:.2f}" for k, v in r.get("click_latencies_s", {}).items()))
    lines += ["", "CPU seconds during each run (wall x cores is the machine's capacity):"]
    for r in runs:
        cpu = ", ".join(f"{k} {v:.1f}" for k, v in (r.get("cpu_s") or {}).items())
        lines.append(f"    {r['way']} #{r['run_id']} ({r['wall_s']:.1f} s wall): {cpu or 'not measured'}")
    lines += [
        "",
        f"machine: {info['platform']}, Python {info['python']}",
        f"cpu: {info['cpu']}, {info['cores']} cores ({info['cores_usable']} usable)",
        f"load average (1, 5, 15 min): before {info['load_before']}, after {info['load_after']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = ui.missing_requirements()
    if missing:
        print(f"can't drive the dashboard: {missing}", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    info = machine()
    info["load_before"] = loadavg()
    order = {"cli-first": ["cli", "dashboard"], "dashboard-first": ["dashboard", "cli"]}.get(
        args.order, ["cli", "dashboard", "dashboard", "cli"]
    )
    work = Path(tempfile.mkdtemp(prefix="bench-dashboard-"))
    runs: list[dict] = []
    try:
        # no file-watcher flag: .streamlit/config.toml applies, as to a user's `streamlit run`
        server = ui.DashboardServer(work, env=worker_env(args), file_watcher=None).start()
        try:
            with sync_playwright() as p:
                chromium = ui.launch_chromium(p)
                try:
                    # Warm the server up (first page load imports torch and plotly) before any timing.
                    warm = chromium.new_page()
                    ui.open_app(warm, server.url)
                    warm.close()
                    for way in order:
                        if way == "cli":
                            runs.append(run_cli(args, work))
                        else:
                            runs.append(run_dashboard(args, work, server, chromium, clicks=args.clicks == "during"))
                    if args.clicks == "separate":
                        runs.append(run_dashboard(args, work, server, chromium, clicks=True))
                finally:
                    chromium.close()
        finally:
            server.stop()
        info["load_after"] = loadavg()
        diffs = same_settings(runs[0]["config"], next(r for r in runs if r["way"] != runs[0]["way"])["config"])
        if diffs:
            print("warning: the CLI and dashboard runs differ in: " + "; ".join(diffs), file=sys.stderr)
        bad = [r for r in runs if r["status"] != "finished"]
        if bad:
            print(f"warning: runs that did not finish: {[(r['run_id'], r['status']) for r in bad]}", file=sys.stderr)
        print()
        print(table(runs, info, args))
        if args.json_path:
            Path(args.json_path).write_text(
                json.dumps({"machine": info, "settings_differ": diffs, "runs": runs}, indent=2, default=str)
            )
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
