"""A whole experiment through the run store: records, results, weights, statuses, faults."""

import os
import threading
import time

import pytest
import torch

from bench_core.config import RunConfig
from bench_core.errors import ConfigError, DivergedError
from bench_core.models import build_model
from bench_core.runner import MethodResult, RunDone, run_experiment
from bench_core.store import RunStore
from bench_core.training import EpochRecord


def tiny_config(**train) -> RunConfig:
    cfg = RunConfig(methods=("classic", "batchensemble"))
    cfg.data.name = "synthetic"
    cfg.data.synthetic_train, cfg.data.synthetic_test = 800, 200
    cfg.data.synthetic_shape = (1, 6, 6)
    cfg.model.hidden, cfg.model.ensemble_size = 16, 3
    cfg.train.epochs, cfg.train.batch_size, cfg.train.device = 2, 64, "cpu"
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def test_from_flat_sets_each_field_by_its_name():
    flat = {
        "methods": ("single", "classic"),
        "dataset": "synthetic",
        "download": False,
        "synthetic_train": 800,
        "hidden": 16,
        "ensemble_size": 3,
        "be_init": "random_sign",
        "epochs": 2,
        "lr": 0.01,
        "device": "cpu",
        "log_every": 5,
        "points_per_epoch": 4,  # not a config field: ignored
        "command": "train",  # ignored
        "name": "not-a-dataset",  # only "dataset" names the data
    }
    expected = RunConfig(methods=("single", "classic"))
    expected.data.name, expected.data.download, expected.data.synthetic_train = "synthetic", False, 800
    expected.model.hidden, expected.model.ensemble_size, expected.model.be_init = 16, 3, "random_sign"
    expected.train.epochs, expected.train.lr, expected.train.device, expected.train.log_every = 2, 0.01, "cpu", 5
    assert RunConfig.from_flat(flat) == expected
    assert RunConfig.from_flat({}) == RunConfig()


def test_cli_arguments_become_the_config():
    from bench_core.cli import build_parser, config_from_args

    argv = "train --dataset synthetic --no-download --methods batchensemble --hidden 16 --ensemble-size 3"
    argv += " --be-batching split --epochs 2 --lr 0.01 --log-every 7"
    args = build_parser().parse_args(argv.split())
    cfg = config_from_args(args)
    assert cfg.methods == ("batchensemble",)
    assert (cfg.data.name, cfg.data.download) == ("synthetic", False)
    assert (cfg.model.hidden, cfg.model.ensemble_size, cfg.model.be_batching) == (16, 3, "split")
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.log_every) == (2, 0.01, 7)


@pytest.fixture
def store(tmp_path):
    return RunStore(tmp_path / "runs.sqlite")


def test_finished_run_is_stored_whole(store):
    cfg = tiny_config()
    events = list(run_experiment(cfg, store=store, source="test"))
    done = events[-1]
    assert isinstance(done, RunDone) and done.status == "finished"
    assert set(done.results) == {"classic", "batchensemble"}
    run = store.get_run(done.run_id)
    assert run["status"] == "finished"
    assert RunConfig.from_dict(run["config"]) == cfg  # asdict(config) round-trips through the store
    assert [r["epoch"] for r in run["records"]] == [1, 2, 1, 2]
    assert {"torch", "python"} <= set(run["versions"])
    for method, result in run["results"].items():
        assert len(result["member_accuracy"]) == 3
        assert len(result["agreement"]) == 3
        assert result["train_seconds"] > 0
        assert len(result["epoch_seconds"]) == 2
        state = store.load_weights(done.run_id, method)
        model = build_model(method, cfg.model, 36, 10)
        model.load_state_dict(state)  # the saved weights are the whole model


def test_methods_start_from_the_same_seed_and_reproduce(store):
    a = [e for e in run_experiment(tiny_config(), store=None) if isinstance(e, MethodResult)]
    b = [e for e in run_experiment(tiny_config(), store=None) if isinstance(e, MethodResult)]
    assert [r.result["ensemble_accuracy"] for r in a] == [r.result["ensemble_accuracy"] for r in b]


