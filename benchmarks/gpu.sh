#!/usr/bin/env bash
# A real-width Llama-shaped random model (hidden 4096, intermediate 11008) on one GPU:
# collect tokens/s vs a plain forward, discover time, heal steps/s (benchmarks/gpu_scale.py).
#
# Usage: benchmarks/gpu.sh [OUT_DIR]      (default: $OUT, else ./gpu-out)
#   env: PYTHON (default python3), LAYERS (4), TOKENS (16384), SEQ (512), BATCH (16),
#        HEAL_STEPS (20), MEMORY (8GiB, the dask discover's budget), DRY=1 (tiny widths on
#        the CPU: checks the script end to end without a GPU)
# Writes OUT_DIR/gpu_scale.json (every figure, rewritten after each one, so a run cut short
# keeps what it measured), OUT_DIR/gpu_scale.log and OUT_DIR/device.txt.
# Needs fbnprune's dependencies with a CUDA build of torch (the device machine has no
# network: nothing is installed here). About 4 minutes on an H200 with the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-./gpu-out}}"
mkdir -p "$out"
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"

if ! "$PYTHON" -c "import torch, transformers, dask, zarr, sklearn" 2>"$out/imports.err"; then
    echo "gpu.sh: $PYTHON lacks fbnprune's dependencies (see $out/imports.err)" >&2
    exit 2
fi
{
    date -u
    uname -a
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
    'available', torch.cuda.is_available())"
    if command -v nvidia-smi >/dev/null; then nvidia-smi; fi
} >"$out/device.txt" 2>&1

if [[ "${DRY:-0}" == 1 ]]; then
    args=(--device cpu --tiny --layers 2 --tokens 1024 --seq 64 --batch 8 --components 16
          --memory 256MiB --in-memory --heal-steps 3 --heal-batch 2)
else
    if ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
        echo "gpu.sh: no CUDA device visible (DRY=1 runs the CPU dry run)" >&2
        exit 2
    fi
    args=(--device cuda --layers "${LAYERS:-4}" --tokens "${TOKENS:-16384}" --seq "${SEQ:-512}"
          --batch "${BATCH:-16}" --memory "${MEMORY:-8GiB}" --in-memory
          --heal-steps "${HEAL_STEPS:-20}")
fi
set -o pipefail
"$PYTHON" benchmarks/gpu_scale.py "${args[@]}" --work "$out/work" --out "$out/gpu_scale.json" \
    2>&1 | tee "$out/gpu_scale.log"
rm -rf "$out/work"  # the activation store: GBs, not a figure
echo "figures: $out/gpu_scale.json"
