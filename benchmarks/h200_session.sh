#!/bin/bash
# A prepared device session for a GPU (H100/H200) lease, NOT yet run (on 2026-12-04 no machine was lent). Before it,
# two calls put the FID network at /tmp/dev/inception.pt (carried in two halves: the tree may carry 64 MiB) and run
# `python -m minidiffit gpu-check`. It runs experiments/recipe.py (the laptop tier's recipe search) and
# experiments/ablations.py (both families, 3 paired seeds) with the package's float32 eager path (--bf16=false
# --compile=false, TF32 matmuls as select_device sets): the CPU's arithmetic at the same number of images, many
# runs at once. Outputs -> $OUT (results/recipe.*, results/ablations.*, logs). There: bash benchmarks/h200_session.sh DATA_DIR
set -u
D=$1
export PYTHONUNBUFFERED=1 MINIDIFFIT_INCEPTION=/tmp/dev/inception.pt JOB_THREADS=1
t0=$(date +%s)
left() { echo $(( 470 - ($(date +%s) - t0) )); }
nvidia-smi -L
echo "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34  /tmp/dev/inception.pt" | sha256sum -c || exit 3
if nvidia-cuda-mps-control -d 2>/dev/null && timeout 60 python -c "import torch; torch.zeros(1).cuda().sum().item()"; then
  echo "MPS on: the runs share the GPU concurrently"
else
  echo quit | nvidia-cuda-mps-control 2>/dev/null; echo "no MPS: the runs time-slice the GPU"
fi
timeout $(( $(left) - 190 )) python experiments/recipe.py --data_dir=$D --jobs=14 2>&1 | tee $OUT/recipe.log
[ -f runs/recipe/best.json ] || python experiments/recipe.py --best_only
cp results/recipe.jsonl results/recipe.txt runs/recipe/best.json $OUT/ 2>/dev/null
echo "== $(( $(date +%s) - t0 )) s: ablations with the search's best settings"
timeout $(( $(left) - 20 )) python experiments/ablations.py --data_dir=$D --recipe=runs/recipe/best.json --jobs=15 \
  2>&1 | tee $OUT/ablations.log
cp results/ablations.txt results/ablations.json runs/ablations/rows.jsonl $OUT/ 2>/dev/null
echo "== done in $(( $(date +%s) - t0 )) s"
