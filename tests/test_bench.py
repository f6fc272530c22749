"""The speed benchmark: FLOP formula, floor arithmetic, a tiny run, the table, the CLI, the Speed page."""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bench_core import bench, manual
from bench_core.bench import (
    ROWS,
    STEP_PARTS,
    TIME_PARTS,
    BenchSettings,
    RowSpec,
    add_arguments,
    check_targets,
    compare_rows,
    derive_row,
    epoch_flops,
    floor_seconds,
    format_table,
    measure,
    noise_warnings,
    onednn_gemm_rate,
    plan_rows,
    repeats_text,
    run_benchmark,
    schedule,
    settings_from_args,
    step_parts,
    time_parts,
)
from bench_core.bench.breakdown import classify, part_seconds, shares
from bench_core.bench.settings import REWARM_STEPS
from bench_core.errors import BenchError
from bench_core.onednn import describe as describe_products
from bench_core.onednn import mkl_plain_layout

ROOT = Path(__file__).resolve().parent.parent
TINY = {
    "dataset_shape": "1x8x8",
    "ensemble_sizes": (1, 2),
    "steps": 3,
    "warmup": 1,
    "repeats": 1,
    "reference_repeats": 1,
    "train_examples": 1024,
    "inference_examples": 300,
    "threads": 1,  # tiny ops on a busy 2-core machine are far faster on one thread
}


@pytest.fixture
def one_thread():
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


# --- FLOPs and the floor -------------------------------------------------------------------------


def test_epoch_flops_hand_computed():
    # Layers 4->3 and 3->2, n = 10 examples, E = 2, repeat batching:
    #   first layer (no input grad): 2 passes * 2*10*4*3 = 480 per member
    #   second layer: 3 passes * 2*10*3*2 = 360 per member  -> (480 + 360) * 2 members = 1680
    assert epoch_flops([4, 3, 2], 10, ensemble_size=2, batching="repeat") == 1680
    # split: each member sees n / E = 5 examples, and r's gradient comes from each member's weight
    # gradient (no input-side product): (2 * 2*5*4*3 + 3 * 2*5*3*2) * 2 members = 840
    assert epoch_flops([4, 3, 2], 10, ensemble_size=2, batching="split") == 840
    # one member: split batching trains as repeat batching, no input-side product
    assert epoch_flops([4, 3, 2], 10, ensemble_size=1, batching="split") == 840
    # a single MLP
    assert epoch_flops([4, 3, 2], 10) == 840


def test_epoch_flops_seed_shape():
    # CIFAR-10, hidden 128, two hidden layers: per example per member
    # 4*3072*128 + 6*128*128 + 6*128*10 = 1,678,848 FLOPs.
    sizes = [3072, 128, 128, 10]
    assert epoch_flops(sizes, 50_000, ensemble_size=5) == 5 * 50_000 * 1_678_848


def test_conventional_flops_hand_computed():
    # The usual 3x-forward count: every layer 3 passes, the first layer's input gradient included.
    # Layers 4->3 and 3->2, n = 10, E = 2: 3 * 2*10*(4*3 + 3*2) = 1080 per member.
    assert epoch_flops([4, 3, 2], 10, ensemble_size=2, first_input_grad=True) == 2160
    assert epoch_flops([4, 3, 2], 10, ensemble_size=2, batching="split", first_input_grad=True) == 1080
    # The seed's shape: 3 * 2*(3072*128 + 128*128 + 128*10) = 2,465,280 per example and member,
    # 616 GFLOP an epoch for 5 members: the "about 4 s" at ~150 GFLOP/s.
    assert epoch_flops([3072, 128, 128, 10], 50_000, 5, first_input_grad=True) == 5 * 50_000 * 2_465_280


def test_floor_arithmetic():
    assert floor_seconds(3e9, 1.5e9) == pytest.approx(2.0)
    settings = BenchSettings(dataset_shape="1x2x2", hidden=3, depth=1, train_examples=10)
    raw = {"name": "classic-vectorized", "method": "classic", "mode": "vectorized", "ensemble_size": 2}
    raw["epoch_seconds"] = 4.0
    row = derive_row(raw, settings, rate=100.0)
    # sizes [4, 3, 10]: per member 2*2*10*4*3 + 3*2*10*3*10 = 480 + 1800; two members
    assert row["flops_per_epoch"] == 2 * (480 + 1800)
    assert row["floor_seconds"] == pytest.approx(45.6)
    assert row["x_floor"] == pytest.approx(4.0 / 45.6)
    # beside it, for information, the usual count: 2 * 3*2*10*(4*3 + 3*10) = 5040 FLOPs
    assert row["floor_seconds_3x_forward"] == pytest.approx(50.4)
    assert row["x_floor_3x_forward"] == pytest.approx(4.0 / 50.4)


def test_each_turn_over_its_floor_at_the_rate_measured_beside_it():
    settings = BenchSettings(dataset_shape="1x2x2", hidden=3, depth=1, train_examples=10)
    raw = {"name": "classic-vectorized", "method": "classic", "mode": "vectorized", "ensemble_size": 2}
    raw |= {"epoch_seconds": 4.0, "epoch_seconds_repeats": [4.0, 5.0, 3.0], "floor_rates_by_turn": [100.0, 50.0, 200.0]}
    row = derive_row(raw, settings, rate=100.0)
    # 4560 FLOPs strict, 5040 by 3x forward (test_floor_arithmetic): turn i over FLOPs / its own rate
    assert row["x_floor_by_turn"] == pytest.approx([4.0 / 45.6, 5.0 / 91.2, 3.0 / 22.8])
    assert row["x_floor_3x_forward_by_turn"] == pytest.approx([4.0 / 50.4, 5.0 / 100.8, 3.0 / 25.2])
    assert row["x_floor"] == pytest.approx(4.0 / 45.6), "the table's figure stays the rate at the start's"
    for rates in (None, [], [100.0, 50.0]):  # not measured, or not one per repeat: no figure by turn
        other = derive_row({**raw, "floor_rates_by_turn": rates}, settings, rate=100.0)
        assert "x_floor_by_turn" not in other and "x_floor_3x_forward_by_turn" not in other


def test_split_floor_is_a_single_models():
    # Split batching: E members of n/E examples each, so a single model's products; r's gradient
    # comes from each member's first-layer weight gradient, as the CPU steps compute it.
    settings = BenchSettings(dataset_shape="3x32x32")
    rows = {
        name: derive_row({"name": name, "ensemble_size": e, "epoch_seconds": 1.0}, settings, rate=1e9)
        for name, e in [("single", 1), ("batchensemble-split", 5), ("batchensemble-repeat", 5)]
    }
    split, single = rows["batchensemble-split"], rows["single"]
    assert split["flops_per_epoch"] == pytest.approx(single["flops_per_epoch"])
    assert split["floor_seconds_3x_forward"] == pytest.approx(single["floor_seconds_3x_forward"])
    assert rows["batchensemble-repeat"]["flops_per_epoch"] == pytest.approx(5 * single["flops_per_epoch"])


