#!/usr/bin/env bash
# The GPU checks for a lent CUDA machine (see README, "On a GPU"), in two parts that each fit one
# 10-minute call (times from an H100 in the ninth session):
#   bash scripts/gpu_check.sh OUTDIR          the checks, about 5.5 minutes:
#     1. the CUDA tests (CPU against CUDA, graph-replayed against eager training), the model tests
#        and oneDNN's (the first layer's CPU product, checked on that machine's CPU too): ~100 s;
#     2. the E = 5 speed table with CUDA graphs (the README's GPU table): ~100 s;
#     3. the same rows with eager steps, without the reference rows (what the graphs buy): ~60 s;
#     4. the same graph rows timed over whole epochs (no extrapolation from 60 steps): ~65 s.
#   bash scripts/gpu_check.sh OUTDIR sizes    cost against the ensemble size (1, 2, 4, 8) with CUDA
#     graphs, without the reference rows: about 4 minutes (each row is a process: ~14 s).
# Everything printed goes to OUTDIR/log.txt (each step headed "== time step"), each table's JSON
# beside it: at most five files. Every step has its own time limit, so a hang in one still leaves
# the others' output.
set -u
out=${1:-gpu-check}
part=${2:-checks}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
log="$out/log.txt"
step() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$log"; }
bench() { timeout "$1" python3 -m bench_core bench --device cuda "${@:2}" 2>&1 | tee -a "$log"; }
step machine
{ nvidia-smi -L; lscpu | grep -E "Model name|^CPU\(s\)"; python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"; } 2>&1 | tee -a "$log"
if [ "$part" = sizes ]; then
  step bench-graph-sizes
  bench 330 --no-reference --json "$out"/bench-graph-sizes.json
else
  step tests
  timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_models.py tests/test_onednn.py 2>&1 | tee -a "$log"
  step bench-graph-e5
  bench 160 --ensemble-sizes 5 --json "$out"/bench-graph-e5.json
  step bench-eager-e5
  bench 100 --ensemble-sizes 5 --no-reference --no-cuda-graph --json "$out"/bench-eager-e5.json
  step bench-graph-e5-full-epoch
  bench 100 --ensemble-sizes 5 --no-reference --full-epoch --json "$out"/bench-graph-e5-full.json
fi
step end
