#!/usr/bin/env bash
# GPU check, for a CUDA machine with nothing to download (see benchmarks/gpu_check.py for what it prints).
# Here, once: benchmarks/gpu_wheels.sh (fills .whl/ with the wheels that machine lacks and the source photo).
# There, from the repository root, carrying .whl:  bash benchmarks/gpu_check.sh
# Finishes in under 5 minutes on one H100; without CUDA it prints a clear message and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)' 2>/dev/null; then
  echo "gpu_check: no CUDA device visible to torch here (or no torch): nothing to check; run it on a GPU machine"
  exit 0
fi
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: installing the carried wheels failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 290 "$PY" benchmarks/gpu_check.py "$@"
rc=$?
[ $rc -eq 124 ] && echo "gpu_check: stopped at its 290 s limit (use --size 10000 for a smaller mosaic)"
exit $rc