def test_onednn_rate_of_the_floors_product(monkeypatch):
    from bench_core import onednn
    from bench_core.bench import flops

    real = torch.ops.mkldnn._linear_pointwise
    onednn.reset()  # each case checks the op afresh; what a case breaks is forgotten after the test
    try:
        rate = onednn_gemm_rate(64, 48, 32, repeats=2)
        assert rate is not None and rate > 0  # this torch (x86, MKL-DNN on) has the op

        def missing(*args):
            raise RuntimeError("no kernel for this backend")

        onednn.reset()
        monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", missing)
        with pytest.warns(RuntimeWarning, match="oneDNN matrix products are off"):
            assert flops.onednn_gemm_rate(64, 48, 32, repeats=2) is None

        def wrong(x, weight, *args):  # a signature that changed meaning: its products are not x @ w
            return torch.zeros(x.size(0), weight.size(0))

        onednn.reset()
        monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", wrong)
        with pytest.warns(RuntimeWarning, match="differs from torch.mm's"):
            assert flops.onednn_gemm_rate(64, 48, 32, repeats=2) is None

        calls = []

        def fails_later(*args):
            calls.append(1)
            if len(calls) > 1:  # passes the check, then fails while timed
                raise RuntimeError("could not create a primitive")
            return real(*args)

        onednn.reset()
        monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", fails_later)
        with pytest.warns(RuntimeWarning, match="could not create a primitive"):
            assert flops.onednn_gemm_rate(64, 48, 32, repeats=2) is None, "torch.mm's time is not oneDNN's rate"
    finally:
        monkeypatch.undo()
        onednn.reset()


def test_onednn_lines_say_how_much_lower_the_floor_would_be():
    header = {"matmul_flops_per_second": 160e9, "onednn_matmul_flops_per_second": 200e9}
    (line,) = bench.onednn_lines(header)
    assert "200.0 GFLOP/s" in line and "1.25× torch.mm's" in line
    assert "every floor is 20 % shorter and every × floor 1.25× higher" in line  # a run whose floor was torch.mm's
    (sets,) = bench.onednn_lines({**header, "floor_flops_per_second": 200e9})
    assert "1.25× torch.mm's, and sets the floor" in sets
    assert "every floor would be 25 % longer and every × floor 0.80× as high" in sets
    assert bench.floor_rate(header) == 160e9 and bench.floor_rate({**header, "floor_flops_per_second": 200e9}) == 200e9
    (slower,) = bench.onednn_lines({**header, "onednn_matmul_flops_per_second": 150e9})
    assert slower.endswith("no faster: the floor is torch.mm's rate")
    assert bench.onednn_lines({**header, "onednn_matmul_flops_per_second": None}) == []  # CUDA, or no op
    assert bench.onednn_lines({"matmul_flops_per_second": 160e9}) == []  # a JSON from before the line


def test_table_of_a_stored_run_with_and_without_onednn_rate():
    """A JSON written before the oneDNN line prints as it did; with the rate, the classic floor line by it too."""
    data = json.loads((Path(__file__).parent.parent / "docs/bench/cpu-e5-2026-11-26-session7-run15.json").read_text())
    old = format_table(data["header"], data["rows"], data["targets"])
    assert "oneDNN" not in old and "classic vectorized's floor: strict" in old
    header = {**data["header"], "onednn_matmul_flops_per_second": 1.2 * data["header"]["matmul_flops_per_second"]}
    new = format_table(header, data["rows"], data["targets"])
    cv = next(r for r in data["rows"] if r["name"] == "classic-vectorized")
    assert f"by oneDNN's rate, classic vectorized is at {1.2 * cv['x_floor']:.2f}× its strict floor" in new
    assert f"{1.2 * cv['x_floor_3x_forward']:.2f}× by 3× forward" in new
    assert "every floor is 17 % shorter" in new
    header["floor_flops_per_second"] = header["onednn_matmul_flops_per_second"]  # a run that took oneDNN's rate
    rows = [
        {**r, "x_floor": 1.2 * r["x_floor"], "x_floor_3x_forward": 1.2 * r["x_floor_3x_forward"]} for r in data["rows"]
    ]
    taken = format_table(header, rows, data["targets"])
    assert "and sets the floor" in taken
    by_mm = f"by torch.mm's rate, as runs before the oneDNN rate had it, classic vectorized is at {cv['x_floor']:.2f}×"
    assert by_mm in taken


def _timed_row(name: str, ensemble_size: int, repeats: list[float] | None) -> dict:
    method, mode = bench.ROW_LABELS[name]
    row = {"name": name, "method": method, "mode": mode, "ensemble_size": ensemble_size}
    return row if repeats is None else {**row, "epoch_seconds_repeats": repeats}


def test_noise_warnings_name_a_busy_start_a_changed_rate_and_each_row_whose_repeats_spread():
    steady = {"load_average": 0.3, "cores": 2, "matmul_flops_per_second": 200e9, "matmul_flops_per_second_end": 170e9}
    rows = [_timed_row("classic-vectorized", 5, [3.3, 3.5, 4.1]), _timed_row("single", 1, [0.8])]
    assert noise_warnings(steady, rows) == [], "1.24x apart, 15 % slower at the end, one repeat: steady"
    (busy,) = noise_warnings({**steady, "load_average": 1.0}, rows)
    assert "busy when the benchmark started (load average 1.0 on 2 cores)" in busy
    (drift,) = noise_warnings({**steady, "matmul_flops_per_second_end": 150e9}, rows)
    assert "matmul rate changed by more than 20 %" in drift
    split = _timed_row("batchensemble-split", 5, [1.15, 1.86, 1.2])
    (spread,) = noise_warnings(steady, [*rows, split])
    assert "within a row: timed repeats more than 25 % apart (BatchEnsemble split E=5: 1.15–1.86 s)" in spread
    assert "classic" not in spread and "\n" not in spread
    sequential = _timed_row("classic-sequential", 5, [4.34, 7.31, 7.29])
    (two,) = noise_warnings(steady, [sequential, *rows, split])
    assert "within some rows" in two and "(classic sequential E=5: 4.34–7.31 s; BatchEnsemble split E=5:" in two
    assert noise_warnings(steady, [_timed_row("single", 1, [1.0, 1.25])]) == [], "1.25x is the limit, not over it"
    # The floor's rate beside classic vectorized's turns (the floor's rate at the start: torch.mm's here).
    beside = {**_timed_row("classic-vectorized", 5, [3.3, 3.5, 3.4]), "floor_rates_by_turn": [200e9, 230e9, 195e9]}
    assert noise_warnings(steady, [beside]) == [], "within 20 % of the start's and of each other"
    for rates in ([200e9, 241e9, 200e9], [166e9, 199e9, 200e9]):
        (drift,) = noise_warnings(steady, [{**beside, "floor_rates_by_turn": rates}])
        assert "matmul rate changed by more than 20 %" in drift, rates
    onednn_floor = {**steady, "floor_flops_per_second": 250e9}
    (drift,) = noise_warnings(onednn_floor, [beside])  # 195 against oneDNN's 250 at the start
    assert "matmul rate changed by more than 20 %" in drift
    assert noise_warnings(steady, [_timed_row("single", 1, None)]) == [], "a JSON from before repeats were kept"
    assert noise_warnings({}, [split]) == [spread], "the Speed page's live view, before the header"
    # The Speed page's smallest settings: figures from one step, one repeat.
    few = {**steady, "settings": {"steps": 1, "repeats": 1, "full_epoch": False}}
    (warned,) = noise_warnings(few, rows)
    assert warned.startswith("few measurements: 1 timed step per repeat and one repeat per row (no median")
    assert "at least 10 steps and 3 repeats" in warned
    (warned,) = noise_warnings({**steady, "settings": {"steps": 9, "repeats": 3}}, rows)
    assert warned.startswith("few measurements: 9 timed steps per repeat, so")
    (warned,) = noise_warnings({**steady, "settings": {"steps": 10, "repeats": 2}}, rows)
    assert warned == (
        "few measurements: two repeats per row (their median is their mean: one slow repeat moves it by half), so "
        "a moment's load on the machine weighs on each figure in full: for figures to compare, time at least 10 "
        "steps and 3 repeats"
    )
    assert noise_warnings({**steady, "settings": {"steps": 10, "repeats": 3}}, rows) == [], "enough"
    # The reference rows take repeats of their own: too few of them is said of them, where they were measured.
    two_reference = {**steady, "settings": {"steps": 10, "repeats": 9, "reference_repeats": 2}}
    reference = _timed_row("reference-classic", 5, [30.0, 31.0])
    (warned,) = noise_warnings(two_reference, [*rows, reference])
    assert warned.startswith("few measurements: two repeats per reference row (their median is their mean")
    assert noise_warnings(two_reference, rows) == [], "no reference row measured: nine repeats a row are enough"
    nine_reference = {**steady, "settings": {"steps": 10, "repeats": 1, "reference_repeats": 9}}
    (warned,) = noise_warnings(nine_reference, [*rows, reference])
    assert warned.startswith("few measurements: one repeat per row (no median"), "the fewer of the two is said"
    assert noise_warnings({**steady, "settings": {"steps": 1, "repeats": 3, "full_epoch": True}}, rows) == [], (
        "whole epochs: the steps setting is not used"
    )


