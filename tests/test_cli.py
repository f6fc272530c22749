"""The command line, run as a user runs it: a real subprocess, its exit status and its output."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FASHION = Path("/usr/share/datasets/fashion-mnist")
TINY = ["--dataset", "synthetic", "--synthetic-train", "600", "--synthetic-test", "200", "--hidden", "16"]


def cli(*args, tmp_path, timeout=300, **popen):
    env = {**os.environ, "BENCH_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(ROOT)}
    env.pop("BENCH_STORE", None)
    return subprocess.run(
        [sys.executable, "-m", "bench_core", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **popen,
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--ensemble-size", "0"], "ensemble size must be at least 1"),
        (["--epochs", "0"], "epochs must be at least 1"),
        (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["--methods", "classic,bagging"], "unknown method 'bagging'"),
        (["--methods", ""], "choose at least one method"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--device", "cuda:7"], "not available on this machine"),
        (["--lr", "0"], "learning rate must be a positive number"),
        (["--lr", "-1"], "learning rate must be a positive number"),
        (["--lr", "abc"], "learning rate must be a positive number"),
        (["--lr", "nan"], "learning rate must be a positive number"),
        (["--batch-size", "x"], "batch size must be a whole number"),
        (["--classic-mode", "parallel"], "unknown classic mode"),
        (["--be-batching", "half"], "unknown BatchEnsemble batching"),
        (["--seed", str(2**64)], "seed must be at most 9223372036854775807"),
        (["--no-store", "--store", "elsewhere.sqlite"], "--no-store keeps no run, so it takes no --store"),
        (["--no-store", "--name", "mine"], "--no-store keeps no run, so it takes no --name"),
        (["--json", "."], "can't write --json .: it is a folder"),
        (["--json", "nowhere/x.json"], "its folder"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, args, expected):
    result = cli("train", *TINY, *args, tmp_path=tmp_path, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.stderr


def test_a_missing_device_creates_no_run(tmp_path):
    cli("train", *TINY, "--device", "cuda", tmp_path=tmp_path, timeout=60)
    assert not (tmp_path / "data" / "runs.sqlite").exists() or "no runs" in cli("runs", tmp_path=tmp_path).stdout


def test_missing_dataset_without_download_is_one_line(tmp_path):
    result = cli("train", "--dataset", "cifar10", "--no-download", tmp_path=tmp_path, timeout=60)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]  # progress lines come first, the error last
    assert last.startswith("error: ") and "cifar10" in last and "BENCH_DATA_DIR" in last
    assert "Traceback" not in result.stderr


def test_train_writes_json_table_and_store(tmp_path):
    out = tmp_path / "figures.json"
    result = cli("train", *TINY, "--epochs", "2", "--ensemble-size", "3", "--json", str(out), tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "run 1 (store:" in result.stderr
    assert "ensemble accuracy" in result.stdout and "BatchEnsemble" in result.stdout
    figures = json.loads(out.read_text())
    assert set(figures) == {"classic", "batchensemble"}
    keys = {"ensemble_accuracy", "member_accuracy", "mean_member_accuracy", "agreement", "disagreement", "nll"}
    keys |= {"ece", "brier", "params", "train_seconds", "epoch_seconds"}
    for result_ in figures.values():
        assert keys <= set(result_)
        assert len(result_["member_accuracy"]) == 3
        assert len(result_["agreement"]) == 3 and len(result_["agreement"][0]) == 3
        assert len(result_["epoch_seconds"]) == 2
    listing = cli("runs", tmp_path=tmp_path)
    assert "finished" in listing.stdout and "synthetic" in listing.stdout


def test_unwritable_json_path_is_one_line_before_any_training(tmp_path):
    (tmp_path / "afile").write_text("")
    result = cli("train", *TINY, "--epochs", "1", "--json", str(tmp_path / "afile" / "x.json"), tmp_path=tmp_path)
    assert result.returncode == 2
    target, folder = tmp_path / "afile" / "x.json", tmp_path / "afile"
    expected = f"error: can't write --json {target}: its folder {folder} is a file, not a folder"
    assert result.stderr.strip().splitlines() == [expected]
    assert result.stdout == ""  # no table: nothing was trained for a file that can't be written
    assert "no runs" in cli("runs", tmp_path=tmp_path).stdout


def test_settings_the_data_cannot_serve_fail_before_a_run_is_created(tmp_path):
    """Split batching with a batch smaller than E: one line, no data loaded, no failed run left behind."""
    args = ["--ensemble-size", "4", "--batch-size", "2", "--methods", "batchensemble", "--be-batching", "split"]
    result = cli("train", *TINY, *args, tmp_path=tmp_path, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: batch size 2 can't be split among 4 members: raise the batch size to at least 4, "
        "lower the ensemble size, or use repeat batching"
    ]
    assert "no runs" in cli("runs", tmp_path=tmp_path).stdout


def test_data_larger_than_memory_is_one_line_before_a_run(tmp_path):
    """A synthetic set of 10^12 examples (terabytes): refused before anything is allocated or stored."""
    result = cli("train", *TINY, "--synthetic-train", str(10**12), tmp_path=tmp_path, timeout=60)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: these settings need at least ") and "GiB free on this machine" in line
    assert "no runs" in cli("runs", tmp_path=tmp_path).stdout


def test_settings_parse_as_the_config_takes_them():
    from bench_core.cli import build_parser, config_from_args

    args = build_parser().parse_args(["train", "--be-init-std", "0", "--seed", str(2**63 - 1)])
    cfg = config_from_args(args)  # validated: the command line refuses nothing the settings take
    assert cfg.model.be_init_std == 0 and cfg.train.seed == 2**63 - 1


def test_runs_into_a_closed_pipe_ends_quietly(tmp_path):
    """``runs | head -1``: the reader goes away after one line; no BrokenPipeError traceback."""
    from bench_core.store import RunStore

    store = RunStore(tmp_path / "many.sqlite")
    for _ in range(1500):  # more than a pipe's buffer of lines
        store.create_run({"methods": ["classic"], "data": {"name": "synthetic"}}, source="test")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench_core", "runs", "--store", str(tmp_path / "many.sqlite")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout.readline().split()[0] == b"id"
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141
    assert stderr == ""


def train_until(tmp_path, line_part: str, *args: str) -> subprocess.Popen:
    """``train`` with ``args`` in its own process, once its stderr has shown a line with ``line_part``."""
    env = {**os.environ, "BENCH_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench_core", "train", "--dataset", "synthetic", "--synthetic-test", "500", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    line = ""
    while line_part not in line and time.time() < deadline:
        line = proc.stderr.readline()
    return proc


def test_ctrl_c_stops_after_the_batch_and_prints_what_was_trained(tmp_path):
    proc = train_until(tmp_path, "training classic", "--synthetic-train", "20000", "--epochs", "50", "--log-every", "1")
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "stopping after this batch (press Ctrl-C again to abort)" in stderr
    assert "stopped early" in stderr
    assert "ensemble accuracy" in stdout
    listing = cli("runs", tmp_path=tmp_path)
    assert "stopped" in listing.stdout


def test_ctrl_c_while_the_data_is_generated_stops_at_once(tmp_path):
    """A first Ctrl-C during the synthetic data's generation ends it within a chunk: nothing trained, no table."""
    proc = train_until(tmp_path, "loading synthetic", "--synthetic-train", "150000")
    time.sleep(1.0)  # generating: 150,000 examples take about 15 s here
    asked = time.time()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    took = time.time() - asked
    assert proc.returncode == 0, stderr
    assert took < 15, f"the stop took {took:.1f} s"
    assert "stopping before training starts (press Ctrl-C again to abort)" in stderr
    assert "stopped before any method was trained: there are no figures" in stderr
    assert stdout == "" and "stopped early" not in stderr
    listing = cli("runs", tmp_path=tmp_path)
    assert "stopped" in listing.stdout


