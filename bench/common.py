"""Shared benchmark plumbing: the one byte-accounting function, timing with CUDA events, result records."""
from __future__ import annotations

import datetime
import json
import os
import subprocess

import numpy as np


def workload_args(tokens: int, iters: int, quick_iters: int, trace_help: str):
    """The benchmarks' command line: the workload (--tokens/--hidden/--topk/--experts, DeepEP's shapes by default),
    --iters (--quick: quick_iters), --out (a folder that also gets the JSON lines) and --trace (diagnostics)."""
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=tokens)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--iters", type=int, default=iters)
    ap.add_argument("--quick", action="store_true", help="fewer iterations")
    ap.add_argument("--out", default=None)
    ap.add_argument("--trace", action="store_true", help=trace_help)
    args = ap.parse_args()
    args.iters = quick_iters if args.quick else args.iters
    return args


def bytes_per_row(op: str, dtype: str, hidden: int) -> int:
    """Bytes of one token row as DeepEP counts them: bf16 2H; FP8 H + 4 * H/128 (scales)."""
    if dtype == "bf16":
        return 2 * hidden
    if dtype == "fp8":
        return hidden + 4 * (hidden // 128)
    raise ValueError(dtype)


def byte_counts(op: str, dtype: str, hidden: int, rows_total: int, rows_remote: int) -> tuple[int, int]:
    """(logical, physical) bytes of one call at one rank (SPEC 8).

    Normal dispatch/combine: logical = rows received (dispatch) or sent back (combine) incl. local rows x bytes per
    row ("bottleneck bandwidth"); physical = only the rows that cross NVLink. Low-latency: rows are (token, k)
    messages, same rule. rows_total / rows_remote are counted at this rank."""
    b = bytes_per_row(op, dtype, hidden)
    return rows_total * b, rows_remote * b


def median_us(samples_ms) -> float:
    return float(np.median(np.asarray(samples_ms))) * 1e3


def timed(fn, group, n: int, warmup: int = 3) -> float:
    """Median per-call time (us) of n back-to-back calls of fn: an event on the caller's stream before each call and
    one after the last; call i's time is the gap between its event and the next. Ranks are released together once (a
    barrier) and then keep in step through the calls' own synchronisation, as in a model's layer loop; the GPU never
    idles between calls (idle gaps would let its clocks drop and time the ramp, not the call)."""
    import cupy as cp
    for _ in range(warmup):
        fn()
    cp.cuda.Device().synchronize()
    group.barrier()
    s = cp.cuda.get_current_stream()
    evs = [cp.cuda.Event() for _ in range(n + 1)]
    for i in range(n):
        evs[i].record(s)
        fn()
    evs[n].record(s)
    evs[n].synchronize()
    return median_us([cp.cuda.get_elapsed_time(evs[i], evs[i + 1]) for i in range(n)])


def timed_graph(fn, group, n: int, calls_per_capture: int = 1, check=None) -> float:
    """Median device time (us) per call of fn captured once into a CUDA graph (calls_per_capture calls in it) and
    replayed back-to-back n times: no host work per call (what a graph-captured layer loop sees). fn must need no host
    synchronisation. check(): called after the replays (e.g. the backend's error check)."""
    import cupy as cp
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        fn()  # warm-up: kernels loaded, pool filled
        s.synchronize()
        group.barrier()
        s.begin_capture()
        fn()
        graph = s.end_capture()
        graph.launch(s)
        s.synchronize()
        group.barrier()
        evs = [cp.cuda.Event() for _ in range(n + 1)]
        for i in range(n):
            evs[i].record(s)
            graph.launch(s)
        evs[n].record(s)
        evs[n].synchronize()
    if check is not None:
        check()
    return median_us([cp.cuda.get_elapsed_time(evs[i], evs[i + 1]) for i in range(n)]) / calls_per_capture


def commit() -> str:
    """The commit measured: EPCOMM_COMMIT if set (GPU machines get a copy of the tree without .git), else git."""
    if os.environ.get("EPCOMM_COMMIT"):
        return os.environ["EPCOMM_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], stderr=subprocess.DEVNULL,
                                       cwd=os.path.dirname(__file__)).decode().strip() or "unknown"
    except Exception:
        return "unknown"


def record(op, dtype, ranks, gpus, tokens, hidden, topk, experts, num_sms, med_us, logical, physical, card,
           baseline=None, **extra) -> dict:
    return dict(op=op, dtype=dtype, ranks=ranks, gpus=gpus, tokens=tokens, hidden=hidden, topk=topk, experts=experts,
                num_sms=num_sms, median_us=round(med_us, 2),
                logical_gbps=round(logical / (med_us * 1e-6) / 1e9, 1),
                physical_gbps=round(physical / (med_us * 1e-6) / 1e9, 1), card=card, commit=commit(),
                timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                baseline=baseline, **extra)


def append_jsonl(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
