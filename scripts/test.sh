#!/usr/bin/env bash
# The test suite on any machine, GPU or not: makes the venv if missing (scripts/_venv.sh), then runs pytest on tests/
# (reference, validation, the CPU backend under mpiexec -n 2/3/4, NVRTC compiles of every kernel, the wheel, the docs).
# Usage: bash scripts/test.sh [extra pytest arguments, e.g. -k packaging or -m "not slow"]
# Exit status: pytest's (5 = no tests collected).
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$EPCOMM_ROOT"
epcomm_env || exit 1
export EPCOMM_JIT_QUIET=${EPCOMM_JIT_QUIET:-1}
cmd=("$EPCOMM_PY" -m pytest -q tests/ "$@")
echo "[epcomm test] + ${cmd[*]}"
t0=$SECONDS
"${cmd[@]}"
rc=$?
echo "[epcomm test] pytest exit status $rc after $((SECONDS - t0)) s"
exit $rc