def test_table_prints_each_noise_warning_on_its_own_line_under_the_header():
    data = json.loads((Path(__file__).parent.parent / "docs/bench/cpu-e5-2026-11-26-session13-run1.json").read_text())
    table = format_table(data["header"], data["rows"], data["targets"])
    warnings = [line for line in table.splitlines() if line.startswith("warning: ")]
    assert warnings == [f"warning: {w}" for w in noise_warnings(data["header"], data["rows"])]
    assert len(warnings) == 1 and "BatchEnsemble split E=5: 1.45–1.99 s" in warnings[0]
    assert table.index(warnings[0]) < table.index("method "), "under the header, above the table"


def test_table_of_a_gpu_run_gives_the_floor_in_significant_figures():
    """A GPU's floors are milliseconds: the note gives them to 3 significant figures, not as "0.01 s"."""
    data = json.loads((Path(__file__).parent.parent / "docs/bench/h100-graph-e5-session9.json").read_text())
    table = format_table(data["header"], data["rows"], data["targets"])
    cv = next(r for r in data["rows"] if r["name"] == "classic-vectorized")
    assert 0.001 < cv["floor_seconds"] < 0.01
    assert f"computes, {cv['floor_seconds']:.3g} s at this rate" in table
    assert f"{cv['floor_seconds_3x_forward']:.3g} s: it adds" in table
    assert "computes, 0.01 s at" not in table and "oneDNN's product" not in table  # no oneDNN line on CUDA


# --- comparisons and targets ---------------------------------------------------------------------


def _row(name, e, seconds, x_floor=1.0, x_floor_3x=None):
    method, mode = bench.ROW_LABELS[name]
    return {
        "name": name,
        "method": method,
        "mode": mode,
        "ensemble_size": e,
        "epoch_seconds": seconds,
        "x_floor": x_floor,
        **({"x_floor_3x_forward": x_floor_3x} if x_floor_3x is not None else {}),
    }


def test_compare_rows_and_targets():
    rows = compare_rows(
        [
            _row("classic-vectorized", 5, 2.0, x_floor=1.3, x_floor_3x=0.9),
            _row("batchensemble-repeat", 5, 2.1),
            _row("batchensemble-split", 5, 0.8),
            _row("reference-classic", 5, 10.0),
            _row("reference-batchensemble", 5, 4.0),
            _row("classic-vectorized", 2, 1.0),
        ]
    )
    by = {(r["name"], r["ensemble_size"]): r for r in rows}
    assert by[("batchensemble-repeat", 5)]["x_classic_vectorized"] == pytest.approx(1.05)
    assert by[("batchensemble-repeat", 5)]["speedup_over_reference"] == pytest.approx(4.0 / 2.1)
    assert by[("classic-vectorized", 5)]["speedup_over_reference"] == pytest.approx(5.0)
    assert by[("classic-vectorized", 2)]["speedup_over_reference"] is None
    assert by[("reference-classic", 5)]["speedup_over_reference"] is None
    targets = check_targets(rows)
    assert [t["met"] for t in targets] == [False, True, True, False, False, False]
    assert [t["value"] for t in targets] == pytest.approx([1.3, 0.9, 1.05, 0.4, 5.0, 4.0 / 2.1])
    assert all(t["met"] is None for t in check_targets(rows, ensemble_size=8))


def test_time_parts_add_up_to_the_epoch():
    floor, workers, rest = TIME_PARTS
    workbench = {"epoch_seconds": 3.0, "floor_seconds": 2.0}
    assert time_parts(workbench) == {floor: 2.0, workers: 0.0, rest: 1.0}
    seed = {"epoch_seconds": 40.0, "floor_seconds": 2.0, "worker_startup_seconds": 5.0}
    assert time_parts(seed) == {floor: 2.0, workers: 5.0, rest: 33.0}
    # A run faster than its floor (a rate measured in a slow moment) or a start-up longer than what
    # the floor leaves: each part is cut to what the epoch leaves, never negative.
    assert time_parts({"epoch_seconds": 1.5, "floor_seconds": 2.0}) == {floor: 1.5, workers: 0.0, rest: 0.0}
    cut = time_parts({"epoch_seconds": 4.0, "floor_seconds": 3.0, "worker_startup_seconds": 2.0})
    assert cut == {floor: 3.0, workers: 1.0, rest: 0.0}
    assert time_parts({**workbench, "worker_startup_seconds": None})[workers] == 0.0


# --- where a step goes ---------------------------------------------------------------------------


def _event(name, micros, parent=None):
    return SimpleNamespace(name=name, self_cpu_time_total=micros, cpu_parent=parent)


def test_step_parts_by_operator_and_ancestors():
    products, other, adam, draw, python = STEP_PARTS
    step = _event("ProfilerStep#1", 50.0)  # the window's own Python: the training loop between operators
    gather = _event("aten::index_select", 40.0, step)
    linear = _event("aten::linear", 3.0, step)
    addmm = _event("aten::addmm", 900.0, linear)
    node = _event("autograd::engine::evaluate_function: MmBackward0", 20.0, step)
    mm = _event("aten::mm", 700.0, _event("MmBackward0", 5.0, node))
    opt = _event("Optimizer.step#Adam.step", 30.0, step)
    zero = _event("Optimizer.zero_grad#Adam.zero_grad", 4.0, step)
    region = _event("Torch-Compiled Region: 0/0", 8.0, node)
    onednn = _event("mkldnn::_linear_pointwise", 300.0, step)  # the first layer's forward on a CPU
    events = [
        onednn,
        _event("aten::empty", 1.0, onednn),
        step,
        gather,
        _event("aten::empty", 2.0, gather),  # the gathered batch's allocation: the draw's
        linear,  # not a product itself: its own time is dispatch, an "other" operator's
        addmm,
        _event("aten::empty", 6.0, addmm),  # the product's output: the product's
        node,
        mm.cpu_parent,
        mm,
        _event("aten::mul", 80.0, node),
        _event("aten::relu", 25.0, step),
        opt,
        _event("aten::_fused_adam_", 150.0, opt),
        _event("aten::mul", 9.0, opt),  # an element-wise operator under the optimizer is Adam's
        zero,
        _event("aten::zero_", 11.0, zero),
        _event("aten::randperm", 7.0, step),
        _event("TorchDynamo Cache Lookup", 12.0, node),  # a compiled kernel's guards, then its region
        region,
        _event("## Call CompiledFxGraph abc ##", 60.0, region),
    ]
    assert [classify(e) for e in (gather, linear, addmm, mm, onednn, opt, zero, step, node)] == [
        draw, other, products, products, products, adam, adam, python, python
    ]  # fmt: skip
    seconds = part_seconds(events)
    expected = {
        products: 900 + 6 + 700 + 300 + 1,
        other: 3 + 80 + 25 + 12 + 8 + 60,
        adam: 30 + 150 + 9 + 4 + 11,
        draw: 40 + 2 + 7,
        python: 50 + 20 + 5,
    }
    assert seconds == pytest.approx({k: v / 1e6 for k, v in expected.items()})
    fractions = shares(seconds)
    assert sum(fractions.values()) == pytest.approx(1.0)
    assert fractions[products] == pytest.approx(1907 / sum(expected.values()))
    assert classify(region) == other, "a compiled kernel is element-wise work, not Python"
    with pytest.raises(ValueError, match="no time"):
        shares(dict.fromkeys(STEP_PARTS, 0.0))


