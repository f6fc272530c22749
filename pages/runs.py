"""Runs: every run in the store; select some to compare, export or delete them."""

from __future__ import annotations

from datetime import datetime

import pandas as pd
import streamlit as st

from bench_core import jobs
from bench_core.errors import BenchError
from bench_core.report import FIGURES, derived, format_value
from bench_core.store import RunStore
from pages._common import (
    LAST_RUN_KEY,
    MISSING,
    active_signature,
    dataset_label,
    existing_runs,
    export_csv,
    export_json,
    fetch_runs,
    method_label,
    open_store,
    ordered_methods,
    require_router,
    rerun_when_changed,
    run_signature,
    runs_loss_figure,
    show,
    store_path,
)

require_router("pages/runs.py")

CONFIRM_KEY = "runs_confirm_delete"  # run ids waiting for the user to confirm their deletion
TABLE_KEY = "runs_table"  # the table's selection: positions of rows in the table as it was drawn
TABLE_IDS_KEY = "runs_table_ids"  # the run ids of those rows, to read the positions by
UNTICK_KEY = "runs_untick"  # set by a deletion: the next run draws the table with nothing ticked
MAX_COMPARED = 12  # runs drawn side by side at most: more is unreadable, and thousands froze the page
ACCURACY_METHODS = ("classic", "batchensemble", "single")
COMPARE_ROW = 35  # px: a row of the figures side by side


def runs_frame(runs: list[dict]) -> pd.DataFrame:
    """One row per run: what a reader needs to tell runs apart and rank them."""
    rows = []
    for run in runs:
        cfg = run.get("config") or {}
        summary = run.get("summary") or {}
        seconds = [s.get("train_seconds") for s in summary.values() if isinstance(s.get("train_seconds"), (int, float))]
        # What tells runs apart and ranks them first: at 1280 px beside the sidebar the table shows
        # about 790 px before it scrolls sideways; the methods (which the accuracies' blanks tell
        # too), the date and the device come after the training seconds.
        row = {
            "id": run["id"],
            "status": jobs.status_text(run),  # "waiting" for a run waiting its turn on the device
            "dataset": dataset_label((cfg.get("data") or {}).get("name", "?")),
            # The single model alone has one member, whatever E its settings hold.
            "E": 1 if run.get("methods") == ["single"] else (cfg.get("model") or {}).get("ensemble_size"),
            "epochs": (cfg.get("train") or {}).get("epochs"),
        }
        for method in ACCURACY_METHODS:
            row[f"acc. {method_label(method)}"] = (summary.get(method) or {}).get("ensemble_accuracy")
        row["training s"] = sum(seconds) if seconds else None
        row["methods"] = ", ".join(method_label(m) for m in ordered_methods(run.get("methods") or []))
        row["created"] = datetime.fromtimestamp(run["created"])  # local time
        row["device"] = run.get("device") or (cfg.get("train") or {}).get("device")
        rows.append(row)
    return pd.DataFrame(rows)


# Widths in pixels: sized to their content the grid gave id, E and epochs 75 px each, and at
# 1280 px the training seconds were past the table's edge.
COLUMN_CONFIG = {
    "id": st.column_config.NumberColumn("id", format="%d", width=48),
    "status": st.column_config.TextColumn("status", width=100),  # "interrupted" whole
    "E": st.column_config.NumberColumn("E", width=44),
    "epochs": st.column_config.NumberColumn("epochs", width=66),
    **{
        f"acc. {method_label(m)}": st.column_config.NumberColumn(
            f"acc. {method_label(m)}", format="%.4f", help=f"ensemble test accuracy of {method_label(m)}"
        )
        for m in ACCURACY_METHODS
    },
    "training s": st.column_config.NumberColumn("training s", format="%.1f", help="training seconds, all methods"),
    "created": st.column_config.DatetimeColumn("created", format="D MMM HH:mm"),
}


def selected_ids(frame: pd.DataFrame) -> list[int]:
    """The ids of the runs ticked in the table, kept on those runs when runs come or go.

    The table's selection holds row positions. Where the list changed since the table was drawn (a
    run made or deleted in another session), the positions are read against the rows as drawn and
    the selection is moved to where those runs are now, before the table is drawn again.
    """
    ids = [int(i) for i in frame["id"]]
    if st.session_state.pop(UNTICK_KEY, False):  # set, not dropped: the browser's table keeps its ticks till told
        st.session_state[TABLE_KEY] = {"selection": {"rows": [], "columns": []}}
    drawn = st.session_state.get(TABLE_IDS_KEY)
    state = st.session_state.get(TABLE_KEY)
    rows = list(state["selection"]["rows"]) if state and "selection" in state else []
    if drawn is not None and drawn != ids and rows:
        still = [drawn[i] for i in rows if 0 <= i < len(drawn) and drawn[i] in ids]
        st.session_state[TABLE_KEY] = {"selection": {"rows": [ids.index(i) for i in still], "columns": []}}
    st.session_state[TABLE_IDS_KEY] = ids
    return ids


def compare_table(runs: list[dict]) -> pd.DataFrame:
    """Every figure of the selected runs side by side: one column per run and method."""
    columns = {}
    for run in runs:
        results = run.get("results") or {}
        for method in ordered_methods(results):
            full = derived(results[method])
            columns[f"#{run['id']} {method_label(method)}"] = [format_value(full.get(k), f) for k, _, f in FIGURES]
    return pd.DataFrame(columns, index=[label for _, label, _ in FIGURES]).rename_axis("figure")


