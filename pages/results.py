"""Results: the figures of one run, its methods side by side.

Per-member accuracy with the ensemble's accuracy marked, the members' agreement matrices,
every figure of ``bench_core.report`` in a table, the classic / BatchEnsemble ratios, a
reliability diagram, and the training curves.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from bench_core.jobs import is_waiting
from bench_core.report import (
    FIGURE_HELP,
    FIGURES,
    figure_rows,
    format_value,
    median_epoch_seconds,
    ratios,
    uneven_epochs,
)
from bench_core.store import FINAL_STATUSES
from pages._common import (
    LAST_RUN_KEY,
    LIVE_RUN_KEY,
    SPARSE_BIN,
    active_signature,
    agreement_figure,
    agreement_floor,
    and_list,
    has_full_epoch,
    loss_figure,
    member_accuracy_figure,
    method_label,
    open_store,
    ordered_methods,
    reliability_figure,
    require_router,
    rerun_when_changed,
    run_label,
    run_signature,
    seconds_figure,
    show,
    stacked_columns,
    throughput_figure,
)

require_router("pages/results.py")


def pick_run(runs: list[dict]) -> int:
    """The run to show: ?run=<id>, else this session's latest, else the newest finished one."""
    ids = [r["id"] for r in runs]
    wanted = st.query_params.get("run")
    default = None
    if wanted is not None and wanted.isdigit() and int(wanted) in ids:
        default = int(wanted)
    elif st.session_state.get(LAST_RUN_KEY) in ids:
        default = st.session_state[LAST_RUN_KEY]
    else:
        default = next((r["id"] for r in runs if r["status"] == "finished"), ids[0])
    by_id = {r["id"]: r for r in runs}
    chosen = st.selectbox("Run", ids, index=ids.index(default), format_func=lambda i: run_label(by_id[i]))
    # The run shown again when the user comes back to this page; but a run this session launched that
    # has not ended (not in ``ids``) stays the one to open once it ends, unless the user picked another.
    if chosen != default or st.session_state.get(LAST_RUN_KEY) in ids:
        st.session_state[LAST_RUN_KEY] = chosen
    if wanted is not None and chosen != default:  # the user picked another run than the link's
        st.query_params["run"] = str(chosen)  # (the link's would win again when the page is redrawn)
    return chosen


def status_line(run: dict) -> None:
    status, message = run["status"], run.get("message") or ""
    if status == "stopped":
        st.warning(
            f"Run {run['id']} was stopped early: these figures are for the models as trained so far.",
            icon=":material/stop_circle:",
        )
    elif status == "failed":
        st.error(f"Run {run['id']} failed: {message or 'no message'}", icon=":material/error:")
    elif status == "interrupted":
        st.error(f"Run {run['id']} was interrupted: {message or 'its process ended'}", icon=":material/warning:")


