"""From measured rows to figures: the floor ratio, the comparisons between rows, the targets, the table."""

from __future__ import annotations

import math
import statistics

from bench_core.bench.breakdown import STEP_PARTS
from bench_core.bench.flops import epoch_flops, floor_seconds
from bench_core.bench.settings import (
    REFERENCE_ROWS,
    ROW_NAMES,
    TARGET_E,
    TURN_RATE_REPEATS,
    BenchSettings,
    row_batching,
    steps_text,
)
from bench_core.report import METHOD_LABELS


def derive_row(raw: dict, settings: BenchSettings, rate: float) -> dict:
    """A raw row plus its FLOPs per epoch, floor seconds and ``× floor`` (by the rate at the start).

    A row with ``floor_rates_by_turn`` (the floor's rate measured again beside each timed repeat,
    ``schedule.PAIRED_FLOOR_ROWS``) also gets each repeat over the floor at its own rate, by both
    counts: ``x_floor_by_turn`` and ``x_floor_3x_forward_by_turn``.
    """
    from bench_core.models import mlp_sizes

    shape, n_train, classes = settings.shape_info()
    sizes = mlp_sizes(math.prod(shape), settings.hidden, settings.depth, classes)
    count = (sizes, n_train, raw["ensemble_size"], row_batching(raw["name"]))
    flops = epoch_flops(*count)
    floor = floor_seconds(flops, rate)
    usual_flops = epoch_flops(*count, first_input_grad=True)
    usual = floor_seconds(usual_flops, rate)
    row = {
        **raw,
        "flops_per_epoch": flops,
        "floor_seconds": floor,
        "x_floor": raw["epoch_seconds"] / floor,
        "floor_seconds_3x_forward": usual,
        "x_floor_3x_forward": raw["epoch_seconds"] / usual,
    }
    rates, reps = raw.get("floor_rates_by_turn"), raw.get("epoch_seconds_repeats")
    if rates and reps and len(rates) == len(reps):
        for key, f in (("x_floor_by_turn", flops), ("x_floor_3x_forward_by_turn", usual_flops)):
            row[key] = [rep / floor_seconds(f, r) for rep, r in zip(reps, rates, strict=True)]
    return row


def compare_rows(rows: list[dict]) -> list[dict]:
    """Each row with its comparisons to the other rows of the same E (None where that row is absent).

    ``x_classic_vectorized``: its epoch / classic vectorized's epoch. ``speedup_over_reference``:
    the epoch of the reference row of its kind (BatchEnsemble rows: reference batchensemble;
    the others: reference classic) / its epoch.
    """
    by_key = {(r["name"], r["ensemble_size"]): r for r in rows}
    out = []
    for r in rows:
        e = r["ensemble_size"]
        cv = by_key.get(("classic-vectorized", e))
        kind = "reference-batchensemble" if r["method"] == "batchensemble" else "reference-classic"
        ref = None if r["method"] == "reference" else by_key.get((kind, e))
        out.append(
            {
                **r,
                "x_classic_vectorized": r["epoch_seconds"] / cv["epoch_seconds"] if cv else None,
                "speedup_over_reference": ref["epoch_seconds"] / r["epoch_seconds"] if ref else None,
            }
        )
    return out


TIME_PARTS = ("matrix products at the floor rate", "DataLoader workers starting and stopping", "everything else")


def time_parts(row: dict) -> dict[str, float]:
    """Where a row's epoch goes, in seconds, keyed by ``TIME_PARTS``; they add up to the epoch.

    The first part is the row's floor: its matrix products' FLOPs at the measured 2048³ rate, a lower
    bound on what they take (what they take beyond it falls in "everything else", with element-wise
    work, Adam, Python and, for the reference rows, the per-image transforms and the batches' wait).
    The second is what the reference rows' DataLoader workers take to start and stop, once per member
    per epoch (0 for the workbench's rows). Each part is cut to what the epoch leaves of it.
    """
    epoch = row["epoch_seconds"]
    floor = min(row["floor_seconds"], epoch)
    workers = min(row.get("worker_startup_seconds") or 0.0, epoch - floor)
    return dict(zip(TIME_PARTS, (floor, workers, epoch - floor - workers), strict=True))