def delete_block(selected: list[int], by_id: dict[int, dict], store: RunStore) -> None:
    """Delete selected runs, after a confirmation; runs still going are refused."""
    pending = st.session_state.get(CONFIRM_KEY)
    if pending:
        st.warning(
            f"Delete run{'s' if len(pending) > 1 else ''} {', '.join(map(str, pending))}? "
            f"{'Their' if len(pending) > 1 else 'Its'} records, results and weights go too; this can't be undone.",
            icon=":material/delete:",
        )
        yes, no, _ = st.columns([1, 1, 4])
        if yes.button("Yes, delete", type="primary", key="runs_delete_yes"):
            st.session_state.pop(CONFIRM_KEY, None)
            try:
                for run_id in pending:
                    if run_id in by_id:  # this rerun's list: one deleted elsewhere meanwhile is gone already
                        store.delete_run(run_id)
            except BenchError as err:
                st.error(str(err), icon=":material/error:")
                return
            st.session_state[UNTICK_KEY] = True  # nothing stays ticked after a deletion (selected_ids)
            st.toast(f"Deleted {len(pending)} run{'s' if len(pending) > 1 else ''}.")
            st.rerun()
        if no.button("Cancel", key="runs_delete_no"):
            st.session_state.pop(CONFIRM_KEY, None)
            st.rerun()
        return
    if not selected:
        return
    active = [i for i in selected if jobs.is_active(by_id[i]["status"])]
    row = st.container(horizontal=True)
    if active:  # wherever they were started: a tab closed or reloaded can't stop them any more
        asked = [i for i in active if by_id[i].get("stop_requested")]
        names = f"run{'s' if len(active) > 1 else ''} {', '.join(map(str, active))}"
        if row.button(f"Stop {names}", key="runs_stop", icon=":material/stop:", disabled=len(asked) == len(active)):
            try:
                for run_id in active:
                    store.request_stop(run_id)
            except BenchError as err:
                st.error(str(err), icon=":material/error:")
                return
            st.toast(f"{names.capitalize()} stop{'' if len(active) > 1 else 's'} after the current batch.")
            st.rerun()
    if row.button(
        f"Delete {len(selected)} selected run{'s' if len(selected) > 1 else ''}",
        key="runs_delete",
        icon=":material/delete:",
    ):
        if active:
            st.error(
                f"Run{'s' if len(active) > 1 else ''} {', '.join(map(str, active))} still "
                f"train{'' if len(active) > 1 else 's'}: stop {'them' if len(active) > 1 else 'it'} first."
            )
        else:
            st.session_state[CONFIRM_KEY] = list(selected)
            st.rerun()


st.title("Runs")
store = open_store()
runs = store.list_runs()
rerun_when_changed(run_signature(runs), active_signature)  # runs started, ended or stopped elsewhere: no click
if not runs:
    st.info("The run store is empty: train a run on the Train page.")
    st.caption(f"Run store: {store_path()}")
    st.stop()
by_id = {r["id"]: r for r in runs}

frame = runs_frame(runs)
ids = selected_ids(frame)
event = st.dataframe(
    frame,
    key=TABLE_KEY,
    on_select="rerun",
    selection_mode="multi-row",
    hide_index=True,
    width="stretch",
    column_config=COLUMN_CONFIG,
    placeholder=MISSING,
)
selected = [ids[i] for i in event.selection.rows if 0 <= i < len(ids)]
# Under the table: above it, the table's toolbar (search, download, full screen) covered its end at 1024 px.
st.caption("Tick runs at the left to compare, export or delete them; click a column title to sort.")

delete_block(selected, by_id, store)

chosen = selected or [r["id"] for r in runs]
which = "selected" if selected else "all"
path = str(store_path())
row = st.container(horizontal=True, vertical_alignment="center")
row.download_button(
    "CSV",
    icon=":material/download:",
    data=lambda: export_csv(fetch_runs(chosen, path)),
    file_name=f"ensemble-runs-{which}.csv",
    mime="text/csv",
    on_click="ignore",
    key="runs_csv",
)
row.download_button(
    "JSON",
    icon=":material/download:",
    data=lambda: export_json(fetch_runs(chosen, path)),
    file_name=f"ensemble-runs-{which}.json",
    mime="application/json",
    on_click="ignore",
    key="runs_json",
)
if selected:
    whose = f"the {len(chosen)} selected runs" if len(chosen) > 1 else "the selected run"
else:
    whose = f"all {len(chosen)} runs (or select some first)" if len(chosen) > 1 else "the run"  # not "all 1 run"
row.caption(f"Download the figures of {whose}.")

if len(selected) > MAX_COMPARED:
    st.info(
        f"{len(selected)} runs are ticked: the curves and figures below are of the first {MAX_COMPARED} in the "
        f"table. The downloads and Delete take all {len(selected)}.",
        icon=":material/info:",
    )
if selected:
    full = existing_runs(store, selected[:MAX_COMPARED])
    if len(selected) == 1 and not jobs.is_active(by_id[selected[0]]["status"]):  # Results shows ended runs
        st.session_state[LAST_RUN_KEY] = selected[0]
        st.page_link(
            "pages/results.py", label=f"Open run {selected[0]} on the Results page", icon=":material/bar_chart:"
        )
    if any(r.get("records") for r in full):
        show(runs_loss_figure(full))
    table = compare_table(full)
    if not table.empty:
        st.subheader("Figures side by side")
        # A table that scrolls sideways: several runs' columns did not fit at 1280 px and were cut off.
        # Rows of a set height, all in view (the grid's own row height left the last one cut), and
        # the figures' names whole.
        st.dataframe(
            table,
            width="stretch",
            height=COMPARE_ROW * (len(table) + 1) + 3,
            row_height=COMPARE_ROW,
            column_config={"_index": st.column_config.TextColumn("figure", width=340, pinned=True)},
        )
    else:
        st.caption("None of the selected runs has results.")
st.caption(f"Run store: {store_path()}")
