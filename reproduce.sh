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

main() {
  local cmd=${1:-help}
  [[ $# -gt 0 ]] && shift
  case "$cmd" in
    setup) setup "$@" ;;
    test) run_tests "$@" ;;
    help|-h|--help) usage ;;
    *) echo "reproduce.sh: unknown command '$cmd'" >&2; usage >&2; exit 2 ;;
  esac
}

main "$@"