def test_adams_direct_step_is_adams_part():
    """bench_core.optim's direct step has no optimizer record around it: its two ops are Adam's by name."""
    step = _event("ProfilerStep#1", 50.0)
    fused = _event("aten::_fused_adam_", 150.0, step)
    counts = _event("aten::_foreach_add_", 4.0, step)
    inside = _event("aten::empty", 1.0, fused)
    assert [classify(e) for e in (fused, counts, inside)] == ["Adam"] * 3
    native_adam = _event("bench_core::adam_step", 3.0, step)  # both, from C++ (bench_core.native)
    assert [classify(e) for e in (native_adam, _event("aten::_fused_adam_", 150.0, native_adam))] == ["Adam"] * 2
    assert classify(_event("aten::add_", 2.0, step)) == "element-wise and other operators"


def test_a_cpp_training_steps_own_time_is_operators_and_its_products_are_products():
    step = _event("ProfilerStep#1", 50.0)
    native_step = _event("bench_core::batchensemble_layers", 20.0, step)
    mm = _event("aten::mm", 700.0, native_step)
    mul = _event("aten::mul", 30.0, native_step)
    assert classify(native_step) == "element-wise and other operators", "C++ between operators, not Python"
    assert classify(mm) == "matrix products"
    assert classify(mul) == "element-wise and other operators"


def test_step_parts_of_a_row_are_its_shares_of_the_timed_epoch():
    fractions = dict(zip(STEP_PARTS, (0.5, 0.2, 0.1, 0.05, 0.15), strict=True))
    row = {"epoch_seconds": 4.0, "step_shares": fractions}
    assert step_parts(row) == pytest.approx(dict(zip(STEP_PARTS, (2.0, 0.8, 0.4, 0.2, 0.6), strict=True)))
    assert sum(step_parts(row).values()) == pytest.approx(4.0)
    assert step_parts({"epoch_seconds": 4.0}) is None, "a reference row, or a file from before profiling"
    assert step_parts({"epoch_seconds": 4.0, "step_shares": None}) is None, "a GPU row or --profile-steps 0"


def test_profiled_steps_of_a_real_row(one_thread):
    settings = BenchSettings(**{**TINY, "profile_steps": 4}).validate()
    row = measure.measure_row(RowSpec("batchensemble-repeat", 2), settings)
    assert list(row["step_shares"]) == list(STEP_PARTS)
    assert sum(row["step_shares"].values()) == pytest.approx(1.0)
    for part in ("matrix products", "element-wise and other operators", "Adam", "batch draw"):
        assert row["step_shares"][part] > 0, part
    assert row["profiled_step_seconds"] > 0
    off = measure.measure_row(RowSpec("batchensemble-repeat", 2), BenchSettings(**{**TINY, "profile_steps": 0}))
    assert off["step_shares"] is None and off["profiled_step_seconds"] is None


@pytest.mark.parametrize(
    ("name", "n_members", "warmed"),
    [("batchensemble-repeat", 2, True), ("batchensemble-split", 1, True), ("batchensemble-split", 2, False)],
)
def test_the_kernel_is_warmed_before_the_memory_probe(name, n_members, warmed, monkeypatch, one_thread):
    """Importing inductor is resident memory of the process, not of training: a row that training
    would compile the kernel for (repeat batching, and split with one member, which trains as
    repeat; with the C++ steps' first-layer kernel off, which replaces it on AVX-512 CPUs) compiles
    it before its memory probe starts, and says so in its progress; split with members compiles nothing."""
    from bench_core import kernels, manual

    monkeypatch.setenv(manual.ENV_FIRST_LAYER_KERNEL, "0")
    events = []
    monkeypatch.setattr(kernels, "is_warm", lambda *args: False)  # as in the row's fresh process
    monkeypatch.setattr(kernels, "warm_up", lambda *args, **kwargs: events.append("warm") or False)
    start = measure.MemoryProbe.start
    monkeypatch.setattr(measure.MemoryProbe, "start", lambda self: events.append("probe") or start(self))

    def report(fraction, message):
        if "compiling" in message:
            events.append("says so")

    measure.measure_row(RowSpec(name, n_members), BenchSettings(**{**TINY, "profile_steps": 0}), report)
    assert events[:3] == (["says so", "warm", "probe"] if warmed else ["probe"])
    assert events.count("probe") == 1
    monkeypatch.setenv(manual.ENV_FIRST_LAYER_KERNEL, "1")
    events.clear()
    measure.measure_row(RowSpec(name, n_members), BenchSettings(**{**TINY, "profile_steps": 0}), report)
    assert events[:3] == (["says so", "warm", "probe"] if warmed and not manual.first_layer_kernel_on() else ["probe"])


@pytest.mark.parametrize("vendor", ["AuthenticAMD", "GenuineIntel"])
def test_onednn_is_checked_before_the_memory_probe(vendor, monkeypatch, one_thread):
    """oneDNN's set-up is the process's memory, not training's: its first use comes before the probe.
    On an Intel CPU training leaves it out (bench_core.onednn): nothing of it is set up."""
    from bench_core import onednn

    monkeypatch.delenv(onednn.ENV_SWITCH, raising=False)
    monkeypatch.setitem(onednn._vendor, "id", vendor)
    events = []
    real_check = onednn._self_check
    monkeypatch.setattr(onednn, "_self_check", lambda: events.append("check") or real_check())
    start = measure.MemoryProbe.start
    monkeypatch.setattr(measure.MemoryProbe, "start", lambda self: events.append("probe") or start(self))
    onednn.reset()
    try:
        measure.measure_row(RowSpec("batchensemble-split", 2), BenchSettings(**{**TINY, "profile_steps": 0}))
    finally:
        onednn.reset()
    assert events == (["probe"] if vendor == "GenuineIntel" else ["check", "probe"])


