"""Speed benchmark: seconds per training epoch, inference throughput, parameters and peak memory.

``run_benchmark(settings)`` is a generator of ``BenchEvent``s (progress, the header, each row,
done); ``python -m bench_core bench`` prints them as a table and the Speed page draws them.

Modules: ``settings`` (rows, shapes, ``BenchSettings``, ``BenchEvent``), ``flops`` (FLOPs per epoch,
the floor, the matrix-product rate), ``measure`` (one row in this process), ``breakdown`` (where a
step goes, from ``torch.profiler``'s operators), ``results`` (derived
figures, comparisons, targets, the table), ``schedule`` (``run_benchmark``: rows taking turns in
processes or threads) and ``cli`` (the command line).

Rows (``ROWS``): ``single`` (one MLP, E = 1), ``classic-sequential`` (E MLPs one after another),
``classic-vectorized`` (E MLPs in one batched pass), ``batchensemble-repeat`` (every member
sees every example), ``batchensemble-split`` (each member 1/E of each batch), and the seed
notebook's pipeline (``bench_core.reference``): ``reference-classic`` and ``reference-batchensemble``.

How each figure is measured:

- **seconds per epoch**: the real training loop (``bench_core.training.train``) runs ``warmup``
  steps untimed, then ``repeats`` epochs of ``steps`` steps on a synthetic dataset of the
  chosen shape, each after ``REWARM_STEPS`` more untimed steps (with any warm-up: the rows take
  turns, so each repeat starts cold); each is scaled to the full training split by the ratio of optimizer steps
  (``batch_plan``; split batching has its own count) and the median is reported. With
  ``full_epoch`` whole epochs are timed instead. Reference rows take ``reference_repeats``
  repeats (their turns take seconds each, and their speed-ups are far from the targets) and time
  ``steps`` batches of each member's own pass, the worker start-up (the seed's loader forks its workers every
  epoch) and shutdown apart, and count those once per epoch (``reference.PassTiming``).
- **floor**: ``epoch_flops`` divided by the float32 matrix-product rate measured at the start
  on the same device: the fastest of 9 timed 2048×2048 products through ``torch.mm`` and, on a
  CPU, through oneDNN (``onednn_gemm_rate``; the first layers' forward products use it but on
  Intel CPUs, where ``torch.mm`` takes them), the faster of the two; ``× floor`` is epoch /
  floor. Runs before the oneDNN rate used ``torch.mm``'s. The floor targets are checked again
  by the floor's rate measured just before and just after each timed turn of classic vectorized
  (``schedule.PAIRED_FLOOR_ROWS``; the faster of the two, each the fastest of 5 products): each
  turn over its floor at its own rate, ``x_floor_by_turn``, whose median the targets take.
- **inference examples/s**: eval mode, ``torch.inference_mode``, batches of 1024 over
  ``inference_examples`` examples, synchronised on GPUs; the median of ``repeats`` passes.
  Reference rows run the seed's Evaluator loop over its DataLoader (batch 256, 2 workers).
- **peak memory** of training (model, optimizer, activations; inference not counted): on CUDA
  ``torch.cuda.max_memory_allocated`` (reset once the row's data is on the device) minus what
  was allocated then. Elsewhere the peak resident set size of the
  row's process after its data was built (Linux: ``VmHWM`` reset through
  ``/proc/self/clear_refs``; otherwise ``ru_maxrss``, which may under-count) minus the resident
  size at that moment. Each row runs in its own process (``isolate``), so rows share no
  allocator state; the reference's DataLoader workers are separate processes and not included.
- **where a step goes** (the workbench's rows on a CPU): in its last turn, before its inference
  pass, each row trains two more epochs of ``profile_steps`` steps under ``torch.profiler`` and
  records the second: the self time of its operators in five parts (``breakdown.STEP_PARTS``:
  matrix products, other operators, Adam, the batch draw, Python and autograd) as shares of the
  profiled time. ``results.step_parts`` applies them to the median epoch, timed unprofiled.

The rows of one ensemble size take turns: every row sets up and warms up, then each runs its
first timed repeat while the others wait, then each its second, and so on (a row with fewer
repeats, a reference row, drops out of the turns when its own are done), and last each its
inference pass (``measure_row``'s ``gate``). On a shared machine whose speed drifts by tens of
per cent within a minute, the ratios between rows (× classic vectorized, × faster than the
reference) then compare repeats taken a few seconds apart, not minutes apart.
"""

from bench_core.bench.breakdown import STEP_PARTS
from bench_core.bench.cli import add_arguments, cmd_bench, settings_from_args
from bench_core.bench.flops import epoch_flops, floor_seconds, gemm_rate, onednn_gemm_rate
from bench_core.bench.measure import measure_row, untimed_epochs
from bench_core.bench.results import (
    SPLIT_VS_REFERENCE,
    TIME_PARTS,
    check_targets,
    compare_rows,
    derive_row,
    floor_rate,
    format_table,
    noise_warnings,
    onednn_lines,
    repeats_text,
    step_parts,
    target_line,
    time_parts,
    training_steps,
    turn_rate_lines,
    turns_text,
    value_text,
)
from bench_core.bench.schedule import plan_rows, run_benchmark
from bench_core.bench.settings import (
    DATASET_SHAPES,
    REFERENCE_ROWS,
    ROW_GROUPS,
    ROW_LABELS,
    ROW_NAMES,
    ROWS,
    TARGET_E,
    BenchEvent,
    BenchSettings,
    RowSpec,
    parse_shape,
)

__all__ = [
    "DATASET_SHAPES",
    "REFERENCE_ROWS",
    "ROWS",
    "ROW_GROUPS",
    "ROW_LABELS",
    "ROW_NAMES",
    "SPLIT_VS_REFERENCE",
    "STEP_PARTS",
    "TARGET_E",
    "TIME_PARTS",
    "BenchEvent",
    "BenchSettings",
    "RowSpec",
    "add_arguments",
    "check_targets",
    "cmd_bench",
    "compare_rows",
    "derive_row",
    "epoch_flops",
    "floor_rate",
    "floor_seconds",
    "format_table",
    "gemm_rate",
    "measure_row",
    "noise_warnings",
    "onednn_gemm_rate",
    "onednn_lines",
    "parse_shape",
    "plan_rows",
    "repeats_text",
    "run_benchmark",
    "settings_from_args",
    "step_parts",
    "target_line",
    "time_parts",
    "training_steps",
    "turn_rate_lines",
    "turns_text",
    "untimed_epochs",
    "value_text",
]
