#!/usr/bin/env bash
# minidiffit's entry point: `bash reproduce.sh <command>`; `bash reproduce.sh help` lists the commands.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

VENV=${MINIDIFFIT_VENV:-.venv}
PY="$VENV/bin/python"

usage() {
  cat <<'USAGE'
usage: bash reproduce.sh <command> [args]

commands:
  setup        create .venv (if missing) and install minidiffit with its dev extra
  test         unit tests, then every notebook under nbval in FAST mode
  cifar10      [--data_dir=DIR] [--key=value ...] CUDA: paper recipe, 50k samples, FID; no CUDA: CPU tier (--minutes=30)
  help         this message
USAGE
}

# Idempotent: a second run only checks that the package imports.
setup() {
  if [[ ! -x "$PY" ]]; then
    echo "== creating $VENV"
    python3 -m venv "$VENV"
  fi
  if "$PY" -c "import minidiffit, torch, einops, scipy, nbval, diffusers, safetensors" 2>/dev/null; then
    echo "== $VENV is ready"
    return
  fi
  echo "== installing minidiffit[dev] into $VENV (torch is large: the first time takes minutes)"
  "$PY" -m pip install --quiet --upgrade pip
  "$PY" -m pip install --quiet -e '.[dev]'
}

run_tests() {
  setup
  echo "== unit tests"
  "$PY" -m pytest -q tests
  echo "== notebooks (nbval, FAST mode)"
  MINIDIFFIT_FAST=1 "$PY" -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env \
    --nbval-cell-timeout=300 notebooks/
}

# CIFAR-10 (DiffiT App. I.1 with EDM's recipe). Every stage resumes or is skipped when done.
# --key=value arguments override minidiffit.train's TrainConfig (--iters=, --minutes=, --data_dir=, ...).
run_cifar10() {
  setup
  local data_dir="" a
  for a in "$@"; do [[ "$a" == --data_dir=* ]] && data_dir=${a#--data_dir=}; done
  local ngpu
  ngpu=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
  if [[ "$ngpu" -gt 0 ]]; then
    local out=runs/cifar10 launch=("$PY" -m)
    [[ "$ngpu" -gt 1 ]] && launch=("$VENV/bin/torchrun" --standalone --nproc_per_node="$ngpu" -m)
    echo "== CUDA, $ngpu GPU(s): preset cifar10, 200k iterations at batch 512 (EDM recipe) -> $out"
    "${launch[@]}" minidiffit.train --preset=cifar10 --data=cifar10 --out=$out --iters=200000 --batch=512 "$@"
    echo "== 50k samples, 18 Heun steps (35 network evaluations), EMA weights -> $out/samples"
    "${launch[@]}" minidiffit.sample --ckpt=$out/ckpt.pt --num=50000 --steps=18 --batch=500 --out=$out/samples
    if [[ ! -f minidiffit/fid.py ]]; then
      echo "== FID lands with the FID issue; stopping after sampling ($out/samples)"
      return
    fi
    local ref=runs/fid_refs/cifar10_train.npz tag="cifar10 ckpt=$out/ckpt.pt samples=50000 nfe=35"
    if [[ ! -f $ref ]]; then
      mkdir -p "$(dirname $ref)"
      "$PY" -m minidiffit.fid ref --data=cifar10 ${data_dir:+--data_dir="$data_dir"} --out=$ref
    fi
    mkdir -p results
    if grep -qsF "$tag" results/cifar10.txt && [[ results/cifar10.txt -nt $out/ckpt.pt ]]; then
      echo "== FID already in results/cifar10.txt"
    else
      "$PY" -m minidiffit.fid --samples=$out/samples --ref=$ref --results=results/cifar10.txt --tag="$tag"
    fi
    tail -n 1 results/cifar10.txt
  else
    local out=runs/cifar10_cpu
    echo "== no CUDA: CPU tier, preset small for a bounded time (default 30 minutes, --minutes= to change) -> $out"
    # Choice: CPU-tier settings (batch 32, short lr warm-up, no augmentation) so that a half-hour run
    # learns something; the EDM schedule (10 Mimg warm-up) would keep the lr near zero all along.
    "$PY" -m minidiffit.train --preset=small --data=cifar10 --out=$out --minutes=30 --batch=32 --warmup_kimg=0.5 \
      --augment_p=0 --ckpt_every=200 --log_every=10 --grid=16 "$@"
    if [[ -f $out/samples.png && $out/samples.png -nt $out/ckpt.pt ]]; then
      echo "== $out/samples.png is up to date"
    else
      echo "== 64 samples, 18 Heun steps (35 network evaluations), EMA weights -> $out/samples.png"
      "$PY" -m minidiffit.sample --ckpt=$out/ckpt.pt --num=64 --steps=18 --batch=64 --out=$out/samples.png
    fi
  fi
}

main() {
  local cmd=${1:-help}
  [[ $# -gt 0 ]] && shift
  case "$cmd" in
    setup) setup "$@" ;;
    test) run_tests "$@" ;;
    cifar10) run_cifar10 "$@" ;;
    help|-h|--help) usage ;;
    *) echo "reproduce.sh: unknown command '$cmd'" >&2; usage >&2; exit 2 ;;
  esac
}

main "$@"