def step_parts(row: dict) -> dict[str, float] | None:
    """Where a row's epoch goes by operator kind, in seconds per epoch keyed by ``STEP_PARTS``; None if not profiled.

    The profiled steps' shares (``breakdown``) applied to the row's median epoch, which was timed
    without the profiler; they add up to the epoch.
    """
    fractions = row.get("step_shares")
    if not fractions:
        return None
    return {part: fractions.get(part, 0.0) * row["epoch_seconds"] for part in STEP_PARTS}


def check_targets(rows: list[dict], ensemble_size: int = TARGET_E) -> list[dict]:
    """The speed targets at ``ensemble_size``: text, value, limit, met (None: a row is missing).

    The floor target is checked twice: against the strict count of the products training computes
    (``x_floor``) and against the issue's own count, 3× the forward FLOPs (``x_floor_3x_forward``,
    the count behind its "about 4 s" for this epoch). Both verdicts are printed; neither hides the other.

    Where classic vectorized's row has the floor's rate measured beside each timed turn, both are
    checked again by those rates: the median over the turns of each turn over its floor at its own
    rate. The rate at the start can fall in a faster or slower stretch of the machine than the turns;
    the rate beside a turn falls in the same one.

    The verdict uses the medians (``value``). ``per_turn`` adds the same figure turn by turn: the
    rows of one E take turns, one timed repeat each, so repeat i of two rows ran minutes apart at
    most, and their ratio shows how far the machine's drift moves the verdict (over the turns both
    rows took: a reference row takes fewer; None where a row or its repeats are missing).
    """
    by_name = {r["name"]: r for r in rows if r["ensemble_size"] == ensemble_size}
    cv, be = "classic-vectorized", "batchensemble-repeat"

    def epoch(name: str) -> float | None:
        return by_name[name]["epoch_seconds"] if name in by_name else None

    def repeats(name: str) -> list[float] | None:
        return by_name.get(name, {}).get("epoch_seconds_repeats") or None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b is not None else None

    def paired(a: str, b: str) -> list[float] | None:
        """Turn i of row a over turn i of row b, over the turns both took (a reference row takes fewer)."""
        ra, rb = repeats(a), repeats(b)
        if ra is None or rb is None:
            return None
        return [x / y for x, y in zip(ra, rb, strict=False)]

    def versus(a: str, b: str) -> tuple[float | None, list[float] | None]:
        """Row a's epoch over row b's: the medians' ratio, and turn by turn."""
        return ratio(epoch(a), epoch(b)), paired(a, b)

    def over_floor(count: str) -> tuple[float | None, list[float] | None]:
        """Classic vectorized over its floor by one count ("" strict, "_3x_forward"), and turn by turn."""
        row, reps = by_name.get(cv, {}), repeats(cv)
        floor = row.get(f"floor_seconds{count}")
        return row.get(f"x_floor{count}"), [rep / floor for rep in reps] if floor and reps else None

    def beside_turns(count: str) -> list[tuple]:
        """The same check by the rate measured beside each turn: its median over the turns; [] if unmeasured."""
        turns = by_name.get(cv, {}).get(f"x_floor{count}_by_turn")
        name = "strict count" if not count else "3× forward count"
        text = f"classic vectorized ≤ 1.25× its floor ({name}, rate measured beside each turn)"
        return [(text, "<=", 1.25, statistics.median(turns), turns)] if turns else []

    checks = [
        ("classic vectorized ≤ 1.25× its floor (strict count)", "<=", 1.25, *over_floor("")),
        ("classic vectorized ≤ 1.25× its floor (3× forward count)", "<=", 1.25, *over_floor("_3x_forward")),
        *beside_turns(""),
        *beside_turns("_3x_forward"),
        ("BatchEnsemble repeat ≤ 1.1× classic vectorized", "<=", 1.1, *versus(be, cv)),
        ("BatchEnsemble split ≤ 0.35× classic vectorized", "<=", 0.35, *versus("batchensemble-split", cv)),
        ("classic vectorized ≥ 6× faster than reference classic", ">=", 6.0, *versus("reference-classic", cv)),
        (
            "BatchEnsemble repeat ≥ 2.2× faster than reference BatchEnsemble",
            ">=",
            2.2,
            *versus("reference-batchensemble", be),
        ),
    ]
    out = []
    for text, op, limit, value, per_turn in checks:
        met = None if value is None else (value <= limit if op == "<=" else value >= limit)
        out.append(
            {
                "target": text,
                "ensemble_size": ensemble_size,
                "value": value,
                "limit": limit,
                "met": met,
                "per_turn": per_turn if value is not None else None,
            }
        )
    return out


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------