def test_stop_keeps_what_was_trained_and_skips_later_methods(store):
    stop = threading.Event()
    events = []
    for event in run_experiment(tiny_config(epochs=5), store=store, stop=stop):
        events.append(event)
        if isinstance(event, EpochRecord):
            stop.set()
    done = events[-1]
    assert done.status == "stopped"
    assert list(done.results) == ["classic"]
    assert done.results["classic"]["epochs_done"] == 1
    run = store.get_run(done.run_id)
    assert run["status"] == "stopped"
    assert "classic" in run["results"] and "batchensemble" not in run["results"]


def test_a_stop_while_the_data_loads_ends_the_run_stopped_without_training(store):
    """The load gives up at its next progress report: stored as stopped (not failed), nothing trained."""
    stop = threading.Event()
    reports = []

    def progress(fraction: float, message: str) -> None:
        reports.append(message)
        stop.set()  # asked while the first report shows

    cfg = tiny_config()
    cfg.data.synthetic_train = 5000  # five chunks
    events = list(run_experiment(cfg, store=store, stop=stop, progress=progress))
    assert len(reports) == 1, reports
    assert not any(isinstance(e, EpochRecord) for e in events)
    done = events[-1]
    assert isinstance(done, RunDone) and done.status == "stopped" and done.results == {}
    run = store.get_run(done.run_id)
    assert (run["status"], run["message"]) == ("stopped", "stopped while the data was loading")


def test_the_loads_progress_note_is_cleared_before_training(store):
    """The worker shows the load's progress as the run's note; training starts with none left."""
    run_id = store.create_run(tiny_config().to_dict(), source="test", status="queued")
    seen = []
    progress = lambda fraction, message: store.set_note(run_id, message)  # noqa: E731 - as cmd_worker's
    for event in run_experiment(tiny_config(), store=store, run_id=run_id, progress=progress):
        if isinstance(event, EpochRecord):
            seen.append(store.get_run(run_id)["note"])
    assert seen and seen[0] is None, seen


def test_divergence_fails_the_run_with_its_message(store):
    with pytest.raises(DivergedError, match="lower learning rate"):
        list(run_experiment(tiny_config(lr=1e12, epochs=5), store=store))
    (run,) = store.list_runs()
    assert run["status"] == "failed"
    assert "lower learning rate" in run["message"]


def test_batch_larger_than_the_dataset_is_a_config_error(store):
    with pytest.raises(ConfigError, match="larger than the 800 training examples"):
        list(run_experiment(tiny_config(batch_size=1000), store=store))
    assert store.list_runs()[0]["status"] == "failed"


def test_split_batch_smaller_than_ensemble_is_a_config_error(store):
    cfg = tiny_config(batch_size=2)
    cfg.model.be_batching = "split"
    with pytest.raises(ConfigError, match="can't be split among 3 members"):
        list(run_experiment(cfg, store=store))


def test_out_of_memory_names_the_settings_to_lower(store, monkeypatch):
    import bench_core.runner as runner

    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(runner, "build_model", boom)
    with pytest.raises(runner.DeviceOutOfMemoryError, match="lower the ensemble size"):
        list(run_experiment(tiny_config(), store=store))
    assert store.list_runs()[0]["status"] == "failed"


def test_an_allocation_that_fails_is_one_line_and_a_failed_run(store, monkeypatch):
    import bench_core.runner as runner

    def refuse(*args, **kwargs):  # what torch's CPU allocator raises when the system says no
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: ...")

    monkeypatch.setattr(runner, "load_dataset", refuse)
    with pytest.raises(runner.DeviceOutOfMemoryError, match="synthetic does not fit in this machine's memory"):
        list(run_experiment(tiny_config(), store=store))
    monkeypatch.setattr(runner, "load_dataset", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("other")))
    with pytest.raises(RuntimeError, match="other"):  # any other error is not called a lack of memory
        list(run_experiment(tiny_config(), store=store))
    assert [run["status"] for run in store.list_runs()] == ["failed", "failed"]


def test_unknown_device_is_refused(store):
    from bench_core.errors import DeviceError

    cfg = tiny_config(device="tpu")
    with pytest.raises(DeviceError, match="unknown device"):
        list(run_experiment(cfg, store=store))


