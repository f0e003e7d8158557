#!/usr/bin/env bash
# The GPU suite: on a machine with GPUs, install what is missing, then run the GPU checks under mpirun on all
# visible GPUs (and several ranks per GPU for EP4/EP8 correctness), then the quick standard benchmarks (one rank per
# GPU; EP1 on one GPU); prints a short table. --experiments also runs bench/experiments/ (two or more GPUs).
# Usage: bash scripts/gpu_suite.sh [--quick] [--no-bench] [--bench-full] [--experiments]
# Results: ./gpu_out (ignored by git, emptied at the start of every run) gets every log, bench JSON line file and plot;
# when $OUT is set (the device tool, which returns at most 8 files) they also go there as ONE archive, gpu_suite.tgz,
# beside a copy of the summary table. Only the JSON lines are kept in the tree (bench/results/*.jsonl, which the
# benchmarks also append to); logs stay out of it, plots are redrawn by bench/plot.py (see bench/NOTES.md).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUTDIR=$ROOT/gpu_out; rm -rf "$OUTDIR"; mkdir -p "$OUTDIR"
QUICK=0; BENCH=1; BENCH_ARGS="--quick"; EXPERIMENTS=0
for a in "$@"; do case $a in --quick) QUICK=1;; --no-bench) BENCH=0;; --bench-full) BENCH_ARGS="";; --experiments) EXPERIMENTS=1;; esac; done
PY=${PYTHON:-python3}

# 1. What the GPU image lacks: nvshmem4py (wheel carried in wheels/, installed beside the tree).
whl=$(ls "$ROOT"/wheels/nvshmem4py*cp312*.whl 2>/dev/null | head -1)
if [ -n "$whl" ] && [ ! -d "$ROOT/.gpu_deps/nvshmem" ]; then
  $PY -m pip install -q --no-deps --target "$ROOT/.gpu_deps" "$whl" >/dev/null 2>&1 || echo "nvshmem4py install failed"
elif [ -z "$whl" ]; then
  echo "WARNING: no nvshmem4py wheel in wheels/ (the image lacks nvshmem4py; NVSHMEM checks will fail)"
fi
export PYTHONPATH="$ROOT:$ROOT/.gpu_deps${PYTHONPATH:+:$PYTHONPATH}"
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
export EPCOMM_CACHE_DIR=${EPCOMM_CACHE_DIR:-$ROOT/.epcomm_cache}
export EPCOMM_TIMEOUT_S=${EPCOMM_TIMEOUT_S:-20}
# The device copy of the tree may have no git metadata: pass EPCOMM_COMMIT=<hash> to stamp benchmark records.
export EPCOMM_COMMIT=${EPCOMM_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}
$PY -c "import nvshmem, nvshmem.core as c; print('nvshmem4py from', nvshmem.__path__, 'init' in dir(c))" 2>&1 | tail -1
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
echo "GPU suite: $NGPU x $CARD, commit ${EPCOMM_COMMIT:-unknown}"
MPIRUN="mpirun --oversubscribe --bind-to none -x PYTHONPATH -x NVSHMEM_DISABLE_NVLS -x NCCL_NVLS_ENABLE -x EPCOMM_CACHE_DIR -x EPCOMM_TIMEOUT_S -x EPCOMM_COMMIT -x EPCOMM_JIT_QUIET -x XLA_PYTHON_CLIENT_PREALLOCATE -x TORCH_SYMM_MEM_DISABLE_MULTICAST"
declare -a ROWS
bundle() {  # everything in gpu_out/ as one archive in $OUT (the device tool returns at most 8 files)
  [ -n "${OUT:-}" ] || return 0
  mkdir -p "$OUT" && tar czf "$OUT/gpu_suite.tgz" -C "$OUTDIR" . 2>/dev/null
}
ONLY=${ONLY:-}  # e.g. ONLY="bench interop": run only steps whose name contains one of these words
SKIP=${SKIP:-}  # e.g. SKIP="oversub": then leave out steps whose name contains one of these words
run() {  # run NAME TIMEOUT CMD...: logs to $OUTDIR/NAME.log, records a table row
  local name=$1 tmo=$2; shift 2
  if [ -n "$ONLY" ]; then local hit=0; for w in $ONLY; do [[ $name == *$w* ]] && hit=1; done; [ $hit = 0 ] && return; fi
  for w in $SKIP; do [[ $name == *$w* ]] && return; done
  local t0=$(date +%s)
  timeout "$tmo" "$@" > "$OUTDIR/$name.log" 2>&1; local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  local summary=$(grep -E "^[0-9]+ passed, [0-9]+ failed" "$OUTDIR/$name.log" | tail -1)
  [ -z "$summary" ] && summary=$(tail -1 "$OUTDIR/$name.log" | cut -c1-70)
  ROWS+=("$(printf '%-28s %-6s %4ss  %s' "$name" "$([ $rc -eq 0 ] && echo PASS || echo "FAIL($rc)")" "$dt" "$summary")")
  [ $rc -ne 0 ] && { echo "---- $name (rc=$rc), last lines:"; tail -25 "$OUTDIR/$name.log"; }
  printf '%s\n' "${ROWS[-1]}" >> "$OUTDIR/steps.txt"
  bundle  # after every step, so a run cut short still returns what it did
}
# 2. Compile every kernel once, in one process, so that ranks hit the cache (and compile errors show here).
run prewarm 120 $PY -m epcomm.runtime.prewarm
# 3. Bootstrap and correctness.
run bootstrap_ep$NGPU 60 $MPIRUN -n $NGPU $PY tests/gpu/bootstrap_check.py
run intranode_ep$NGPU 150 $MPIRUN -n $NGPU $PY tests/gpu/intranode_check.py $([ $QUICK = 1 ] && echo --quick)
run low_latency_ep$NGPU 120 $MPIRUN -n $NGPU $PY tests/gpu/low_latency_check.py $([ $QUICK = 1 ] && echo --quick)
run interop_ep$NGPU 90 $MPIRUN -n $NGPU $PY tests/gpu/interop_check.py
run demo_ep$NGPU 60 $MPIRUN -n $NGPU $PY -m epcomm.demo --backend gpu
# DeepEP's callers (vLLM, SGLang, Megatron-Core, torchtitan sequences with CUDA tensors) under torchrun and mpirun,
# two ranks (sharing the GPU on a one-GPU machine), 10^4 GPU create/destroy cycles (300 took 0.8 s on one H100).
run dropin_torchrun_ep2 150 $PY -m torch.distributed.run --standalone --nproc-per-node 2 tests/gpu/dropin_check.py --cycles 10000
run dropin_mpirun_ep2 150 $MPIRUN -n 2 $PY tests/gpu/dropin_check.py --quick
# 4. The quick standard benchmarks, one rank per GPU: on one GPU that is EP1 (no peer: no NVLink ceiling, no NCCL
#    baseline; the host and device times of every call are still recorded).
if [ $BENCH = 1 ] && [ $NGPU -ge 1 ]; then
  run bench_intranode 300 $MPIRUN -n $NGPU $PY bench/bench_intranode.py $BENCH_ARGS --out "$OUTDIR"
  cat "$OUTDIR/bench_intranode.log" | grep -E "^\|" || true
  if [ $NGPU -ge 4 ]; then  # the EP2 workload of issue 3 on two of the GPUs as well
    run bench_intranode_ep2 400 $MPIRUN -n 2 -x CUDA_VISIBLE_DEVICES=0,1 $PY bench/bench_intranode.py $BENCH_ARGS --out "$OUTDIR"
    cat "$OUTDIR/bench_intranode_ep2.log" | grep -E "^\|" || true
  fi
  run bench_low_latency 120 $MPIRUN -n $NGPU $PY bench/bench_low_latency.py $BENCH_ARGS --out "$OUTDIR"
  cat "$OUTDIR/bench_low_latency.log" | grep -E "^\|" || true