def headline(results: dict[str, dict], methods: list[str]) -> None:
    """Ensemble accuracy per method, then the classic / BatchEnsemble ratios, as big numbers.

    Each card is labelled by its method alone, under one caption: with three methods side by side
    at 1280 px "BatchEnsemble: ensemble accuracy" and its delta were cut off.
    """
    several = any(results[m].get("ensemble_size", 1) > 1 for m in methods)
    st.caption(
        "Ensemble test accuracy (of the mean of the members' softmax)"
        + (", and below it its gain in points over the mean member's accuracy" if several else "")
    )
    for cell, method in zip(st.columns(max(2, len(methods))), methods, strict=False):
        result = results[method]
        ens, mean = result.get("ensemble_accuracy"), result.get("mean_member_accuracy")
        gain, level = None, False
        if isinstance(ens, (int, float)) and isinstance(mean, (int, float)) and result.get("ensemble_size", 1) > 1:
            # Over the mean member, as the caption says (whole at 1024 px); two decimals, so that the panel
            # titles' 0.868 and 0.864 do not read as a gain of 0.4 where it is 0.33.
            points = round((ens - mean) * 100, 2)
            level = points == 0  # no gain to two decimals: "0.00", not a red "-0.00"
            gain = "0.00 points" if level else f"{points:+.2f} points"
        cell.metric(
            method_label(method),
            format_value(ens, "{:.1%}"),
            gain,
            delta_color="off" if level else "normal",
            delta_arrow="off" if level else "auto",
            border=True,
            help=f"{method_label(method)}: test accuracy of the mean of the members' softmax; below it, "
            "its gain over the members' mean accuracy",
        )
    found = ratios(results)
    if not found:
        return
    # Under one caption, as the accuracies: at 1024 px "Training time: classic ÷ BatchE…" was cut.
    st.caption("The classic ensemble's cost ÷ BatchEnsemble's")
    names = {
        "train_seconds": (
            "Training time",
            "training seconds of the classic ensemble (per whole epoch where a stop cut either short)",
        ),
        "params": ("Parameters", "parameters of the classic ensemble"),
    }
    for cell, (key, value) in zip(st.columns(max(2, len(found))), found.items(), strict=False):
        label, what = names[key]
        note = NOISE_NOTE if key == "train_seconds" else ""
        cell.metric(label, f"{value:.2f}×", help=f"The {what} ÷ those of BatchEnsemble.{note}", border=True)
    if "train_seconds" in found:
        uneven = {m: uneven_epochs(results[m]) for m in ("classic", "batchensemble")}
        said = [
            f"{method_label(m)}'s slowest epoch took {slow:.2f} s against a median of {median:.2f} s"
            for m, (median, slow) in ((m, u) for m, u in uneven.items() if u)
        ]
        if said:
            medians = [median_epoch_seconds(results[m]) or 0.0 for m in ("classic", "batchensemble")]
            by_median = f"; the ratio of their median epochs is {medians[0] / medians[1]:.2f}×" if all(medians) else ""
            st.caption(
                f"Uneven epochs: {' and '.join(said)} (a busy machine, or a first epoch's warm-up), "
                f"so the training-time ratio says as much about the machine as about the methods{by_median}."
            )


NOISE_NOTE = (
    " One run, timed once: on a busy machine the same settings can give a ratio several times larger or"
    " smaller. The Speed page times each method with repeats, side by side."
)


def figure_glossary() -> None:
    """What every figure of the table means, in an expander under it."""
    with st.expander("What the figures mean"):
        st.markdown("\n".join(f"- **{label}**: {FIGURE_HELP[key]}." for key, label, _ in FIGURES))


def figure_table(results: dict[str, dict], methods: list[str]) -> pd.DataFrame:
    """Every figure of report.FIGURES as a row, methods as columns, formatted for reading."""
    formats = {key: fmt for key, _, fmt in FIGURES}
    rows = figure_rows({m: results[m] for m in methods})
    table = pd.DataFrame(
        {method_label(m): [format_value(row[m], formats[row["key"]]) for row in rows] for m in methods},
        index=[row["figure"] for row in rows],
    )
    table.index.name = "figure"
    return table