PROBE_AFTER_FREED_HEAP = """
import torch
from bench_core.bench import measure

big = torch.ones(5_000_000)  # 20 MB, mmapped; freeing it raises glibc's mmap and trim thresholds
del big
bufs = [torch.ones(250_000) for _ in range(30)]  # 1 MB each, now from the heap
del bufs  # 30 MB free at the heap's top, under the raised trim threshold: still resident
probe = measure.MemoryProbe(torch.device("cpu"))
probe.start()
again = [torch.ones(250_000) for _ in range(30)]  # training's allocations, reusing them
print(probe.method, "|", probe.peak_mib())
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS through /proc (Linux)")
def test_the_memory_probe_counts_memory_that_reuses_the_freed_heap():
    """30 MB allocated after the probe starts count as about 30 MB, though the heap had them free.

    Without handing the free heap back first (``_release_free_heap``) this script measured 0.0 MiB
    here, and the rows' peaks varied from run to run with what the process had freed before.
    """
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and not k.startswith("MALLOC_")}  # plain glibc
    proc = subprocess.run(
        [sys.executable, "-c", PROBE_AFTER_FREED_HEAP],
        capture_output=True,
        text=True,
        env={**env, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    method, peak = proc.stdout.split(" | ")
    if method != "peak RSS (VmHWM)":
        pytest.skip(f"the probe measures {method} here")
    assert float(peak) > 25, proc.stdout


def test_targets_turn_by_turn():
    # Repeat i of every row of one E ran in turn i: each target's figure per turn, beside the medians' verdict.
    classic = {
        **_row("classic-vectorized", 5, 2.0, x_floor=1.0, x_floor_3x=0.5),
        "floor_seconds": 2.0,
        "floor_seconds_3x_forward": 4.0,
        "epoch_seconds_repeats": [2.2, 2.0, 1.8],
    }
    rows = compare_rows(
        [
            classic,
            {**_row("batchensemble-repeat", 5, 2.1), "epoch_seconds_repeats": [2.2, 2.1, 2.7]},
            {**_row("batchensemble-split", 5, 0.8), "epoch_seconds_repeats": [0.8, 0.9]},  # one repeat short
            {**_row("reference-batchensemble", 5, 4.2), "epoch_seconds_repeats": [4.4, 4.2, 5.4]},
            {**_row("reference-classic", 5, 40.0), "epoch_seconds_repeats": [44.0, 40.0]},  # its own, fewer repeats
        ]
    )
    targets = check_targets(rows)
    turns = [t["per_turn"] for t in targets]
    assert turns[0] == pytest.approx([1.1, 1.0, 0.9])  # repeats / strict floor
    assert turns[1] == pytest.approx([0.55, 0.5, 0.45])  # repeats / 3x-forward floor
    assert turns[2] == pytest.approx([1.0, 1.05, 1.5])  # BatchEnsemble repeat / classic, turn by turn
    assert turns[3] == pytest.approx([0.8 / 2.2, 0.9 / 2.0])  # over the turns both took, turn i with turn i
    assert turns[4] == pytest.approx([20.0, 20.0])  # reference classic / classic vectorized: its 2 turns
    assert turns[5] == pytest.approx([2.0, 2.0, 2.0])  # reference / BatchEnsemble repeat
    assert bench.target_line(targets[2]) == (
        "[  met  ] BatchEnsemble repeat ≤ 1.1× classic vectorized: 1.05× (turn by turn: 1.00, 1.05, 1.50)"
    )
    assert bench.target_line(targets[3]) == (
        "[NOT met] BatchEnsemble split ≤ 0.35× classic vectorized: 0.40× (turn by turn: 0.36, 0.45)"
    )
    assert bench.target_line(targets[4]) == (
        "[  met  ] classic vectorized ≥ 6× faster than reference classic: 20.00× (turn by turn: 20.00, 20.00)"
    )
    del rows[-1]  # no reference classic row
    assert bench.target_line(check_targets(rows)[4]).endswith("reference classic: row missing")
    one_turn = {**targets[2], "per_turn": [1.05]}
    assert "turn by turn" not in bench.target_line(one_turn)
    near = {**targets[0], "value": 1.2549, "met": False, "per_turn": [1.2549, 1.2449]}
    assert bench.target_line(near).endswith(": 1.255× (turn by turn: 1.255, 1.24)"), "never '1.25' beside NOT met"
    assert bench.value_text(1.25, 1.25) == "1.25" and bench.value_text(0.3012, 0.35) == "0.30"
    assert bench.value_text(1.25004, 1.25) == "1.25004" and bench.value_text(0.99996, 1.0) == "0.99996"


def test_the_floor_targets_again_by_the_rate_beside_each_turn():
    classic = {
        **_row("classic-vectorized", 5, 2.0, x_floor=1.3, x_floor_3x=0.9),
        "x_floor_by_turn": [1.2, 1.3, 1.0],
        "x_floor_3x_forward_by_turn": [1.3, 0.8, 1.26],
    }
    targets = check_targets(compare_rows([classic]))
    assert [t["target"] for t in targets[2:4]] == [
        "classic vectorized ≤ 1.25× its floor (strict count, rate measured beside each turn)",
        "classic vectorized ≤ 1.25× its floor (3× forward count, rate measured beside each turn)",
    ]
    assert [t["value"] for t in targets[:4]] == pytest.approx([1.3, 0.9, 1.2, 1.26]), "the turns' medians"
    assert [t["met"] for t in targets[:4]] == [False, True, True, False]
    assert targets[2]["per_turn"] == pytest.approx([1.2, 1.3, 1.0])
    assert bench.target_line(targets[3]) == (
        "[NOT met] classic vectorized ≤ 1.25× its floor (3× forward count, rate measured beside each turn): "
        "1.26× (turn by turn: 1.30, 0.80, 1.26)"
    )
    assert "repeat ≤ 1.1×" in targets[4]["target"], "then the other targets, as before"
    unpaired = check_targets(compare_rows([_row("classic-vectorized", 5, 2.0)]))  # a JSON from before, or no row
    assert len(unpaired) == 6 and not any("beside" in t["target"] for t in unpaired)
    assert len(check_targets([])) == 6


def test_the_floors_rate_is_measured_just_before_and_after_each_timed_turn_of_classic_vectorized(
    monkeypatch, one_thread
):
    events, rates = [], iter([300e9, 200e9, 250e9, 260e9])
    gate = schedule._ThreadRow._gate
    monkeypatch.setattr(
        schedule._ThreadRow, "_gate", lambda self, phase: events.append((self.spec.name, phase)) or gate(self, phase)
    )
    monkeypatch.setattr(schedule, "turn_rate", lambda header, device: events.append("rate") or next(rates))
    rows = ("classic-vectorized", "batchensemble-split")
    tiny = {**TINY, "ensemble_sizes": (2,), "repeats": 2}
    settings = BenchSettings(**tiny, rows=rows, reference=False, isolate=False)
    done = list(run_benchmark(settings))[-1]
    cv, split = "classic-vectorized", "batchensemble-split"
    assert events == [
        *[(cv, "repeat 1"), (split, "repeat 1")],  # set-up and warm-up: no rate
        *["rate", (cv, "repeat 2"), "rate", (split, "repeat 2")],  # just before and just after its timed repeat
        *["rate", (cv, "finish"), "rate", (split, "finish")],
    ]
    by_name = {r["name"]: r for r in done.rows}
    assert by_name[cv]["floor_rates_by_turn"] == [300e9, 260e9], "the faster of the two beside each turn"
    assert "floor_rates_by_turn" not in by_name[split] and "x_floor_by_turn" not in by_name[split]
    assert len(by_name[cv]["x_floor_by_turn"]) == 2
    table = format_table(done.header, done.rows, done.targets)
    assert "the floor's rate beside classic vectorized's timed turns (fastest of 5 timings just before and 5 " in table
    assert "each, 2 turns): 260.0–300.0 GFLOP/s" in table


def test_plan_rows_single_once_and_no_reference():
    specs = plan_rows(BenchSettings(ensemble_sizes=(2, 4), reference=False))
    assert specs[0] == RowSpec("single", 1)
    assert [s.name for s in specs].count("single") == 1
    assert not any(s.name.startswith("reference") for s in specs)
    assert len(specs) == 1 + 2 * 4


@pytest.mark.parametrize(
    "change",
    [
        {"ensemble_sizes": (0,)},
        {"ensemble_sizes": ()},
        {"steps": 0},
        {"repeats": 0},
        {"reference_repeats": 0},
        {"rows": ("bogus",)},
        {"dataset_shape": "3x0x2"},
        {"rows": ("reference-classic",), "reference": False},
        {"batch_size": 4, "ensemble_sizes": (8,)},
        {"depth": 3},  # the reference rows are the seed's 2-hidden-layer models
        {"device": "tpu"},
        {"profile_steps": -1},
        {"dataset_shape": "5x4x4"},  # the reference rows' PIL images take 1 to 4 channels
    ],
)
def test_bad_settings_raise(change):
    with pytest.raises(BenchError) as info:
        BenchSettings(**change).validate()
    assert "\n" not in str(info.value)


# --- a tiny benchmark, in this process -----------------------------------------------------------


def test_tiny_benchmark_every_row(one_thread):
    settings = BenchSettings(**TINY, isolate=False)
    events = list(run_benchmark(settings))
    kinds = [e.kind for e in events]
    assert kinds[0] == "progress"
    assert kinds[-1] == "done"
    assert "header" in kinds
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions)
    done = events[-1]
    assert not done.stopped
    names = {(r["name"], r["ensemble_size"]) for r in done.rows}
    expected = {("single", 1)} | {(name, e) for name in ROWS if name != "single" for e in (1, 2)}
    assert names == expected
    for row in done.rows:
        for key in ("epoch_seconds", "floor_seconds", "x_floor", "inference_examples_per_second", "flops_per_epoch"):
            assert row[key] > 0, (row["name"], key)
        assert row["params"] > 0
        assert row["peak_mib"] is None, "rows in one process share its peak counter: none is its own"
        assert row["steps_per_epoch"] >= row["timed_steps"] > 0
    cv = next(r for r in done.rows if r["name"] == "classic-vectorized" and r["ensemble_size"] == 2)
    assert cv["x_classic_vectorized"] == pytest.approx(1.0)
    for row in done.rows:  # the floor's rate again beside each timed turn of classic vectorized only
        beside = row.get("floor_rates_by_turn")
        if row["name"] == "classic-vectorized":
            assert len(beside) == len(row["epoch_seconds_repeats"]) == 1 and beside[0] > 0
            assert row["x_floor_by_turn"] == pytest.approx([row["epoch_seconds"] / row["flops_per_epoch"] * beside[0]])
        else:
            assert beside is None, row["name"]
    assert cv["speedup_over_reference"] > 0
    # 1024 examples, batch 128: 8 steps per epoch; split with E = 2 also 8; sequential E = 2: 2 passes.
    seq = next(r for r in done.rows if r["name"] == "classic-sequential" and r["ensemble_size"] == 2)
    assert (seq["timed_steps"], seq["steps_per_epoch"]) == (6, 16)
    json.loads(json.dumps([e.to_dict() for e in events]))  # every event is plain JSON
    table = format_table(done.header, done.rows, done.targets)
    for label in ("single", "vectorized", "sequential", "repeat", "split", "reference", "× floor", "matmul rate"):
        assert label in table
    assert "\nBatchEnsemble  repeat" in table and "\nbatchensemble" not in table, "spelt as every page spells it"
    assert "\nreference      BatchEnsemble" in table and " batchensemble " not in table
    onednn = done.header["onednn_matmul_flops_per_second"]  # a CPU run
    assert onednn > 0 and "oneDNN's product" in table
    assert done.header["products"] == describe_products()  # which library trains, on this CPU
    assert f"first layers' products in training: {done.header['products']}" in table
    assert "products in training" not in format_table({**done.header, "products": None}, done.rows)  # CUDA, old JSON
    rate = done.header["floor_flops_per_second"]
    assert rate == max(onednn, done.header["matmul_flops_per_second"])  # the floor: the faster rate
    for row in done.rows:
        assert row["floor_seconds"] == pytest.approx(row["flops_per_epoch"] / rate)
    assert "targets: stated for E = 5; add 5 to --ensemble-sizes to check them" in table  # E = 5 not measured
    assert "peak MiB: not measured (--in-process" in table
    rows_table = table[table.index("method ") :].split("\n\n")[0].splitlines()[2:]  # under its title and rule
    rows_table = [line for line in rows_table if line != bench.SPLIT_VS_REFERENCE]  # the note under it
    assert rows_table and all(line.rstrip().endswith("—") for line in rows_table), "no peak MiB"
    assert bench.SPLIT_VS_REFERENCE in table, "split's speed-up over the reference is not like for like"
    for row in done.rows:  # where a step goes: the workbench's rows, on this CPU
        if row["method"] == "reference":
            assert "step_shares" not in row and step_parts(row) is None
        else:
            assert sum(step_parts(row).values()) == pytest.approx(row["epoch_seconds"]), row["name"]
    section = table.split("where a step goes")[1].splitlines()
    workbench = [r for r in done.rows if r["method"] != "reference"]
    lines = [line for line in section if line.split()[:1] in (["single"], ["classic"], ["BatchEnsemble"])]
    assert len(lines) == len(workbench), "one line per profiled row"
    assert all(line.count("%") == len(STEP_PARTS) for line in lines)
    assert set(done.header["model_gemm_flops_per_second"]["2"]["split"]) == {"forward", "weight_grad", "input_grad"}
    assert re.search(r"E=2: \d+/\d+ \(split \d+/\d+/\d+\)", table)
    old_header = {**done.header, "model_gemm_flops_per_second": {"2": {"forward": 1e9, "weight_grad": 2e9}}}
    old_table = format_table(old_header, done.rows)  # a JSON of an earlier run, without the split rates
    assert "E=2: 1/2" in old_table and "E=2: 1/2 (split" not in old_table
    assert "forward E·h×in @ in×B /" in old_table, "measured in zᵀ = Wᵀ xᵀ before the layout was named"
    plain = mkl_plain_layout()  # the forward as this CPU's training lays it out
    assert f"forward {'B×in @ in×E·h' if plain else 'E·h×in @ in×B'} /" in table
    assert done.header["steps"] == manual.describe_cpu_steps()  # on a CPU: the written-out steps' path
    assert f"workbench training steps: {done.header['steps']}" in table
    eager = {**done.header, "steps": "eager"}  # a JSON from before the CPU's path was named
    assert "training steps" not in format_table(eager, done.rows)
    cuda_header = {**done.header, "steps": "each full-batch step replayed as one CUDA graph"}
    assert "workbench training steps: each full-batch step replayed" in format_table(cuda_header, done.rows)


def test_an_untimed_first_epoch_is_left_out_of_the_repeats(monkeypatch, one_thread):
    """On CUDA with graphs the timed call's first epoch captures the graph: it runs, untimed."""
    from bench_core import training

    assert bench.untimed_epochs(torch.device("cpu"), True) == 0
    assert bench.untimed_epochs(torch.device("cuda"), True) == 1
    assert bench.untimed_epochs(torch.device("cuda"), False) == 0
    calls = []
    real_train = training.train

    def spy(model, data, cfg, **kwargs):
        calls.append(cfg.epochs)
        yield from real_train(model, data, cfg, **kwargs)

    monkeypatch.setattr(training, "train", spy)
    monkeypatch.setattr(measure, "untimed_epochs", lambda device, graph: 1)
    settings = BenchSettings(**{**TINY, "repeats": 2}, isolate=False, reference=False)
    row = bench.measure_row(RowSpec("classic-vectorized", 2), settings)
    # The warm-up call, then 1 untimed + 2 timed epochs, then the profiled call (1 unrecorded + 1 recorded).
    assert calls == [1, 3, 2]
    assert len(row["epoch_seconds_repeats"]) == 2


