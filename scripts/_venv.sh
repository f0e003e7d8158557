# The one place that makes the Python environment of the repo's scripts (test.sh, demo.sh, .ci/run).
# Source it, then call `epcomm_env` (venv only) or `epcomm_env --allow-image-python` (demo: on a GPU machine whose
# image already carries the CUDA stack, use that Python instead of installing from PyPI, which it cannot reach).
#
# After epcomm_env:  EPCOMM_PY = the interpreter, EPCOMM_BIN = its bin folder (the mpich wheel's mpiexec lives there
# in a venv), EPCOMM_MODE = venv | image | explicit, EPCOMM_CACHE_DIR = the kernel cache (inside the venv, so a fresh
# clone compiles from scratch and never reads ~/.cache/epcomm).
#
# Settings (environment):
#   EPCOMM_VENV     the venv folder (default: <repo>/.venv, gitignored)
#   EPCOMM_EXTRAS   extras to install (default: cuda13,test)
#   EPCOMM_PYTHON   use this interpreter as it is (no venv, no install); the checkout goes on PYTHONPATH
#   PYTHON          the interpreter that creates the venv (default: python3)
# The venv is (re)installed when missing or when pyproject.toml, the extras or the base Python changed since the
# last successful install (a stamp file inside the venv records them).

EPCOMM_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

_epcomm_log() { echo "[epcomm env] $*"; }

_epcomm_base_python() {
  local cand
  for cand in "${PYTHON:-}" python3 python3.12 python3.11 python3.10 python; do
    [ -n "$cand" ] || continue
    if command -v "$cand" >/dev/null 2>&1 &&
       "$cand" -c 'import sys; raise SystemExit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
      command -v "$cand"
      return 0
    fi
  done
  return 1
}

# The stamp: what the install depends on. A change re-runs pip install (not a fresh venv).
_epcomm_stamp() {
  local base=$1
  {
    cat "$EPCOMM_ROOT/pyproject.toml"
    echo "extras=$EPCOMM_EXTRAS"
    "$base" -c 'import sys; print(sys.version)'
  } | (sha256sum 2>/dev/null || shasum -a 256) | cut -d' ' -f1
}

_epcomm_make_venv() {
  local base=$1 venv=$2
  _epcomm_log "creating venv $venv with $base ($("$base" --version 2>&1))"
  if "$base" -m venv "$venv"; then
    return 0
  fi
  # Some distributions ship Python without ensurepip: get virtualenv from PyPI instead.
  _epcomm_log "python -m venv failed; trying virtualenv from PyPI"
  rm -rf "$venv"
  local tmp
  tmp=$(mktemp -d)
  "$base" -m pip install --quiet --target "$tmp" virtualenv && PYTHONPATH="$tmp" "$base" -m virtualenv -q "$venv"
  local rc=$?
  rm -rf "$tmp"
  return $rc
}