def figures(run: dict, results: dict, methods: list[str]) -> None:
    """The run's figures: headline, members' accuracy, agreement, every figure, calibration, curves."""
    headline(results, methods)
    show(member_accuracy_figure(results))

    st.subheader("Do the members agree?")
    # A method of one member (the single model, or E = 1) has nothing to agree with: its 1 x 1 "matrix"
    # took a third of the row at 1280 px and squeezed the ensembles' cells till their values ran together.
    ensembles = [m for m in methods if len(results[m].get("agreement") or []) > 1]
    zmin = agreement_floor({m: results[m] for m in ensembles})
    if ensembles:  # with none, the one line below says why
        shared = "; the matrices share one colour scale" if len(ensembles) > 1 else "; its colours run"
        st.caption(
            "Cell (i, j): the fraction of test examples on which members i and j predict the same class "
            f"(1 on the diagonal). Lower off the diagonal means more diverse members{shared}, from {zmin:.2f} "
            "(at or under the lowest agreement) to 1."
        )
    # Two columns at least: one matrix across the page's width sat at its left, its colour bar far right.
    cells = stacked_columns("agreement", max(2, len(ensembles))) if ensembles else []
    for cell, method in zip(cells, ensembles, strict=False):
        with cell:
            show(agreement_figure(results[method], method, zmin))
    alone = [method_label(m) for m in methods if m not in ensembles and results[m].get("ensemble_size", 1) <= 1]
    if alone:
        st.caption(
            f"{and_list(alone)}: one member each, so no agreement between members to show."
            if len(alone) > 1
            else f"{alone[0]}: one member, so no agreement between members to show."
        )

    left, right = stacked_columns("figures", [1.1, 1])
    with left:
        st.subheader("Every figure")
        st.table(figure_table(results, methods))
    with right:
        show(reliability_figure(results))
        st.caption(
            "Test examples are binned by the ensemble's confidence; each dot is a bin (bigger: more examples; "
            f"hollow and not joined: under {SPARSE_BIN:.0%} of them). "
            "Dots below the diagonal: over-confident; above: under-confident."
        )
    figure_glossary()  # the page's width: in the table's column its text ran long and narrow beside a blank

    records = run.get("records") or []
    if records:
        with st.expander("Training curves"):
            show(loss_figure(records))
            if has_full_epoch(records):
                cols = stacked_columns("curves", 2)
                with cols[0]:
                    show(seconds_figure(records))
                with cols[1]:
                    show(throughput_figure(records))
            else:
                st.caption("No epoch ran to its end (the run was stopped in its first): nothing to time.")


st.title("Results")
store = open_store()
every = store.list_runs()
runs = [r for r in every if r["status"] in FINAL_STATUSES]
training = {r["id"]: r for r in every if r["status"] not in FINAL_STATUSES}
wanted = st.query_params.get("run")
asked = int(wanted) if wanted is not None and wanted.isdigit() else None  # a link to one run: /results?run=7
awaited = list(dict.fromkeys(i for i in (asked, st.session_state.get(LIVE_RUN_KEY)) if i in training))
for unended in awaited:
    doing = "is waiting for its turn" if is_waiting(training[unended]) else "is still training"
    st.info(f"Run {unended} {doing}: its results appear here when it ends.", icon=":material/hourglass_top:")
# A run that starts and ends elsewhere joins the list (and the one awaited above shows) without a click.
rerun_when_changed(run_signature(every), active_signature)
if not runs:
    if not awaited:  # under "Run 1 is still training" a "train one on the Train page" read as a contradiction
        if len(training) == 1:
            under_way = f"run {next(iter(training))} is under way; its results appear here when it ends."
        elif training:
            ids = and_list([str(i) for i in sorted(training)])
            under_way = f"runs {ids} are under way; their results appear here as they end."
        else:
            under_way = "train one on the Train page."
        st.info(f"No run has ended yet: {under_way}")
    st.stop()

run_id = pick_run(runs)
run = store.get_run(run_id)
status_line(run)
results = run.get("results") or {}
if not results:
    st.info(f"Run {run_id} has no results: no method finished training.")
    st.stop()
methods = ordered_methods(results)
missing = [m for m in run.get("methods") or [] if m not in results]
if missing:
    st.caption(f"Not trained in this run: {', '.join(method_label(m) for m in missing)}.")


# What a store edited by hand (or written by another version) may hold where these figures read:
# the settings and software below still show, with one line saying why the figures do not.
STORED_SHAPE_ERRORS = (TypeError, ValueError, KeyError, AttributeError, IndexError)
try:
    figures(run, results, methods)
except STORED_SHAPE_ERRORS as err:
    reason = " ".join(str(err).split())[:160] or type(err).__name__
    st.error(
        f"Run {run_id}'s stored figures can't be drawn ({type(err).__name__}: {reason}): "
        "its entry in the run store was changed by hand or written by another version.",
        icon=":material/error:",
    )
with st.expander("Settings and software of this run"):
    st.json({"config": run.get("config"), "device": run.get("device"), "versions": run.get("versions")})
