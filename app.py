"""The dashboard's entry point: only routes to the pages (``streamlit run app.py``)."""

import streamlit as st

from bench_core.store import default_store_path
from pages._common import DEEP_LINK_KEY, STACK_CSS, STORE_PATH_KEY, mark_routed

st.set_page_config(page_title="Ensemble workbench", page_icon=":material/science:", layout="wide")
# A progress bar's value change slides for 0.5 s: 30 frames of work for the browser every time
# the live view polls, which on a small machine is CPU taken from the training.
# Its label is the live run's main line (where it is, elapsed, ETA): Streamlit draws it small
# (14.9 px at 1920x1080), at the body's size here so that a projector's back row can read it.
# Pills locked while a run trains were all one grey, the chosen ones not told from the others: the
# chosen ones keep the theme's colour (primaryColor, .streamlit/config.toml).
st.html(
    "<style>[data-testid='stProgress'] * { transition: none !important; }"
    " [data-testid='stProgress'] p { font-size: 1rem !important; }"
    " button[data-variant='pills'][aria-pressed='true']:disabled { color: #0072B2 !important;"
    " border-color: #0072B2 !important; background-color: rgba(0, 114, 178, 0.12) !important; }"
    f" {STACK_CSS}</style>"
)

# Shared state, set once per browser session: every page reads the store from here.
if STORE_PATH_KEY not in st.session_state:
    st.session_state[STORE_PATH_KEY] = str(default_store_path())

mark_routed()
page = st.navigation(
    [
        st.Page("pages/train.py", title="Train", icon=":material/model_training:", default=True),
        st.Page("pages/results.py", title="Results", icon=":material/bar_chart:"),
        st.Page("pages/runs.py", title="Runs", icon=":material/table_rows:"),
        st.Page("pages/speed.py", title="Speed", icon=":material/speed:"),
        st.Page("pages/learn.py", title="Learn", icon=":material/school:"),
    ]
)
if DEEP_LINK_KEY in st.session_state:  # a page asked for before this router had run (see require_router)
    target, params = st.session_state.pop(DEEP_LINK_KEY)
    st.switch_page(target, query_params=params or None)
page.run()
