#!/usr/bin/env bash
# The checks that need a GPU, in one short run: the CUDA tests, then the replay benchmark on CPU
# and on CUDA side by side, then what diff's fingerprints cost on CUDA.
# Usage (on a machine with a GPU): bash scripts/gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
"$python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('device:', torch.cuda.get_device_name())"
"$python" -m pytest -q -m cuda tests/test_cuda.py
cd benchmarks
"$python" bench_replay.py --rounds 15 --device cpu
"$python" bench_replay.py --rounds 15 --device cuda
"$python" bench_diff.py --rounds 15 --device cuda
