#!/usr/bin/env bash
# minidiffit's entry point: `bash reproduce.sh <command>`; `bash reproduce.sh help` lists the commands.
# The pipelines are Python (minidiffit/tools/pipelines.py, `python -m minidiffit CMD`); this file installs,
# tests, and hands them over.
set -euo pipefail
export MINIDIFFIT_CALLER_PWD=$PWD  # relative paths the user passes (--data_dir=..., DATA_DIR, --ref=) are theirs
cd "$(dirname "${BASH_SOURCE[0]}")"

VENV=${MINIDIFFIT_VENV:-.venv}
PY="$VENV/bin/python"

usage() {
  cat <<'USAGE'
usage: bash reproduce.sh <command> [args]

commands:
  setup        create .venv (if missing) and install minidiffit with its dev extra
  test         unit tests, then every notebook and its solutions under nbval in FAST mode
  fashion      [--data_dir=DIR]  the laptop tier: both DiffiT pipelines on Fashion-MNIST, grids and FIDs (<= 30 min on 2 CPU cores)
  ablations    [--data_dir=DIR] [--image=a,b] [--latent=a,b] [--seeds=K] [--scale=X]  DiffiT's ablations on Fashion-MNIST,
               both families, 3 paired seeds per variant (CPU: ~3 h on 2 cores; runs with a row in results/ are kept)
  nfe          after fashion: FID against network evaluations for every sampler of both models (~25 min on 2 CPU cores)
  cifar10      [--data_dir=DIR] [--key=value ...] CUDA: paper recipe, 50k samples, FID; no CUDA: CPU tier (--minutes=30)
  imagenet256  DATA_DIR [--ref=ADM_REF.npz] [--key=value ...] | --weights FILE   prepare, train, sample, FID; no CUDA: FAST toy run
  gpu-check    with CUDA, run this first (minutes): bf16, compile, DDP, the attention kernel, measured vs estimated rate
  help         this message

Every pipeline prints each command it runs (python -m minidiffit ...) and skips the stages that are done;
`python -m minidiffit CMD --help` describes one.
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
  echo "== notebooks and solutions (nbval, FAST mode)"
  MINIDIFFIT_FAST=1 "$PY" -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env \
    --nbval-cell-timeout=300 notebooks/
}

cmd=${1:-help}
[[ $# -gt 0 ]] && shift
case "$cmd" in
  setup) setup "$@" ;;
  test) run_tests "$@" ;;
  fashion|ablations|nfe|cifar10|imagenet256|gpu-check) setup; exec "$PY" -m minidiffit "$cmd" "$@" ;;
  help|-h|--help) usage ;;
  *) echo "reproduce.sh: unknown command '$cmd'" >&2; usage >&2; exit 2 ;;
esac
