"""``python -m bench_core``: see bench_core.cli."""

import sys

from bench_core.cli import main

sys.exit(main())