# Under the table wherever split batching has a speed-up over the reference.
SPLIT_VS_REFERENCE = (
    "split's × faster than ref is not like for like: each member sees 1/E of each batch, so its epoch does "
    "about 1/E of the reference BatchEnsemble's arithmetic (repeat's does the same work)"
)


def format_table(header: dict, rows: list[dict], targets: list[dict] | None = None) -> str:
    """The printed report: machine and method lines, one line per row, then the targets."""
    s = header["settings"]
    shape = "×".join(str(d) for d in header["dataset_shape"])
    rates = header["model_gemm_flops_per_second"]
    model_rates = ", ".join(
        f"E={e}: {r['forward'] / 1e9:.0f}/{r['weight_grad'] / 1e9:.0f}"
        + (f" (split {'/'.join(f'{v / 1e9:.0f}' for v in r['split'].values())})" if "split" in r else "")
        for e, r in sorted(rates.items(), key=_e_key)
    )
    # The forward's layout as measured (JSON from before the twenty-seventh session: zᵀ = Wᵀ xᵀ).
    forward_shape = next((r.get("forward_shape") for r in rates.values() if r.get("forward_shape")), "E·h×in @ in×B")
    lines = [
        f"speed benchmark: {s['dataset_shape']} shape ({shape}), {header['train_examples']:,} training examples "
        f"per epoch, batch {s['batch_size']}, hidden {s['hidden']}×{s['depth']}",
        f"machine: {header['platform']} | CPU: {header['cpu']}"
        + (f" | GPU: {header['gpu']}" if header.get("gpu") else "")
        + f" | torch {header['torch']} | {header['threads']} threads | device {header['device']}",
        f"matmul rate (torch.mm): {header['matmul_flops_per_second'] / 1e9:.1f} GFLOP/s at the start"
        + (f", {end / 1e9:.1f} at the end" if (end := header.get("matmul_flops_per_second_end")) else "")
        + f" ({header['matmul_shape']}, fastest of 9)",
        *onednn_lines(header),
        *turn_rate_lines(rows),
        *([f"first layers' products in training: {header['products']}"] if header.get("products") else []),
        f"first-layer GEMM rates, GFLOP/s, forward {forward_shape} / weight-grad in×B @ B×E·h"
        f" (split batching: forward B×in @ in×h / weight-grad in×B @ B×h / input-grad B×h @ h×in): {model_rates}",
        f"s/epoch: {header['epochs']}"
        # Newer headers say the warm-up in "epochs" (with each repeat's untimed steps).
        + ("" if s["full_epoch"] or "rewarm_steps" in header else f" (after {s['warmup']} warm-up steps)")
        + repeats_text(s, rows)
        + "; reference rows: the seed's DataLoader pipeline, "
        "worker start-up counted once per member per epoch",
        f"floor: {header['floor']}",
        *([f"workbench training steps: {training_steps(header)}"] if training_steps(header) else []),
        f"peak MiB: {header['memory']}, each row in its own process"
        if s["isolate"]
        else "peak MiB: not measured (--in-process: the rows share one process's peak counter; run without it)",
    ]
    lines += [f"warning: {w}" for w in noise_warnings(header, rows)]
    lines.append("")
    cols = [
        ("method", "<", 13),
        ("mode", "<", 13),
        ("E", ">", 3),
        ("s/epoch", ">", 9),
        ("× floor", ">", 8),
        ("× classic vec", ">", 13),
        ("× faster than ref", ">", 17),
        ("infer ex/s", ">", 11),
        ("params", ">", 11),
        ("peak MiB", ">", 9),
    ]
    body = []
    for r in rows:
        values = [
            METHOD_LABELS.get(r["method"], r["method"]),  # "BatchEnsemble", as the progress lines and targets
            METHOD_LABELS.get(r["mode"], r["mode"]),  # the reference rows' mode names a method
            str(r["ensemble_size"]),
            f"{r['epoch_seconds']:.3g}",
            f"{r['x_floor']:.2f}",
            _fmt_ratio(r.get("x_classic_vectorized")),
            _fmt_ratio(r.get("speedup_over_reference")),
            f"{r['inference_examples_per_second']:,.0f}",
            f"{r['params']:,d}",
            "—" if r.get("peak_mib") is None else f"{r['peak_mib']:.1f}",
        ]
        body.append(values)
    lines += _aligned(cols, body)
    if any(r["name"] == "batchensemble-split" and r.get("speedup_over_reference") for r in rows):
        lines.append(SPLIT_VS_REFERENCE)
    lines += step_parts_lines(rows)
    if not any(r["ensemble_size"] == TARGET_E for r in rows):
        lines += ["", f"targets: stated for E = {TARGET_E}; add {TARGET_E} to --ensemble-sizes to check them"]
    elif targets and any(t["value"] is not None for t in targets):
        lines += ["", f"targets (E = {targets[0]['ensemble_size']}, medians of this run):"]
        lines += [f"  {target_line(t)}" for t in targets]
        cv = next(
            (
                r
                for r in rows
                if r["name"] == "classic-vectorized" and r["ensemble_size"] == targets[0]["ensemble_size"]
            ),
            None,
        )
        if cv is not None and "x_floor_3x_forward" in cv:
            lines.append(
                f"  (classic vectorized's floor: strict, the products its training computes, "
                f"{cv['floor_seconds']:.3g} s at this rate; "
                f'3× forward, the usual count and the issue\'s "about 4 s", '
                f"{cv['floor_seconds_3x_forward']:.3g} s: it adds the first layer's input gradient, "
                "which the classic ensemble never computes)"
            )
            q = onednn_ratio(header)
            if floor_by_onednn(header):
                lines.append(
                    f"  (by torch.mm's rate, as runs before the oneDNN rate had it, classic vectorized is at "
                    f"{cv['x_floor'] / q:.2f}× its strict floor and {cv['x_floor_3x_forward'] / q:.2f}× by 3× forward)"
                )
            elif q is not None and q > 1:
                lines.append(
                    f"  (by oneDNN's rate, classic vectorized is at {q * cv['x_floor']:.2f}× its strict floor and "
                    f"{q * cv['x_floor_3x_forward']:.2f}× by 3× forward)"
                )
    return "\n".join(lines)


