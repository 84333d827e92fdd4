#!/usr/bin/env bash
# MRIHistoReg's two entry points on a fresh machine. Each creates .venv/ (pinned requirements) when missing.
#   ./run.sh demo [OUT_DIR]    generate the sample data and run the whole headless pipeline, writing a report
#   ./run.sh test               run the whole test suite twice: on the pinned stack (.venv) and on the oldest
#                               supported Slicer's numpy/SimpleITK/tifffile (.venv-slicer-stack), each on
#                               TEST_WORKERS pytest-xdist processes (default 2)
#   ./run.sh test PYTEST_ARGS   only the files/options given, on .venv (e.g. Testing/test_fitting.py -q)
#   ./run.sh test --slicer-stack [PYTEST_ARGS]   only on .venv-slicer-stack
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
root=$PWD

pick_python() {
  # slicer-core ships wheels for CPython 3.10-3.13; the pinned tifffile and matplotlib need 3.11 or later
  for candidate in "${PYTHON:-}" python3.12 python3.11 python3.13 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] <= (3, 13) else 1)' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  echo "run.sh: needs Python 3.11-3.13 (slicer-core wheels, the pinned tifffile); set PYTHON=/path/to/python3.x" >&2
  return 1
}

ensure_venv() {
  # ensure_venv DIR REQUIREMENTS: (re)build DIR when REQUIREMENTS changed since it was made.
  local venv=${1:-.venv} requirements=${2:-requirements.txt}
  if [ -x "$venv/bin/python" ] && cmp -s "$requirements" "$venv/.requirements.txt"; then return 0; fi
  local py; py=$(pick_python)
  echo "run.sh: creating $venv with $py ($requirements) ..." >&2
  rm -rf "$venv"
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
  cp "$requirements" "$venv/.requirements.txt"
}

run_suite() {
  # run_suite VENV PYTEST_ARGS...
  local venv=$1; shift
  PYTHONPATH="$root/MRIHistoReg${PYTHONPATH:+:$PYTHONPATH}" "$venv/bin/python" -m pytest "$@"  # pytest.ini: testpaths
}

command=${1:-}
[ $# -gt 0 ] && shift
case "$command" in
  demo)
    ensure_venv .venv requirements.txt
    export PYTHONPATH="$root/MRIHistoReg${PYTHONPATH:+:$PYTHONPATH}"
    exec .venv/bin/python -m MRIHistoRegLib demo --out "${1:-output/demo}" "${@:2}"
    ;;
  test)
    if [ "${1:-}" = "--slicer-stack" ]; then
      shift
      ensure_venv .venv-slicer-stack requirements-slicer-stack.txt
      run_suite .venv-slicer-stack "$@"
      exit $?
    fi
    ensure_venv .venv requirements.txt
    if [ $# -gt 0 ]; then
      run_suite .venv "$@"
      exit $?
    fi
    # Most tests are single-threaded numpy, so one worker process per core shortens the run; the threaded
    # elastix/SimpleITK refinements share the cores either way.
    workers=${TEST_WORKERS:-2}
    echo "run.sh: test suite on the pinned stack (.venv), $workers workers" >&2
    status=0
    run_suite .venv -n "$workers" || status=$?
    ensure_venv .venv-slicer-stack requirements-slicer-stack.txt
    # The minutes-long B-spline refinements (their accuracy targets) ran above; here the same calls into
    # numpy/SimpleITK/tifffile run in every other test, the affine and small B-spline refinements included.
    echo "run.sh: test suite on the oldest supported Slicer's stack (.venv-slicer-stack), $workers workers" >&2
    run_suite .venv-slicer-stack -n "$workers" -m "not bspline_refinement" || status=$?
    exit $status
    ;;
  *)
    echo "usage: ./run.sh demo [OUT_DIR] | ./run.sh test [PYTEST_ARGS]" >&2
    exit 2
    ;;
esac
