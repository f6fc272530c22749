"""Learn: what BatchEnsemble is, with its formulas, a small layer to play with, and parameter counts."""

from __future__ import annotations

import streamlit as st
import torch

from bench_core.config import BE_INITS, DATASETS, DataConfig
from bench_core.models import BatchEnsembleLinear, batchensemble_params, mlp_params, mlp_sizes
from bench_core.report import FIGURE_HELP
from bench_core.runner import DATASET_CLASSES, DATASET_SHAPES
from pages._common import (
    INIT_LABELS,
    dataset_label,
    matrix_figure,
    number_box,
    params_figure,
    remember_widgets,
    require_router,
    restore_widgets,
    show,
    show_problems,
    stacked_columns,
    whole_number,
)

require_router("pages/learn.py")

N_IN, N_OUT = 8, 6  # the small layer drawn below

MAX_MEMBERS = 8  # the ensemble size slider's top
# The controls' values kept past a visit to another page (pages._common.restore_widgets).
DEFAULTS = {
    "learn_members": 4,
    "learn_member": 1,
    "learn_init": BE_INITS[0],
    "learn_std": 0.5,
    "learn_seed": 0,
    "learn_dataset": DATASETS[0],
    "learn_hidden": 128,
    "learn_depth": 2,
    "learn_mark": 5,
}
SAVED_KEY = "learn_saved_settings"
restore_widgets(SAVED_KEY, DEFAULTS)


def layer_pictures() -> None:
    """W, s_k r_kᵀ and W ∘ (s_k r_kᵀ) of one member of a small BatchEnsemble layer."""
    controls = st.columns([1, 1, 1.5, 0.8])  # the init's choices whole at 1024 px (in a quarter they broke)
    members = controls[0].slider("Ensemble size E", 1, MAX_MEMBERS, key="learn_members")
    if members > 1:
        # One slider per E, started at the member picked last ("learn_member"), or at E where that is
        # past E: to Streamlit a slider whose maximum changes is a new widget, which began again at 1,
        # showed 1 while the pictures drew the member kept in the session, or raised an error where
        # that member was past E. The pick changes only when the slider is moved, not when E cuts it.
        slider, pick = f"learn_member_of_{members}", int(st.session_state["learn_member"])
        start = max(1, min(pick, members))
        for other in range(2, MAX_MEMBERS + 1):
            if other != members:
                st.session_state.pop(f"learn_member_of_{other}", None)
        st.session_state.setdefault(slider, start)
        k = controls[1].slider("Member k", 1, members, key=slider)
        if k != start:
            st.session_state["learn_member"] = k
    else:
        k = 1
        controls[1].caption("One member: k = 1")
    init = controls[2].radio(
        "How r and s start",
        BE_INITS,
        format_func=INIT_LABELS.get,
        key="learn_init",  # one under the other: side by side they broke inside their labels at 1024 px
        horizontal=False,
        help="r_k and s_k are the 'fast weights': each entry drawn from a normal distribution around 1 "
        "(std below; the paper's code uses 0.5), or each +1 or −1 with equal chance",
    )
    std = controls[2].slider("std (normal init)", 0.0, 1.5, step=0.05, key="learn_std", disabled=init != "normal")
    problem = number_box(controls[3], "Seed", (0, 10_000), key="learn_seed", step=1)
    if problem:
        show_problems([problem])
        return
    seed = whole_number(st.session_state["learn_seed"])

    with torch.random.fork_rng(devices=[]):  # seed this picture without touching the server's RNG
        torch.manual_seed(int(seed))
        layer = BatchEnsembleLinear(N_IN, N_OUT, members, init=init, init_std=float(std))
    with torch.no_grad():
        shared = layer.weight.t()  # (out, in), as nn.Linear shows it; stored [in, out]
        fast = layer.s[k - 1].unsqueeze(1) * layer.r[k - 1].unsqueeze(0)  # (out, in): s_k r_kᵀ
        member = layer.member_weight(k - 1)  # (out, in): W ∘ (s_k r_kᵀ)
    # Two pictures a row: three side by side left the cells' values running together at 1280 px.
    top = stacked_columns("matrices-top", 2)
    with top[0]:
        show(matrix_figure(shared.tolist(), "W (shared)"))
    with top[1]:
        show(matrix_figure(fast.tolist(), f"s_{k} r_{k}ᵀ (member {k}, rank 1)"))
    bottom = stacked_columns("matrices-bottom", 2)
    with bottom[0]:
        show(matrix_figure(member.tolist(), f"W_{k} = W ∘ s_{k} r_{k}ᵀ"))
    r_text = ", ".join(f"{v:.2f}" for v in layer.r[k - 1].tolist())
    s_text = ", ".join(f"{v:.2f}" for v in layer.s[k - 1].tolist())
    bottom[1].markdown(
        f"**Member {k}** scales each column i of W by its input-side weight r_{k},i and each row o by "
        f"its output-side weight s_{k},o:\n\n"
        f"- r_{k} (one per input) = [{r_text}]\n"
        f"- s_{k} (one per output) = [{s_text}]\n\n"
        f"Member {k}'s own numbers: {N_IN} + {N_OUT} + {N_OUT} (bias) = {N_IN + 2 * N_OUT}; "
        f"W's {N_IN * N_OUT} are shared.\n\n"
        "Blue: positive, red: negative; cells show values rounded to 0.1. Move the member slider: "
        "W stays, the stripes of s_k r_kᵀ change."
    )