def test_a_busy_gpu_makes_the_run_wait_and_say_so(store, monkeypatch, tmp_path):
    """A CUDA device trains one run at a time: a second run waits, says so, and can be stopped."""
    import bench_core.runner as runner
    from bench_core.locks import device_lock

    monkeypatch.setattr(runner, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(runner, "load_dataset", lambda cfg, device, progress=None, stop=None: _tiny_data())
    stop = threading.Event()
    events = []
    with device_lock("cuda"):  # another run holds the GPU
        worker = threading.Thread(target=lambda: events.extend(run_experiment(tiny_config(), store=store, stop=stop)))
        worker.start()
        deadline = time.time() + 10
        while time.time() < deadline and not (store.list_runs() and store.list_runs()[0]["note"]):
            time.sleep(0.05)
        assert "waiting for the GPU" in store.list_runs()[0]["note"]
        stop.set()
        worker.join(timeout=10)
    assert events[-1].status == "stopped"
    assert store.list_runs()[0]["status"] == "stopped"


def test_a_run_waits_while_the_cpu_is_taken_says_by_whom_and_can_be_stopped(store, monkeypatch):
    """CPU runs take turns (locks.ENV_CPU_LOCK): a second one waits before loading its data, names the holder."""
    from bench_core.locks import ENV_CPU_LOCK, device_lock

    monkeypatch.delenv(ENV_CPU_LOCK, raising=False)
    stop = threading.Event()
    events = []
    with device_lock("cpu", holder="run 99"):  # another run trains on the CPU
        worker = threading.Thread(target=lambda: events.extend(run_experiment(tiny_config(), store=store, stop=stop)))
        worker.start()
        deadline = time.time() + 10
        while time.time() < deadline and not (store.list_runs() and store.list_runs()[0]["note"]):
            time.sleep(0.05)
        note = store.list_runs()[0]["note"]
        assert note.startswith("waiting for the CPU: run 99 is using it; this run is next (runs take turns"), note
        (said,) = (e.message for e in events)  # the command line sees it too, before any loading
        assert said.startswith("waiting for the CPU: run 99 is using it; this run is next (runs take turns"), said
        stop.set()
        worker.join(timeout=10)
    assert events[-1].status == "stopped" and events[-1].results == {}
    (run,) = store.list_runs()
    assert (run["status"], run["message"]) == ("stopped", "stopped while waiting for the CPU")


def test_two_cpu_runs_at_once_train_one_after_the_other(store, monkeypatch):
    from bench_core.locks import ENV_CPU_LOCK

    monkeypatch.delenv(ENV_CPU_LOCK, raising=False)
    spans: dict[int, list[float]] = {}

    def run(seed: int) -> None:
        for event in run_experiment(tiny_config(seed=seed), store=store):
            if isinstance(event, EpochRecord):  # yielded while the run holds the CPU
                spans.setdefault(seed, []).append(time.monotonic())

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    first, second = sorted(spans.values())
    assert first[-1] <= second[0], "the second run's first epoch ends after the first run's last one"
    assert all(r["status"] == "finished" for r in store.list_runs())


def test_the_waiting_note_names_each_holder_in_turn(store, monkeypatch):
    """The note (stored, and told to ``on_wait`` for the command line) follows whoever holds the CPU now."""
    from bench_core.locks import ENV_CPU_LOCK, device_lock

    monkeypatch.delenv(ENV_CPU_LOCK, raising=False)
    stop = threading.Event()
    told: list[str] = []
    worker = threading.Thread(
        target=lambda: list(run_experiment(tiny_config(), store=store, stop=stop, on_wait=told.append))
    )

    def note() -> str:
        runs = store.list_runs()
        return (runs[0]["note"] or "") if runs else ""

    def wait_for(text: str) -> str:
        deadline = time.time() + 10
        while time.time() < deadline and text not in note():
            time.sleep(0.05)
        return note()

    with device_lock("cpu", holder="run 98") as held:
        worker.start()
        assert "run 98 is using it" in wait_for("run 98")
        held.write_text(f"{os.getpid()}\nrun 97\n")  # as when run 98 ends and another waiter gets there first
        assert "run 97 is using it" in wait_for("run 97")
        held.write_text("")  # a hand-over: the next holder has the lock and has not written its name yet
        time.sleep(1.0)  # five looks
        assert "run 97 is using it" in note(), "the last name read stands, not 'another run'"
        stop.set()
        worker.join(timeout=10)
    assert store.list_runs()[0]["status"] == "stopped"
    assert [t.split(":")[1].split(";")[0] for t in told] == [" run 97 is using it"], "once per change, after the first"


def test_a_lock_folder_that_cant_be_written_trains_all_the_same_and_says_so(store, monkeypatch, tmp_path):
    from bench_core.locks import ENV_CPU_LOCK, ENV_LOCK_DIR

    monkeypatch.delenv(ENV_CPU_LOCK, raising=False)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(ENV_LOCK_DIR, str(blocker / "locks"))
    done = list(run_experiment(tiny_config(), store=store))[-1]
    assert done.status == "finished"
    assert any("did not take turns on the CPU" in n and ENV_LOCK_DIR in n for n in done.notes), done.notes


def _tiny_data():
    from bench_core.data import make_synthetic

    return make_synthetic(800, 200, shape=(1, 6, 6), num_classes=10)


@pytest.mark.parametrize(("be_batching", "first_layer_kernel"), [("repeat", "0"), ("repeat", "1"), ("split", "0")])
def test_a_batchensemble_run_says_while_its_cpu_kernel_compiles(store, monkeypatch, be_batching, first_layer_kernel):
    """The kernel's compile (seconds) is a phase and the run's note, cleared once it is compiled.

    Repeat batching only, and only where the C++ steps' own first-layer kernel does not replace it.
    """
    import bench_core.runner as runner
    from bench_core import manual
    from bench_core.models import BatchEnsembleMLP

    monkeypatch.setenv(manual.ENV_FIRST_LAYER_KERNEL, first_layer_kernel)
    compiles = be_batching == "repeat" and not manual.first_layer_kernel_on()

    notes_while_compiling = []
    monkeypatch.setattr(BatchEnsembleMLP, "kernels_warm", lambda self: False)  # as in a fresh worker
    monkeypatch.setattr(
        BatchEnsembleMLP,
        "warm_up_kernels",
        lambda self: notes_while_compiling.append(store.list_runs()[0]["note"]) or True,
    )
    cfg = tiny_config()
    cfg.model.be_batching = be_batching
    events = list(run_experiment(cfg, store=store, source="test"))
    messages = [e.message for e in events if e.kind == "phase"]
    if compiles:
        # The runner's call, with the note up; train's own call after it finds the kernel warm.
        assert notes_while_compiling[0] == runner.COMPILING_NOTE
        be_training = messages.index("training BatchEnsemble (repeat)")
        assert messages[be_training + 1] == runner.COMPILING_NOTE
        compiling = next(i for i, e in enumerate(events) if e.kind == "phase" and e.message == runner.COMPILING_NOTE)
        assert compiling < next(i for i, e in enumerate(events) if e.kind == "epoch" and e.method == "batchensemble")
    else:  # split batching with members, or the C++ steps' first-layer kernel in use: nothing to compile
        assert runner.COMPILING_NOTE not in messages
    assert store.list_runs()[0]["note"] is None
    assert events[-1].status == "finished"


@pytest.mark.parametrize(("switch", "note"), [("BENCH_COMPILE", "COMPILING_NOTE"), ("BENCH_NATIVE", "BUILDING_NOTE")])
def test_no_waiting_phase_where_its_fast_path_is_switched_off(store, monkeypatch, tmp_path, switch, note):
    """``BENCH_COMPILE=0``: no kernel to compile; ``BENCH_NATIVE=0``: nothing to build, even where nothing is built."""
    import bench_core.runner as runner
    from bench_core import kernels, native

    assert {kernels.ENV_SWITCH, native.ENV_SWITCH} == {"BENCH_COMPILE", "BENCH_NATIVE"}
    monkeypatch.setenv(switch, "0")
    if switch == native.ENV_SWITCH:
        monkeypatch.setenv(native.ENV_CACHE, str(tmp_path / "empty"))  # nothing built there
        assert not native.library_path().exists()
    events = list(run_experiment(tiny_config(), store=store, source="test"))
    assert getattr(runner, note) not in [e.message for e in events if e.kind == "phase"]
    assert events[-1].status == "finished"


def test_a_cpu_run_says_while_the_cpp_steps_are_built(store, monkeypatch):
    """The first run on a machine builds the C++ steps (about 15 s): a phase and the run's note, before any epoch."""
    import bench_core.runner as runner
    from bench_core import native

    notes_while_building = []
    monkeypatch.setattr(native, "is_ready", lambda: False)  # as on a machine that has not built them
    monkeypatch.setattr(native, "warm_up", lambda: notes_while_building.append(store.list_runs()[0]["note"]) or True)
    events = list(run_experiment(tiny_config(), store=store, source="test"))
    assert notes_while_building[0] == runner.BUILDING_NOTE
    building = next(i for i, e in enumerate(events) if e.kind == "phase" and e.message == runner.BUILDING_NOTE)
    assert building < next(i for i, e in enumerate(events) if e.kind == "epoch")
    assert store.list_runs()[0]["note"] is None
    assert events[-1].status == "finished"


def test_stopped_epoch_is_not_an_epoch_time():
    """A stop a few batches into epoch 3: the mean is over epochs 1 and 2, and the time ratio compares
    mean whole epochs, not a part run's seconds with a whole one's."""
    from bench_core.report import derived, ratios

    classic = {"epoch_seconds": [2.0, 4.0, 0.1], "epochs_done": 2, "stopped": True, "train_seconds": 6.1, "params": 30}
    be = {"epoch_seconds": [1.0, 1.0, 1.0], "epochs_done": 3, "stopped": False, "train_seconds": 3.0, "params": 10}
    assert derived(classic)["mean_epoch_seconds"] == 3.0
    assert derived(be)["mean_epoch_seconds"] == 1.0
    assert ratios({"classic": classic, "batchensemble": be}) == {"train_seconds": 3.0, "params": 3.0}
    cut_in_first = {**classic, "epoch_seconds": [0.1], "epochs_done": 0}
    assert "mean_epoch_seconds" not in derived(cut_in_first)
    assert ratios({"classic": cut_in_first, "batchensemble": be}) == {"params": 3.0}
    both_whole = {**classic, "stopped": False, "epochs_done": 3}
    assert ratios({"classic": both_whole, "batchensemble": be})["train_seconds"] == pytest.approx(6.1 / 3.0)


def test_uneven_epochs_are_told_from_even_ones():
    from bench_core.report import uneven_epochs

    assert uneven_epochs({"epoch_seconds": [1.1, 25.8, 1.13]}) == (1.13, 25.8), "one epoch 23x the median"
    assert uneven_epochs({"epoch_seconds": [1.0, 1.9, 1.2]}) is None, "under twice the median"
    assert uneven_epochs({"epoch_seconds": [1.0, 9.0]}) is None, "two epochs: no median to trust"
    stopped = {"epoch_seconds": [1.0, 1.0, 1.0, 0.1], "epochs_done": 3, "stopped": True}
    assert uneven_epochs(stopped) is None, "the stop's cut-short epoch is not a fast epoch"
    assert uneven_epochs({"epoch_seconds": [0.0, 0.0, 0.0]}) is None


def test_memory_needed_counts_data_models_and_a_step():
    """By hand: synthetic 800 + 200 examples of 36 features; MLP 36-16-16-10, E = 3, batch 64."""
    from bench_core.runner import memory_needed

    cfg = tiny_config()
    one = 36 * 16 + 16 + 16 * 16 + 16 + 16 * 10 + 10  # 1034
    classic = 4 * 3 * one + 2 * 64 * 3 * (16 + 16 + 10)  # weights, gradients, two moments; a step's activations
    be = 4 * ((36 * 16 + 16 * 16 + 16 * 10) + 3 * ((36 + 32) + (16 + 32) + (16 + 20))) + 2 * 64 * 3 * 42
    assert memory_needed(cfg) == 4 * ((800 + 200) * 36 + max(classic, be))


def test_a_run_larger_than_free_memory_is_refused_in_one_line():
    from bench_core.runner import check_memory, memory_needed, preflight

    cfg = tiny_config()
    need = memory_needed(cfg)
    check_memory(cfg, available=need)  # exactly enough: taken
    with pytest.raises(ConfigError, match=r"need at least .* GiB of memory, more than the .* free on this machine"):
        check_memory(cfg, available=need - 1)
    cfg.model.hidden, cfg.model.ensemble_size = 65_536, 256  # about 10^12 parameters: terabytes
    with pytest.raises(ConfigError, match=r"lower the ensemble size \(256\), hidden width \(65536\)"):
        preflight(cfg)