def test_a_waiting_train_prints_each_new_holder_and_ctrl_c_ends_the_wait(tmp_path, monkeypatch):
    """Runs take turns on the CPU (bench_core.locks): the terminal follows the wait as the Runs page does."""
    from bench_core.locks import ENV_CPU_LOCK, device_lock

    monkeypatch.delenv(ENV_CPU_LOCK, raising=False)
    with device_lock("cpu", holder="run 98") as held:
        proc = train_until(tmp_path, "run 98 is using it", *TINY)
        held.write_text(f"{os.getpid()}\nrun 97\n")  # as when run 98 ends and a run queued before takes the CPU
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)  # readline would block
        reader.start()
        deadline = time.time() + 30
        while not any("run 97 is using it" in line for line in lines) and time.time() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)  # not communicate(): the reader has stderr
        reader.join(timeout=10)
        stdout = proc.stdout.read()
    stderr = "".join(lines)
    assert "waiting for the CPU: run 97 is using it; this run is next (runs take turns in order" in stderr, stderr
    assert proc.returncode == 0, stderr
    assert "stopping before training starts (press Ctrl-C again to abort)" in stderr
    assert "stopped before any method was trained: there are no figures" in stderr
    assert stderr.count("is using it") == 1, "each holder said once"
    assert stdout == ""
    assert "stopped" in cli("runs", tmp_path=tmp_path).stdout


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_reaches_88_percent_for_both_methods(tmp_path):
    """The issue's acceptance run, on real Fashion-MNIST: E = 4, 10 epochs, default settings."""
    out = tmp_path / "fm.json"
    result = cli(
        "train",
        "--dataset",
        "fashion-mnist",
        "--ensemble-size",
        "4",
        "--epochs",
        "10",
        "--json",
        str(out),
        tmp_path=tmp_path,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(out.read_text())
    for method in ("classic", "batchensemble"):
        assert figures[method]["ensemble_accuracy"] >= 0.88, (method, figures[method]["ensemble_accuracy"])
    assert figures["classic"]["ensemble_accuracy"] > figures["classic"]["mean_member_accuracy"]


def test_train_help_names_every_choice_and_default(capsys):
    from bench_core.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for needle in (
        "comma list of single, classic, batchensemble (default classic,batchensemble)",
        "cifar10, fashion-mnist, mnist, synthetic (default cifar10)",
        "--epochs EPOCHS (default 10)",
        "repeat (every member sees the whole batch, the default) or split",
        "normal, random_sign (default normal: N(1, std²))",
    ):
        assert needle in text, needle


def test_runs_lists_one_member_for_a_run_of_the_single_model_alone():
    from bench_core.cli import _run_line

    run = {"id": 3, "status": "finished", "methods": ["single"], "created": 0, "summary": {}}
    run["config"] = {"data": {"name": "synthetic"}, "model": {"ensemble_size": 5}, "train": {"epochs": 2}}
    assert _run_line(run).split()[:4] == ["3", "finished", "synthetic", "1"], "as the Runs page: E = 1"
    long = {**run, "methods": ["single", "classic", "batchensemble"], "created": 86400 * 365}
    long["summary"] = {m: {"ensemble_accuracy": 0.5} for m in long["methods"]}
    line = _run_line(long)
    assert line.endswith("  single 0.500, classic 0.500, batchensemble 0.500"), "the methods last, however many"
    assert line.index("single 0.500") == _run_line(run).index("single"), "each column where the header has it"
    run["methods"] = ["single", "classic"]
    assert _run_line(run).split()[3] == "5"
    run.update(status="running", note="waiting for the CPU: run 2 is using it; this run is next (...)")
    assert _run_line(run).split()[1] == "waiting", "a run waiting for its turn on the device, as the Runs page"
    run["note"] = "generated 1024 of 2000 synthetic examples"
    assert _run_line(run).split()[1] == "running"


def test_a_stop_asked_in_the_store_stops_a_command_line_run(tmp_path):
    """The dashboard's Stop (Train's 'Stop it', the Runs page) reaches a run started by ``train``."""
    from bench_core.store import RunStore

    env = {**os.environ, "BENCH_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(ROOT)}
    env.pop("BENCH_STORE", None)
    args = ["--dataset", "synthetic", "--synthetic-train", "20000", "--synthetic-test", "500", "--epochs", "50"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench_core", "train", *args, "--quiet"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    store_file = tmp_path / "data" / "runs.sqlite"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if store_file.exists():
            with RunStore(store_file) as store:
                runs = store.list_runs()
                if runs and store.records(runs[0]["id"]):  # training has begun
                    store.request_stop(runs[0]["id"])
                    break
        time.sleep(0.2)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "stopped early" in stderr and "ensemble accuracy" in stdout
    assert "stopping after this batch: asked from the dashboard" in stderr, "the terminal says why it stops"
    with RunStore(store_file) as store:
        assert store.list_runs()[0]["status"] == "stopped"


def test_the_first_ctrl_c_after_a_dashboard_stop_only_asks_to_stop(capsys):
    from bench_core.cli import _install_stop_handler

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        stop = threading.Event()
        stop.set()  # what watch_stop does on the dashboard's Stop
        _install_stop_handler(stop)
        handler = signal.getsignal(signal.SIGINT)
        handler(signal.SIGINT, None)  # the user's first Ctrl-C: asks to stop, aborts nothing
        assert "press Ctrl-C again to abort" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGINT, None)
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])