def params_section() -> None:
    controls = st.columns(4)
    name = controls[0].selectbox("Dataset shape", DATASETS, format_func=dataset_label, key="learn_dataset")
    problems = [
        number_box(controls[1], "Hidden width", (1, 4096), key="learn_hidden", step=16),
        number_box(controls[2], "Hidden layers", (1, 8), key="learn_depth", step=1),
    ]
    members = controls[3].slider(
        "Ensemble size to mark", 1, 16, key="learn_mark", help="The counts for this E, beside the chart"
    )
    if any(problems):
        show_problems([p for p in problems if p])
        return
    hidden, depth = whole_number(st.session_state["learn_hidden"]), whole_number(st.session_state["learn_depth"])
    if name == "synthetic":
        shape, classes = tuple(DataConfig.synthetic_shape), DataConfig.synthetic_classes
    else:
        shape, classes = DATASET_SHAPES[name], DATASET_CLASSES[name]
    in_features = 1
    for d in shape:
        in_features *= d
    sizes = mlp_sizes(in_features, int(hidden), int(depth), classes)
    left, right = st.columns([2, 1])
    with left:
        show(params_figure(sizes, 16, marked=members))
    with right:
        single = mlp_params(sizes)
        be = batchensemble_params(sizes, members)
        st.metric("single (one MLP)", f"{single:,}")
        st.metric(f"classic, E={members}", f"{members * single:,}")
        ratio = members * single / be
        versus = f"classic has {ratio:.2f}× as many" if ratio >= 1 else f"{1 / ratio:.2f}× as many as classic"
        st.metric(
            f"BatchEnsemble, E={members}",
            f"{be:,}",
            versus,
            delta_color="normal" if ratio >= 1 else "inverse",
            delta_arrow="off",  # an arrow beside "as many" reads as more or fewer of BatchEnsemble's own
        )
        st.caption(f"Layer widths: {' → '.join(map(str, sizes))} ({dataset_label(name)}: {shape}, {classes} classes)")


st.title("Learn: BatchEnsemble")

st.markdown(
    r"""
An **ensemble** trains several models (its *members*) and averages their predicted probabilities.
A **classic ensemble** of E MLPs has E times the parameters and does E times the work.

**BatchEnsemble** (Wen, Tran & Ba, ICLR 2020) lets the members share most of their weights. In each
layer, one weight matrix $W$ is shared by all members; member $k$ owns only three vectors: the
*fast weights* $r_k$ on the input side and $s_k$ on the output side, and its own bias $b_k$.
Member $k$'s weight matrix is $W$ scaled, entry by entry, by the rank-1 matrix $s_k r_k^\top$.
This page writes $W$ as outputs × inputs, as `nn.Linear` prints it; the paper (and this workbench's
code) store its transpose, inputs × outputs, where the same matrix reads $W \circ (r_k s_k^\top)$.
"""
)
st.latex(r"W_k \;=\; W \circ \left(s_k\, r_k^{\top}\right), \qquad (W_k)_{oi} = W_{oi}\, s_{k,o}\, r_{k,i}")
st.markdown(
    "$W_k$ need not be built: scale the input by $r_k$, multiply by the shared $W$, scale the output by $s_k$. "
    "(Where building it is faster, this workbench does: with repeat batching, the first layer multiplies "
    "the shared input by every member's $W \\circ r_k$ side by side.)"
)
st.latex(r"y_k \;=\; W_k\, x + b_k \;=\; s_k \circ \big(W\,(r_k \circ x)\big) + b_k")
st.markdown("For a layer with $d_{in}$ inputs and $d_{out}$ outputs, the parameters are:")
st.latex(  # one a line: side by side, BatchEnsemble's ran past the page's edge at 1024 px
    r"\begin{aligned} \text{classic: } & E\,(d_{in}\,d_{out} + d_{out}) \\"
    r" \text{BatchEnsemble: } & d_{in}\,d_{out} + E\,(d_{in} + 2\,d_{out}) \end{aligned}"
)