def training_steps(header: dict) -> str | None:
    """How the workbench's training steps ran, in words; None where the header says only "eager" (files from before)."""
    steps = header.get("steps", "eager")
    return None if steps == "eager" else steps


SPREAD_LIMIT = 1.25  # a row whose slowest timed repeat took more than this many times its fastest
FEW_STEPS = 10  # timed steps per repeat under which an extrapolated epoch is mostly a few steps' noise


def measured_reference_repeats(settings: dict, rows: list[dict]) -> int | None:
    """The reference rows' timed repeats where ``rows`` has one, else None.

    Settings saved before ``reference_repeats`` existed measured every row ``repeats`` times.
    """
    if not any(r.get("name") in REFERENCE_ROWS for r in rows):
        return None
    return settings.get("reference_repeats", settings.get("repeats"))


def repeats_text(settings: dict, rows: list[dict]) -> str:
    """How many timed repeats each row's figure is the median of: ", median of 9 repeats (reference rows: 3)"."""

    def text(n: int) -> str:
        return f"median of {n} repeats" if n != 1 else "one repeat"

    repeats = settings["repeats"]
    reference = measured_reference_repeats(settings, rows)
    if reference is not None and reference != repeats:
        return f", {text(repeats)} (reference rows: {reference if reference != 1 else 'one'})"
    return f", {text(repeats)}"


