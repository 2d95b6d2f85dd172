#!/usr/bin/env bash
# One entry point for people and CI: sets up .venv (once; again when pyproject.toml changes) and then
#   bash scripts/dev.sh run    runs the default Kedro pipeline on the embedded default configuration
#   bash scripts/dev.sh test   runs the test suite
#   bash scripts/dev.sh setup  only sets up
set -euo pipefail
cd "$(dirname "$0")/.."

# nothing phones home
export KEDRO_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1 DVC_DAEMON=0 HF_HUB_OFFLINE=1

venv="${PH_REG_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python=$(command -v python3.11 || command -v python3)
  "$python" -m venv "$venv"
fi
stamp="$venv/.ph-reg-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -e ".[test]"
  touch "$stamp"
fi
export PATH="$PWD/$venv/bin:$PATH"

case "${1:-}" in
  setup) ;;
  run) shift; kedro run "$@" ;;
  test) shift; python -m pytest -q "$@" ;;
  *) echo "usage: bash scripts/dev.sh run|test|setup [extra args]" >&2; exit 2 ;;
esac
