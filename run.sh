#!/usr/bin/env bash
# MRIHistoReg's two entry points on a fresh machine. Each creates .venv/ (pinned requirements) when missing.
#   ./run.sh demo [OUT_DIR]    generate the sample data and run the whole headless pipeline, writing a report
#   ./run.sh test [PYTEST_ARGS] run the whole test suite (or the files/options given, e.g. Testing/test_fitting.py -q)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
root=$PWD

pick_python() {
  # slicer-core ships wheels for CPython 3.10-3.13
  for candidate in "${PYTHON:-}" python3.12 python3.11 python3.13 python3.10 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 13) else 1)' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  echo "run.sh: needs Python 3.10-3.13 (slicer-core wheels); set PYTHON=/path/to/python3.x" >&2
  return 1
}

ensure_venv() {
  # Rebuild when the pinned requirements changed since the venv was made.
  if [ -x .venv/bin/python ] && cmp -s requirements.txt .venv/.requirements.txt; then return 0; fi
  local py; py=$(pick_python)
  echo "run.sh: creating .venv with $py (pinned requirements.txt) ..." >&2
  "$py" -m venv .venv
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
  cp requirements.txt .venv/.requirements.txt
}

command=${1:-}
[ $# -gt 0 ] && shift
case "$command" in
  demo)
    ensure_venv
    export PYTHONPATH="$root/MRIHistoReg${PYTHONPATH:+:$PYTHONPATH}"
    exec .venv/bin/python -m MRIHistoRegLib demo --out "${1:-output/demo}" "${@:2}"
    ;;
  test)
    ensure_venv
    export PYTHONPATH="$root/MRIHistoReg${PYTHONPATH:+:$PYTHONPATH}"
    exec .venv/bin/python -m pytest "$@"  # pytest.ini: testpaths = Testing
    ;;
  *)
    echo "usage: ./run.sh demo [OUT_DIR] | ./run.sh test [PYTEST_ARGS]" >&2
    exit 2
    ;;
esac