def noise_warnings(header: dict, rows: list[dict]) -> list[str]:
    """Why this run's timings are less certain than one table makes them look, one line each; [] when steady.

    The machine was busy at the start (load average at least half the cores); the 2048³ rate
    changed by more than 20 % from the start to the end, or between the start and any of the turns
    it was measured beside; a row's timed repeats differ by more than
    ``SPREAD_LIMIT`` (on this project's 2-core machine the repeats of rows with short steps, the
    single MLP, the sequential classic ensemble and split batching, fell into two speeds about
    1.5-1.75× apart in many runs, while classic vectorized's moved by 1.05-1.2×: their medians, and
    the ratios built on them, are then as much the machine's as the method's; docs/speed-log.md).
    """
    out = []
    load, cores = header.get("load_average"), header.get("cores") or 1
    if load is not None and load >= 0.5 * cores:
        out.append(
            f"the machine was busy when the benchmark started (load average {load:.1f} on {cores} cores): "
            "other processes share the cores, so the timings are noisy"
        )
    end, start = header.get("matmul_flops_per_second_end"), header.get("matmul_flops_per_second")
    moved = bool(end and start and abs(end / start - 1) > 0.2)
    beside = turn_rates(rows)
    if beside:  # the floor's rate beside classic vectorized's turns, against the floor's rate at the start
        every = [floor_rate(header), *beside]
        moved = moved or max(every) > 1.2 * min(every)
    if moved:
        out.append("the matmul rate changed by more than 20 % during the run: the machine's load changed")
    spread = []
    for r in rows:
        repeats = [v for v in r.get("epoch_seconds_repeats") or [] if v > 0]
        if len(repeats) > 1 and max(repeats) > SPREAD_LIMIT * min(repeats):
            spread.append(f"{ROW_NAMES[r['name']]} E={r['ensemble_size']}: {min(repeats):.3g}–{max(repeats):.3g} s")
    if spread:
        out.append(
            f"the machine's speed changed within {'a row' if len(spread) == 1 else 'some rows'}: timed repeats "
            f"more than {100 * (SPREAD_LIMIT - 1):.0f} % apart ({'; '.join(spread)}), so their medians and the "
            "ratios and targets built on them are less certain: run it again, or with more repeats"
        )
    few = []  # what the settings measured too little of to tell the method from the machine
    settings = header.get("settings") or {}
    steps, repeats = settings.get("steps"), settings.get("repeats")
    per = "row"
    reference = measured_reference_repeats(settings, rows)
    if isinstance(repeats, int) and isinstance(reference, int) and reference < repeats:
        repeats, per = reference, "reference row"
    if not settings.get("full_epoch") and isinstance(steps, int) and steps < FEW_STEPS:
        few.append(f"{steps_text(steps, 'timed')} per repeat")
    if repeats == 1:
        few.append(f"one repeat per {per} (no median, and no spread to warn of)")
    elif repeats == 2:
        few.append(f"two repeats per {per} (their median is their mean: one slow repeat moves it by half)")
    if few:
        out.append(
            f"few measurements: {' and '.join(few)}, so a moment's load on the machine weighs on each figure "
            f"in full: for figures to compare, time at least {FEW_STEPS} steps and 3 repeats"
        )
    return out


def turn_rates(rows: list[dict]) -> list[float]:
    """Every rate the floor's product was measured at beside a timed turn (``floor_rates_by_turn``), in order."""
    return [rate for r in rows for rate in r.get("floor_rates_by_turn") or []]


def turn_rate_lines(rows: list[dict]) -> list[str]:
    """The header's line on the floor's rate beside classic vectorized's turns; [] where it was not measured."""
    rates = turn_rates(rows)
    if not rates:
        return []
    n = TURN_RATE_REPEATS
    return [
        f"the floor's rate beside classic vectorized's timed turns (fastest of {n} timings just before and {n} just "
        f"after each, {len(rates)} turns): {min(rates) / 1e9:.1f}–{max(rates) / 1e9:.1f} GFLOP/s"
    ]


def floor_rate(header: dict) -> float:
    """The rate the floors were set by: the faster of ``torch.mm``'s and oneDNN's (runs before: ``torch.mm``'s)."""
    return header.get("floor_flops_per_second") or header["matmul_flops_per_second"]


def onednn_ratio(header: dict) -> float | None:
    """The ratio of oneDNN's 2048³ rate to ``torch.mm``'s, from the header; None where it was not measured."""
    onednn = header.get("onednn_matmul_flops_per_second")
    return onednn / header["matmul_flops_per_second"] if onednn else None


def floor_by_onednn(header: dict) -> bool:
    """Whether oneDNN's rate set the floors (it was faster, and the run took the faster rate)."""
    q = onednn_ratio(header)
    return q is not None and q > 1 and floor_rate(header) == header["onednn_matmul_flops_per_second"]