st.subheader(f"One layer up close: {N_IN} inputs → {N_OUT} outputs")
layer_pictures()

st.subheader("Parameters against ensemble size")
params_section()
remember_widgets(SAVED_KEY, DEFAULTS)

st.subheader("Where BatchEnsemble is fast, and where it is not")
st.markdown(
    """
- **Against what.** This workbench runs the classic ensemble *vectorized* by default: every member's
  forward and backward pass in a few batched matrix products, the shared input read once. So the
  batched pass is not BatchEnsemble's own advantage here; what it has that classic has not is below.
- **Fewer parameters to update.** The optimizer (Adam) updates one W per layer plus small vectors,
  instead of E full copies of every weight: less memory to hold and less to move on every step.
- **Repeat batching does as much arithmetic.** Each member still processes every example, so the
  multiply-adds grow with E as a classic ensemble's do, and r and s add element-wise work on top.
  What it saves is the optimizer's share of the step.
- ***Split* batching does E times less.** Each member gets 1/E of each batch: E times fewer
  multiply-adds per step, but each member sees 1/E of the data per epoch.
- **Not on every device.** What BatchEnsemble buys in time depends on where it runs. On this
  project's 2-core CPU, where a step is arithmetic and memory, repeat batching trained about as fast
  as the vectorized classic ensemble (0.96–1.06× its time in most benchmark runs) and split
  batching in 0.3–0.5× of it. On a GPU a step this small is a few dozen short kernels, each too
  small to fill the GPU, even replayed as one CUDA graph (which takes away the CPU's cost of
  launching them): BatchEnsemble's extra element-wise kernels (its r and s and their gradients)
  made it *slower* there in every GPU run (repeat about 1.45×, split about 1.1× on an H100 and an
  H200). Its smaller parameter count holds everywhere. The Speed page measures your device.
"""
)

st.subheader("Reading the results")
st.markdown(
    """
- **Agreement matrix.** Cell (i, j) is the fraction of test examples on which members i and j
  predict the same class; the diagonal is 1. Values near 1 everywhere mean the members are near
  copies and the ensemble adds little; lower values off the diagonal mean more diverse members.
  BatchEnsemble members share W, so they often agree more than independent MLPs do.
- **Why the ensemble beats its average member.** Members make partly *different* mistakes. The
  ensemble averages their probabilities (a *soft* vote: a confident member weighs more than an
  unsure one, so it is not a head count), which cancels much of any single member's noise. So
  ensemble accuracy is usually above the *mean* member accuracy, often above the best member, and
  the gain is larger when members disagree more.
- **Mean member accuracy** is what the seed notebook reported for each method: the members'
  accuracies averaged, which says nothing about the ensemble's own prediction.
"""
)

st.subheader("Reading the calibration figures")
st.markdown(
    "A good ensemble is not only accurate: its probabilities should mean what they say. The Results "
    "page's table measures that on the test set (C is the number of classes; nats are natural-log units):\n\n"
    + "\n".join(
        f"- **{label}**: {FIGURE_HELP[key]}."
        for key, label in (
            ("nll", "NLL"),
            ("ece", "ECE"),
            ("brier", "Brier score"),
            ("predictive_entropy", "Predictive entropy"),
            ("mutual_information", "Mutual information"),
        )
    )
    + "\n\nThe reliability chart beside the table draws ECE's bins: each dot is a bin's mean confidence "
    "against its accuracy; dots below the diagonal are over-confident."
)
