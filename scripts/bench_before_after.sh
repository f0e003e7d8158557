#!/usr/bin/env bash
# Before/after on the lent GPU, in one run: the standard intranode and low-latency benchmarks of a base tree (a copy of
# an earlier commit, e.g. `git archive BASE | tar -x -C .base`) and of this tree, alternated twice, one rank (EP1:
# host and device time of every call; no NVLink), each with its own kernel cache. Usage (after scripts/gpu_suite.sh
# has installed nvshmem4py into .gpu_deps): bash scripts/bench_before_after.sh .base [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD BASE=$(cd "${1:?usage: bench_before_after.sh BASE_DIR [--quick]}" && pwd); shift
PY=${PYTHON:-python3}
OUTDIR=$ROOT/gpu_out/before_after; mkdir -p "$OUTDIR"
export NVSHMEM_DISABLE_NVLS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 EPCOMM_JIT_QUIET=1
MPIRUN="mpirun --oversubscribe --bind-to none -x PYTHONPATH -x NVSHMEM_DISABLE_NVLS -x EPCOMM_CACHE_DIR -x EPCOMM_COMMIT -x EPCOMM_JIT_QUIET"
for round in 1 2; do
  for side in base new; do
    tree=$([ $side = base ] && echo "$BASE" || echo "$ROOT")
    for b in bench_intranode bench_low_latency; do
      log=$OUTDIR/${side}_${b}_round$round.log
      PYTHONPATH="$tree:$ROOT/.gpu_deps" EPCOMM_CACHE_DIR=$tree/.epcomm_cache EPCOMM_COMMIT=$side \
        timeout 240 $MPIRUN -n 1 $PY "$tree/bench/$b.py" "$@" --out "$OUTDIR/$side" > "$log" 2>&1
      echo "== $side $b round $round (rc=$?)"; grep -E "^\|" "$log" | head -40 || tail -5 "$log"
    done
  done
done
[ -n "${OUT:-}" ] && tar czf "$OUT/before_after.tgz" -C "$OUTDIR" . 2>/dev/null
exit 0