fi
# Experiments (bench/experiments/, diagnostics: where the time goes; they print, split / frame / items also record).
if [ $EXPERIMENTS = 1 ] && [ $NGPU -ge 2 ]; then
  run exp_link_probes 120 $MPIRUN -n $NGPU $PY bench/experiments/link_probes.py
  run exp_intranode_split 600 $MPIRUN -n $NGPU $PY bench/experiments/intranode_split.py --quick --out "$OUTDIR"
  run exp_low_latency_combine_diag 180 $MPIRUN -n $NGPU $PY bench/experiments/low_latency_combine_diag.py --quick
fi
# 5. Several ranks per GPU (EP2 on one GPU, EP4 / EP8 correctness on fewer GPUs; time-sliced, so correctness only),
#    last. On one GPU the steps above ran EP1 (what a user with one GPU tries first).
if [ $NGPU -eq 1 ]; then
  run intranode_ep2_oversub 150 $MPIRUN -n 2 $PY tests/gpu/intranode_check.py --oversubscribed
  run low_latency_ep2_oversub 150 $MPIRUN -n 2 $PY tests/gpu/low_latency_check.py --oversubscribed
fi
if [ $QUICK = 0 ]; then
  run intranode_ep4_oversub 120 $MPIRUN -n 4 $PY tests/gpu/intranode_check.py --oversubscribed
  run low_latency_ep4_oversub 120 $MPIRUN -n 4 $PY tests/gpu/low_latency_check.py --oversubscribed
  run intranode_ep8_oversub 120 $MPIRUN -n 8 $PY tests/gpu/intranode_check.py --oversubscribed
  run low_latency_ep8_oversub 150 $MPIRUN -n 8 $PY tests/gpu/low_latency_check.py --oversubscribed
fi
{ echo; echo "==== GPU suite summary ($NGPU x $CARD, commit ${EPCOMM_COMMIT:-unknown})"
  printf '%s\n' "${ROWS[@]}"; } | tee "$OUTDIR/summary.txt"
bundle
[ -n "${OUT:-}" ] && cp "$OUTDIR/summary.txt" "$OUT/summary.txt"
grep -q "FAIL" "$OUTDIR/steps.txt" 2>/dev/null && exit 1
exit 0