def onednn_lines(header: dict) -> list[str]:
    """The header's line on oneDNN's rate of the floor's product, beside ``torch.mm``'s; [] where unmeasured."""
    q = onednn_ratio(header)
    if q is None:
        return []
    line = (
        f"oneDNN's product (torch.ops.mkldnn._linear_pointwise) ran it at "
        f"{header['onednn_matmul_flops_per_second'] / 1e9:.1f} GFLOP/s"
    )
    if q <= 1:
        return [line + ", no faster: the floor is torch.mm's rate"]
    if floor_by_onednn(header):
        return [
            line + f", {q:.2f}× torch.mm's, and sets the floor (by torch.mm's rate, as runs before it had, "
            f"every floor would be {100 * (q - 1):.0f} % longer and every × floor {1 / q:.2f}× as high)"
        ]
    return [
        line + f", {q:.2f}× torch.mm's: by that rate every floor is {100 * (1 - 1 / q):.0f} % shorter "
        f"and every × floor {q:.2f}× higher"
    ]


def step_parts_lines(rows: list[dict]) -> list[str]:
    """The table of where a step goes (``step_parts``), one line per profiled row; [] when none was."""
    profiled = [r for r in rows if r.get("step_shares")]
    if not profiled:
        return []
    short = ("products", "other ops", "Adam", "batch draw", "Python")
    cols = [("method", "<", 13), ("mode", "<", 13), ("E", ">", 3)] + [(name, ">", 10) for name in short]
    cols += [("products × floor", ">", 16), ("ms/step profiled", ">", 16), ("timed", ">", 6)]
    lines = [
        "",
        "where a step goes (torch.profiler, CPU self time, over steps after the timed repeats), % of a step:",
        "  products: the matrix products; other ops: every other operator (element-wise, sums, copies) and the",
        "  compiled kernels; Adam: the optimizer step and zeroing the gradients; batch draw: the batch's gather;",
        "  Python: Python and autograd outside operators. products × floor: the products' part of the epoch over",
        "  the floor. ms/step: the profiled steps' (timed: the timed repeats', s/epoch over steps per epoch)",
    ]
    body = []
    for r in profiled:
        parts = step_parts(r)
        values = [METHOD_LABELS.get(r["method"], r["method"]), r["mode"], str(r["ensemble_size"])]
        values += [f"{100 * r['step_shares'].get(part, 0.0):.0f} %" for part in STEP_PARTS]
        values.append(f"{parts[STEP_PARTS[0]] / r['floor_seconds']:.2f}")
        values.append(f"{1e3 * r['profiled_step_seconds']:.2f}")
        values.append(f"{1e3 * r['epoch_seconds'] / r['steps_per_epoch']:.2f}")
        body.append(values)
    return lines + _aligned(cols, body)


def _aligned(cols: list[tuple[str, str, int]], body: list[list[str]]) -> list[str]:
    """A fixed-width table: the header of ``cols`` (name, alignment, width), a rule, one line per ``body`` row."""
    lines = ["  ".join(f"{name:{align}{width}}" for name, align, width in cols)]
    lines.append("  ".join("-" * width for _, _, width in cols))
    for values in body:
        lines.append("  ".join(f"{v:{align}{width}}" for v, (_, align, width) in zip(values, cols, strict=True)))
    return lines


def target_line(t: dict) -> str:
    """One target as printed: verdict, text, the medians' figure and, with several turns, each turn's."""
    verdict = "n/a" if t["met"] is None else ("met" if t["met"] else "NOT met")
    value = "row missing" if t["value"] is None else f"{value_text(t['value'], t.get('limit'))}×{turns_text(t)}"
    return f"[{verdict:^7}] {t['target']}: {value}"


def value_text(value: float, limit: float | None) -> str:
    """``value`` to 2 decimals, or more where 2 would print the limit it is judged against.

    1.2549 against ≤ 1.25 is "1.255", not a "1.25" beside NOT met.
    """
    for digits in range(2, 7):
        text = f"{value:.{digits}f}"
        if limit is None or value == limit or float(text) != limit:
            return text
    return text


def turns_text(t: dict) -> str:
    """`` (turn by turn: a, b, c)`` for a target measured over several turns; "" otherwise."""
    turns = t.get("per_turn") or []
    limit = t.get("limit")
    return f" (turn by turn: {', '.join(value_text(v, limit) for v in turns)})" if len(turns) > 1 else ""


def _e_key(item: tuple[str, dict]) -> int:
    return int(item[0])


def _fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"