@pytest.mark.parametrize(("warmup", "full_epoch", "rewarm"), [(1, False, 1), (0, False, 0), (2, True, 1)])
def test_each_timed_repeat_starts_with_an_untimed_step_where_warm_up_is_asked(
    warmup, full_epoch, rewarm, monkeypatch, one_thread
):
    """Rows take turns, so each timed repeat starts cold: first REWARM_STEPS untimed steps (none without warm-up)."""
    from bench_core import training

    assert REWARM_STEPS == 1
    monkeypatch.setattr(schedule, "gemm_rate", lambda *a, **k: 1e10)
    monkeypatch.setattr(schedule, "onednn_gemm_rate", lambda *a, **k: None)
    untimed = []
    real_train = training.train

    def spy(model, data, cfg, **kwargs):
        untimed.append(kwargs.get("untimed_steps", 0))
        yield from real_train(model, data, cfg, **kwargs)

    monkeypatch.setattr(training, "train", spy)
    settings = BenchSettings(**{**TINY, "warmup": warmup, "full_epoch": full_epoch, "profile_steps": 0})
    settings.isolate, settings.reference = False, False
    bench.measure_row(RowSpec("batchensemble-split", 2), settings)
    assert untimed == ([0] if warmup else []) + [rewarm]  # the warm-up call (if any), then the timed one
    assert settings.rewarm_steps() == rewarm
    header = schedule.machine_header(settings)
    assert header["rewarm_steps"] == rewarm
    said = {
        (1, False): "extrapolated from 3 timed steps after 1 warm-up step; each repeat starts with 1 untimed step more",
        (0, False): "extrapolated from 3 timed steps",
        (2, True): "timed whole epochs; each starts with 1 untimed step",
    }
    assert header["epochs"] == said[(warmup, full_epoch)]
    table = format_table(header, [])
    assert f"s/epoch: {header['epochs']}, one repeat" in table  # the warm-up said once
    if not full_epoch:  # a JSON from before the untimed steps: its warm-up said as it was
        old = {k: v for k, v in header.items() if k != "rewarm_steps"}
        old["epochs"] = "extrapolated from 3 timed steps"
        line = f"s/epoch: extrapolated from 3 timed steps (after {warmup} warm-up steps), one repeat"
        assert line in format_table(old, [])


