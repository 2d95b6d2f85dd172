#!/usr/bin/env bash
# One entry point for people and CI: sets up .venv (once; again when pyproject.toml changes; the test extra only for
# `test`) and then
#   bash scripts/dev.sh run    runs the default Kedro pipeline on the embedded default configuration
#   bash scripts/dev.sh test   runs the test suite; as root it first installs Debian's chromium and chromium-driver
#                              (apt) for the kedro-viz browser tests when they are missing
#   bash scripts/dev.sh setup  only sets up
set -euo pipefail
cd "$(dirname "$0")/.."

# nothing phones home
export KEDRO_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1 DVC_DAEMON=0 HF_HUB_OFFLINE=1

venv="${PH_REG_VENV:-.venv}"
case "$venv" in /*) ;; *) venv="$PWD/$venv" ;; esac
if [ ! -x "$venv/bin/python" ]; then
  python=$(command -v python3.11 || command -v python3)
  "$python" -m venv "$venv"
fi
# `run` and `setup` install the project alone (pip install -e .); `test` also its test extra (-e ".[test]": pytest,
# hypothesis, selenium, ... which the run never imports). A stamp marks each install, redone when pyproject.toml
# changes; .ph-reg-installed marks the full one (test extra included), which serves every command.
full="$venv/.ph-reg-installed"
base="$venv/.ph-reg-installed-run"
fresh() { [ -f "$1" ] && [ ! pyproject.toml -nt "$1" ]; }
install() {  # $1: what pip installs, $2: its stamp
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -e "$1"
  touch "$2"
}
if [ "${1:-}" = test ]; then
  fresh "$full" || install ".[test]" "$full"
else
  fresh "$full" || fresh "$base" || install "." "$base"
fi
export PATH="$venv/bin:$PATH"

# The kedro-viz browser tests (tests/integration/test_viz.py, marker `browser`) drive Debian's chromium through chromedriver.
# As root they are installed here when missing; where that cannot be done those tests skip, naming what is missing
# (under CI=true they fail instead).
browser_packages() {
  local missing=()
  command -v "${PH_REG_CHROMIUM:-chromium}" >/dev/null 2>&1 || missing+=(chromium)
  command -v "${PH_REG_CHROMEDRIVER:-chromedriver}" >/dev/null 2>&1 || missing+=(chromedriver)
  if [ "${#missing[@]}" -eq 0 ]; then
    return 0
  fi
  local skip="the kedro-viz browser tests will skip (or fail under CI=true)"
  if [ "$(id -u)" != 0 ]; then
    echo "dev.sh: ${missing[*]} not found and not root: $skip; install them with" \
         "'sudo apt-get install -y chromium chromium-driver'" >&2
  elif ! command -v apt-get >/dev/null 2>&1; then
    echo "dev.sh: ${missing[*]} not found and no apt-get: $skip; install chromium and its chromedriver" >&2
  else
    echo "dev.sh: installing chromium and chromium-driver for the kedro-viz browser tests (apt-get)" >&2
    if ! (export DEBIAN_FRONTEND=noninteractive
          apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) </dev/null; then
      echo "dev.sh: apt-get could not install chromium and chromium-driver (its errors are above): $skip" >&2
    fi
  fi
}

case "${1:-}" in
  setup) ;;
  run) shift; kedro run "$@" ;;
  test) shift; browser_packages; python -m pytest -q "$@" ;;
  *) echo "usage: bash scripts/dev.sh run|test|setup [extra args]" >&2; exit 2 ;;
esac