# Create or update the venv; sets EPCOMM_PY. Prints every step and its time.
epcomm_venv() {
  local venv=${EPCOMM_VENV:-$EPCOMM_ROOT/.venv}
  EPCOMM_EXTRAS=${EPCOMM_EXTRAS:-cuda13,test}
  local base
  base=$(_epcomm_base_python) || { _epcomm_log "no Python >= 3.10 found (set PYTHON=...)"; return 1; }
  local stamp_file="$venv/.epcomm-install-stamp" want
  want=$(_epcomm_stamp "$base")
  if [ -x "$venv/bin/python" ] && [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$want" ]; then
    _epcomm_log "venv $venv is up to date ($("$venv/bin/python" --version 2>&1))"
  else
    local t0=$SECONDS
    if [ ! -x "$venv/bin/python" ]; then
      _epcomm_make_venv "$base" "$venv" || { _epcomm_log "could not create the venv $venv"; return 1; }
    fi
    local pip_flags=(--disable-pip-version-check)
    [ -n "${CI:-}" ] && pip_flags+=(--progress-bar off)
    _epcomm_log "+ $venv/bin/python -m pip install ${pip_flags[*]} -e '$EPCOMM_ROOT[$EPCOMM_EXTRAS]'"
    if ! "$venv/bin/python" -m pip install "${pip_flags[@]}" -e "$EPCOMM_ROOT[$EPCOMM_EXTRAS]"; then
      _epcomm_log "pip install failed (needs PyPI; on a machine without it set EPCOMM_PYTHON to a ready interpreter)"
      return 1
    fi
    echo "$want" > "$stamp_file"
    _epcomm_log "installed in $((SECONDS - t0)) s"
  fi
  EPCOMM_PY="$venv/bin/python"
  EPCOMM_BIN="$venv/bin"
  EPCOMM_MODE=venv
  export EPCOMM_CACHE_DIR=${EPCOMM_CACHE_DIR:-$venv/epcomm-cache}
}

# True when a GPU is visible and the interpreter already imports the CUDA stack (the GPU machines' image).
_epcomm_image_python_ok() {
  local py=$1
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU' || return 1
  "$py" -c 'import numpy, ml_dtypes, mpi4py, cupy' >/dev/null 2>&1
}

epcomm_env() {
  local allow_image=0
  [ "${1:-}" = "--allow-image-python" ] && allow_image=1
  if [ -n "${EPCOMM_PYTHON:-}" ]; then
    EPCOMM_PY=$(command -v "$EPCOMM_PYTHON") || { _epcomm_log "EPCOMM_PYTHON=$EPCOMM_PYTHON not found"; return 1; }
    EPCOMM_MODE=explicit
  elif [ $allow_image = 1 ] && [ ! -x "${EPCOMM_VENV:-$EPCOMM_ROOT/.venv}/bin/python" ] &&
       _epcomm_image_python_ok "$(command -v python3 || echo python3)"; then
    EPCOMM_PY=$(command -v python3)
    EPCOMM_MODE=image
  else
    epcomm_venv || return 1
  fi
  if [ "$EPCOMM_MODE" != venv ]; then
    EPCOMM_BIN=$(dirname "$EPCOMM_PY")
    export PYTHONPATH="$EPCOMM_ROOT${PYTHONPATH:+:$PYTHONPATH}"
    export EPCOMM_CACHE_DIR=${EPCOMM_CACHE_DIR:-$EPCOMM_ROOT/.epcomm_cache}
    _epcomm_log "using $EPCOMM_PY ($EPCOMM_MODE: no venv, no install; checkout on PYTHONPATH)"
  fi
  _epcomm_log "python $EPCOMM_PY, kernel cache $EPCOMM_CACHE_DIR"
}

# The mpiexec that matches EPCOMM_PY's mpi4py, as an array EPCOMM_MPIEXEC (launcher plus the flags it needs):
# the mpich wheel's (venv bin) runs as root with no flags; Open MPI (the GPU machines' /usr/bin/mpirun) needs
# --oversubscribe, and as root OMPI_ALLOW_RUN_AS_ROOT(_CONFIRM)=1.
epcomm_mpiexec() {
  local exe
  if [ -x "$EPCOMM_BIN/mpiexec" ]; then
    exe="$EPCOMM_BIN/mpiexec"
  else
    exe=$(command -v mpiexec || command -v mpirun) || { _epcomm_log "no mpiexec found"; return 1; }
  fi
  local version
  version=$("$exe" --version 2>&1 | head -3)
  if echo "$version" | grep -qiE 'open mpi|openrte|open-rte'; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    EPCOMM_MPIEXEC=("$exe" --oversubscribe --bind-to none)
    local var
    for var in PYTHONPATH EPCOMM_CACHE_DIR EPCOMM_BACKEND EPCOMM_TIMEOUT_S NVSHMEM_DISABLE_NVLS NCCL_NVLS_ENABLE; do
      [ -n "${!var:-}" ] && EPCOMM_MPIEXEC+=(-x "$var")
    done
    _epcomm_log "mpiexec $exe (Open MPI)"
  else
    EPCOMM_MPIEXEC=("$exe")
    _epcomm_log "mpiexec $exe ($(echo "$version" | grep -m1 -i 'version' | tr -s ' ' || echo MPICH))"
  fi
}
