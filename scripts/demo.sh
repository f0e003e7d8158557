#!/usr/bin/env bash
# The main job: layout -> dispatch -> combine and the low-latency pair on 4 ranks, each checked against the numpy
# reference (epcomm/demo.py). GPU backend when a GPU is visible, else the CPU backend over MPI.
# Usage: bash scripts/demo.sh [-n NUM_RANKS] [epcomm.demo arguments, e.g. --tokens 128 --hidden 1024]
# Environment: the venv comes from scripts/_venv.sh; on a GPU machine whose image already has the CUDA stack (and no
# PyPI), its python3 and Open MPI are used instead.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$EPCOMM_ROOT"
num_ranks=4
if [ "${1:-}" = "-n" ]; then num_ranks=$2; shift 2; fi
epcomm_env --allow-image-python || exit 1
# NVLink multicast stays off in every process (the GPU machines forbid it); harmless elsewhere.
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0
epcomm_mpiexec || exit 1
cmd=("${EPCOMM_MPIEXEC[@]}" -n "$num_ranks" "$EPCOMM_PY" -m epcomm.demo "$@")
echo "[epcomm demo] + ${cmd[*]}"
t0=$SECONDS
"${cmd[@]}"
rc=$?
echo "[epcomm demo] exit status $rc after $((SECONDS - t0)) s"
exit $rc
