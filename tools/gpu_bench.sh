#!/usr/bin/env bash
# segjax against PyTorch on a fresh GPU machine, within about 8 minutes:
#   tools/gpu_bench.sh [--dry_run] [OUT_DIR]      (default OUT_DIR: gpu_bench)
# Installs the CUDA extra when jax sees no GPU, checks that torch sees CUDA, then times every
# model's forward and train step (tools/against_torch.py, GPU-sized batches, full size) in fp32
# and then bf16, the ROI head included, and writes OUT_DIR/gpu_bench.json and gpu_bench.md.
# Models left when the time budget runs out are skipped and listed in both files.
# --dry_run does the same on this machine's CPU without the GPU parts (no install, no CUDA
# checks, tiny inputs, one model), to test the script.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
if [[ "${1:-}" == "--dry_run" ]]; then DRY_RUN=1; shift; fi
OUT=${1:-gpu_bench}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ $DRY_RUN == 1 ]]; then
  ARGS=(--batch cpu --size tiny --models "${GPU_BENCH_MODELS:-voc_resnet18}" --repeats 1)
  BUDGET=600
else
  if ! python -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then
    echo "jax sees no GPU: installing the cuda extra" >&2
    pip install -q -e ".[cuda]"
  fi
  python -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" \
    || { echo "error: jax still sees no GPU after installing the cuda extra" >&2; exit 2; }
  python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" \
    || { echo "error: this torch build has no CUDA; install a CUDA torch to compare" >&2; exit 2; }
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >&2 || true
  ARGS=(--batch gpu --size full --models "${GPU_BENCH_MODELS:-all}" --repeats 10)
  BUDGET=420  # seconds of measuring; the last model started may take a minute more
fi
python tools/benchmark.py --against torch "${ARGS[@]}" --precision both --deadline_s "$BUDGET" \
  --json "$OUT/gpu_bench.json" --markdown "$OUT/gpu_bench.md"