def test_stop_ends_early_with_rows_so_far(monkeypatch, one_thread):
    monkeypatch.setattr(schedule, "gemm_rate", lambda *a, **k: 1e10)
    stop = threading.Event()
    settings = BenchSettings(**TINY, isolate=False, reference=False)
    rows = []
    for event in run_benchmark(settings, stop):
        if event.kind == "row":
            rows.append(event.row)
            stop.set()  # the rows of E = 1 were measured together: they all come; E = 2 does not start
        last = event
    assert last.kind == "done"
    assert last.stopped
    assert len(last.rows) == len(rows) == 5
    assert {r["ensemble_size"] for r in rows} == {1}


def test_stop_within_a_group_abandons_its_rows(monkeypatch, one_thread):
    monkeypatch.setattr(schedule, "gemm_rate", lambda *a, **k: 1e10)
    stop = threading.Event()
    settings = BenchSettings(**{**TINY, "ensemble_sizes": (2,)}, isolate=False, reference=False)
    for event in run_benchmark(settings, stop):
        if "classic vectorized E=2: repeat 1" in event.message:
            stop.set()
        last = event
    assert last.kind == "done" and last.stopped and last.rows == []


# --- the command line ----------------------------------------------------------------------------


def _cli(*args, timeout=300, **env_vars):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **env_vars)
    return subprocess.run(
        [sys.executable, "-m", "bench_core", "bench", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    ("args", "word"),
    [
        (["--ensemble-sizes", "0"], "ensemble size"),
        (["--steps", "-1"], "steps"),
        (["--methods", "bogus"], "bogus"),
        (["--profile-steps", "-2"], "profiled steps"),
        (["--reference-repeats", "0"], "reference repeats"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(args, word):
    proc = _cli(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert word in lines[0]
    assert proc.stdout == ""


@pytest.mark.parametrize(
    ("args", "word"),
    [
        (["--dataset-shape", "cifar100"], "cifar100"),
        (["--batch-size", "4", "--ensemble-sizes", "8"], "split"),
        (["--depth", "3"], "reference"),
        (["--ensemble-sizes", "2,x"], "ensemble size"),
        (["--json", "/nonexistent-folder/out.json", "--no-reference"], "nonexistent"),
        (["--batch-size", "1000000000000", "--no-reference"], "larger than the 50000 training examples"),
        (["--json", str(ROOT), "--no-reference"], "it is a folder"),  # was found only after the benchmark
        (["--progress-jsonl", str(ROOT), "--no-reference"], "--progress-jsonl"),
    ],
)
def test_cli_bad_input_in_process(args, word, capsys):
    from bench_core.cli import main

    try:
        status = main(["bench", *args])
    except SystemExit as exc:  # argparse's own errors
        status = exc.code
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert word in err[0]


def test_rows_of_one_ensemble_size_take_turns(monkeypatch, one_thread):
    turns = []
    gate = schedule._ThreadRow._gate
    monkeypatch.setattr(
        schedule._ThreadRow, "_gate", lambda self, phase: turns.append((self.spec, phase)) or gate(self, phase)
    )
    methods = ("single", "classic-vectorized", "batchensemble-split")
    settings = BenchSettings(**{**TINY, "repeats": 2}, rows=methods, reference=False, isolate=False)
    done = list(run_benchmark(settings))[-1]
    assert [(r["name"], r["ensemble_size"]) for r in done.rows] == [
        ("single", 1),
        ("classic-vectorized", 1),
        ("batchensemble-split", 1),
        ("classic-vectorized", 2),
        ("batchensemble-split", 2),
    ]
    e1 = [RowSpec(name, 1) for name in methods]
    e2 = [RowSpec(name, 2) for name in methods[1:]]
    # Each row of a group stops at the same gates in turn; E = 2 starts once E = 1 is done.
    expected = [(spec, phase) for group in (e1, e2) for phase in ("repeat 1", "repeat 2", "finish") for spec in group]
    assert turns == expected


def test_reference_rows_take_their_own_repeats_and_leave_the_turns_when_theirs_are_done(monkeypatch, one_thread):
    turns = []
    gate = schedule._ThreadRow._gate
    monkeypatch.setattr(
        schedule._ThreadRow, "_gate", lambda self, phase: turns.append((self.spec.name, phase)) or gate(self, phase)
    )
    methods = ("classic-vectorized", "reference-batchensemble")
    tiny = {**TINY, "ensemble_sizes": (2,), "repeats": 3, "reference_repeats": 1, "steps": 2, "warmup": 0}
    settings = BenchSettings(**tiny, rows=methods, isolate=False)
    done = list(run_benchmark(settings))[-1]
    cv, ref = methods
    assert turns == [
        *[(cv, "repeat 1"), (ref, "repeat 1")],
        *[(cv, "repeat 2"), (ref, "finish")],  # its one repeat done: its inference pass, in its turn
        (cv, "repeat 3"),
        (cv, "finish"),
    ]
    by_name = {r["name"]: r for r in done.rows}
    assert len(by_name[cv]["epoch_seconds_repeats"]) == 3 and len(by_name[ref]["epoch_seconds_repeats"]) == 1
    assert len(by_name[cv]["floor_rates_by_turn"]) == 3
    table = format_table(done.header, done.rows, done.targets)
    assert ", median of 3 repeats (reference rows: one); reference rows: the seed's DataLoader pipeline" in table


def test_repeats_default_to_nine_for_the_workbench_rows_and_three_for_the_reference_rows():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    settings = settings_from_args(parser.parse_args([]))
    assert (settings.repeats, settings.reference_repeats) == (9, 3)
    given = settings_from_args(parser.parse_args(["--repeats", "5", "--reference-repeats", "2"]))
    assert (given.repeats, given.reference_repeats) == (5, 2)
    # A benchmark saved before the reference rows had repeats of their own measured every row `repeats` times.
    assert BenchSettings.from_dict({"repeats": 7}).reference_repeats == 7
    assert BenchSettings.from_dict({"repeats": 7, "reference_repeats": 2}).reference_repeats == 2
    assert BenchSettings.from_dict({}).reference_repeats == 3


BOTH_KINDS = ["single", "reference-classic"]


@pytest.mark.parametrize(
    ("settings", "names", "text"),
    [
        ({"repeats": 9, "reference_repeats": 3}, BOTH_KINDS, ", median of 9 repeats (reference rows: 3)"),
        ({"repeats": 9, "reference_repeats": 3}, ["single"], ", median of 9 repeats"),
        ({"repeats": 3, "reference_repeats": 3}, BOTH_KINDS, ", median of 3 repeats"),
        ({"repeats": 1, "reference_repeats": 3}, BOTH_KINDS, ", one repeat (reference rows: 3)"),
        ({"repeats": 3}, BOTH_KINDS, ", median of 3 repeats"),  # saved before reference_repeats
        ({"repeats": 1}, ["single"], ", one repeat"),
    ],
)
def test_the_header_says_how_many_repeats_each_kind_of_row_took(settings, names, text):
    assert repeats_text(settings, [{"name": n} for n in names]) == text


def test_cuda_graph_option():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert settings_from_args(parser.parse_args([])).cuda_graph is True
    assert settings_from_args(parser.parse_args(["--no-cuda-graph"])).cuda_graph is False
    assert BenchSettings.from_dict({"cuda_graph": False}).cuda_graph is False


def test_cli_tiny_run_in_row_processes(tmp_path):
    """On a machine where the C++ steps are not built yet: the command builds them first, and says so."""
    from bench_core import native

    out, progress = tmp_path / "bench.json", tmp_path / "progress.jsonl"
    proc = _cli(
        *("--dataset-shape", "1x8x8", "--ensemble-sizes", "2", "--methods", "batchensemble-split"),
        *("--no-reference", "--steps", "2", "--warmup", "1", "--repeats", "1", "--train-examples", "512"),
        *("--inference-examples", "100", "--threads", "1", "--json", str(out), "--progress-jsonl", str(progress)),
        **{native.ENV_CACHE: str(tmp_path / "native")},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith(f"[  0%] {native.BUILDING_NOTE}\n"), proc.stderr
    if native.compiler() is not None:  # without one: a warning, and the rows train with the Python steps
        lines = proc.stderr.splitlines()
        assert lines[1:3] == ["[  0%] measuring the matrix-multiply rate", "[  0%] matmul rate measured"], lines
        assert len(list((tmp_path / "native").glob("*.so"))) == 1, "built once, by the command, for its rows"
    assert "split" in proc.stdout
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["rows"]] == ["batchensemble-split"]
    assert data["header"]["matmul_flops_per_second"] > 0
    assert all(r["peak_mib"] >= 0 and r["epoch_seconds"] > 0 for r in data["rows"])
    events = [json.loads(line) for line in progress.read_text().splitlines()]
    assert events[-1]["kind"] == "done"
    assert sum(e["kind"] == "row" for e in events) == 1


def test_row_processes_take_turns(tmp_path):
    progress, out = tmp_path / "progress.jsonl", tmp_path / "bench.json"
    proc = _cli(
        *("--dataset-shape", "1x8x8", "--ensemble-sizes", "2", "--methods", "classic-vectorized,batchensemble-split"),
        *("--no-reference", "--steps", "2", "--warmup", "1", "--repeats", "2", "--train-examples", "512"),
        *("--inference-examples", "100", "--threads", "1", "--progress-jsonl", str(progress), "--json", str(out)),
    )
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in progress.read_text().splitlines()]
    firsts = {}
    for e in events:
        if e["kind"] == "progress" and " E=2: " in e["message"]:
            label, message = e["message"].split(": ", 1)
            firsts.setdefault(label, message)
    assert firsts == dict.fromkeys(["classic vectorized E=2", "BatchEnsemble split E=2"], "generating its data")
    repeats = [e["message"] for e in events if e["kind"] == "progress" and ": repeat " in e["message"]]
    assert repeats == [
        "classic vectorized E=2: repeat 1/2",
        "BatchEnsemble split E=2: repeat 1/2",
        "classic vectorized E=2: repeat 2/2",
        "BatchEnsemble split E=2: repeat 2/2",
    ]
    # The row's process waits at its gates while the benchmark measures the floor's rate beside its turns.
    classic = [e["message"] for e in events if e["kind"] == "progress" and e["message"].startswith("classic")]
    rate = "classic vectorized E=2: measuring the matrix-multiply rate"
    first = classic.index(rate)
    assert classic.count(rate) == 2
    assert first < classic.index("classic vectorized E=2: repeat 1/2") < classic.index(rate, first + 1)
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert len(rows["classic-vectorized"]["floor_rates_by_turn"]) == 2
    assert "floor_rates_by_turn" not in rows["batchensemble-split"]


def test_a_benchmark_waits_for_the_run_on_its_device_and_can_be_stopped_while_it_waits(tmp_path, monkeypatch):
    """Runs and benchmarks take turns on the CPU (bench_core.locks): the wait is said, a stop ends it."""
    from bench_core.locks import ENV_CPU_LOCK, device_lock

    monkeypatch.delenv(ENV_CPU_LOCK, raising=False)
    progress = tmp_path / "progress.jsonl"
    args = ("--dataset-shape", "1x8x8", "--ensemble-sizes", "1", "--methods", "single", "--no-reference", "--device")
    args += ("cpu", "--progress-jsonl", str(progress), "--json", str(tmp_path / "o.json"))
    env = dict(os.environ, PYTHONPATH=str(ROOT), BENCH_LOCK_DIR=str(tmp_path))
    env.pop(ENV_CPU_LOCK, None)

    def lines(n: int) -> None:
        deadline = time.time() + 60
        while time.time() < deadline and not (progress.exists() and len(progress.read_text().splitlines()) >= n):
            time.sleep(0.1)

    with device_lock("cpu", tmp_path, holder="run 3") as held:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench_core", "bench", *args],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines(1)
        held.write_text(f"{os.getpid()}\nrun 4\n")  # as when run 3 ends and run 4, queued before, takes the CPU
        lines(2)
        proc.send_signal(signal.SIGTERM)  # the Speed page's Stop
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    events = [json.loads(line) for line in progress.read_text().splitlines()]
    assert [e["kind"] for e in events] == ["progress", "progress"], events
    assert events[0]["message"].startswith("waiting for the CPU: run 3 is using it; this benchmark is next (runs take")
    assert events[1]["message"].startswith("waiting for the CPU: run 4 is using it; this benchmark is next"), "again"
    assert "stopping the wait: nothing is measured yet (press Ctrl-C again to abort)" in stderr
    assert "stopped while waiting for the CPU: nothing was measured" in stderr
    assert stdout == "" and not (tmp_path / "o.json").exists()


# --- the Speed page ------------------------------------------------------------------------------


def test_speed_page_renders():
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "pages" / "speed.py"), default_timeout=30).run()
    assert not at.exception
    assert any("Speed" in t.value for t in at.title)


def test_the_profilers_native_log_lines_are_silenced_and_stderr_comes_back(capfd):
    with measure._native_stderr_silenced():
        os.write(2, b"USDT: profiler_start\n")
    os.write(2, b"after\n")
    err = capfd.readouterr().err
    assert "USDT" not in err and "after" in err
