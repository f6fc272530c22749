#!/usr/bin/env bash
# The GPU checks, as one command for a lent CUDA machine (see README, "On a GPU"):
#   bash scripts/gpu_check.sh OUTDIR
# 1. the CUDA tests (CPU against CUDA, graph-replayed against eager training) and the model tests;
# 2. the E = 5 speed table with CUDA graphs (the README's GPU table), its JSON beside it;
# 3. the same rows with eager steps, without the reference rows (what the graphs buy).
# Every step has its own time limit, so a hang in one still leaves the others' output.
set -u
out=${1:-gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi -L 2>&1 | tee "$out/machine.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" 2>&1 | tee -a "$out/machine.txt"
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_models.py 2>&1 | tee "$out/pytest.txt"
timeout 240 python3 -m bench_core bench --device cuda --ensemble-sizes 5 --json "$out/bench-graph-e5.json" 2>&1 | tee "$out/bench-graph-e5.txt"
timeout 120 python3 -m bench_core bench --device cuda --ensemble-sizes 5 --no-reference --no-cuda-graph --json "$out/bench-eager-e5.json" 2>&1 | tee "$out/bench-eager-e5.txt"
