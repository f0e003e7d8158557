"""Low-latency (decoding) benchmark (mpirun -n N, one rank per GPU): DeepEP's low-latency workload (128 tokens per
rank, hidden 7168, top-8 of 256 experts): FP8 dispatch and BF16 combine, timed as CUDA-graph replays (median), plus
the send / receive halves with hooks, and NCCL all_to_all_single of the same bytes (torch) as the baseline in the same
run. Prints a table and appends JSON lines to bench/results/low_latency.jsonl (and --out).

Bytes (shared/SPEC.md section 8): logical = valid (token, k) pairs x message bytes (FP8 dispatch: the 16-byte header +
H e4m3 + 4 H/128 scale bytes; BF16 combine: 2H), physical = the pairs whose expert lives on another rank. The rows are
counted at the busiest rank and the time is the slowest rank's median."""
from __future__ import annotations

import argparse
import os
import socket
import sys

import cupy as cp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import append_jsonl, median_us, record  # noqa: E402

import epcomm  # noqa: E402
from epcomm import reference as ref  # noqa: E402
from epcomm.low_latency import message_bytes  # noqa: E402
from epcomm.testing import make_topk  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--tokens", type=int, default=128)
ap.add_argument("--hidden", type=int, default=7168)
ap.add_argument("--topk", type=int, default=8)
ap.add_argument("--experts", type=int, default=256)
ap.add_argument("--iters", type=int, default=50)
ap.add_argument("--quick", action="store_true", help="fewer iterations")
ap.add_argument("--out", default=None)
ap.add_argument("--trace", action="store_true", help="accepted for gpu_suite.sh; no extra output here")
args = ap.parse_args()
iters = 20 if args.quick else args.iters
T, H, K, E = args.tokens, args.hidden, args.topk, args.experts

from mpi4py import MPI  # noqa: E402

R0 = MPI.COMM_WORLD.size
buf = epcomm.Buffer(None, num_rdma_bytes=epcomm.Buffer.get_low_latency_rdma_size_hint(T, H, R0, E),
                    low_latency_mode=True, backend="gpu")
g = buf.group
R, rank = buf.num_ranks, buf.rank
card = cp.cuda.runtime.getDeviceProperties(g.device)["name"].decode()
gpus = len(set(g.topology.device_of_rank))
log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
e_local = E // R

rng = np.random.default_rng(1234 + rank)
x = cp.asarray(rng.standard_normal((T, H), dtype=np.float32).astype(ref.bf16))
idx_host = make_topk(np.random.default_rng(99 + rank), T, K, E)
idx = cp.asarray(idx_host)
w = cp.asarray(np.random.default_rng(7 + rank).random((T, K), dtype=np.float32))
# The experts' outputs (any bf16 values; combine reads only the rows the dispatch filled).
y = cp.asarray(rng.standard_normal((e_local, R * T, H), dtype=np.float32).astype(ref.bf16))

valid = idx_host >= 0
pairs_total = int(valid.sum())
pairs_remote = int((valid & (idx_host // e_local != rank)).sum())


def agree(v):  # the slowest rank's median, the busiest rank's rows
    return max(g.allgather(v))


rows_total, rows_remote = agree(pairs_total), agree(pairs_remote)
msg_fp8, row_bf16 = message_bytes(H, True), 2 * H


def timed(fn, n=iters, warmup=3):
    """Median per-call time of n back-to-back calls (events on the caller's stream between calls)."""
    for _ in range(warmup):
        fn()
    cp.cuda.Device().synchronize()
    g.barrier()
    s = cp.cuda.get_current_stream()
    evs = [cp.cuda.Event() for _ in range(n + 1)]
    for i in range(n):
        evs[i].record(s)
        fn()
    evs[n].record(s)
    evs[n].synchronize()
    return median_us([cp.cuda.get_elapsed_time(evs[i], evs[i + 1]) for i in range(n)])


def timed_graph(fn, calls_per_capture, n=iters):
    """Median device time per call of fn captured once into a CUDA graph (calls_per_capture calls in it) and replayed
    back-to-back. Low-latency graphs must hold an even number of calls of each kind, or dispatch/combine pairs, so
    that replays alternate the buffer halves (see epcomm.low_latency.LowLatencyGpu)."""
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        fn()  # warm-up: kernels loaded, pool filled
        s.synchronize()
        g.barrier()
        s.begin_capture()
        fn()
        graph = s.end_capture()
        graph.launch(s)
        s.synchronize()
        g.barrier()
        evs = [cp.cuda.Event() for _ in range(n + 1)]
        for i in range(n):
            evs[i].record(s)
            graph.launch(s)
        evs[n].record(s)
        evs[n].synchronize()
    buf._backend._check("benchmark graph replays")
    return median_us([cp.cuda.get_elapsed_time(evs[i], evs[i + 1]) for i in range(n)]) / calls_per_capture


def dispatch_fp8():
    return buf.low_latency_dispatch(x, idx, T, E, use_fp8=True)


_, _, handle, _, _ = dispatch_fp8()


def combine_bf16():
    return buf.low_latency_combine(y, idx, w, handle)


def two_dispatches():
    dispatch_fp8()
    dispatch_fp8()


def two_combines():
    combine_bf16()
    combine_bf16()


def pair():
    _, _, hd, _, _ = dispatch_fp8()
    buf.low_latency_combine(y, idx, w, hd)


results = {
    "ll_dispatch": agree(timed_graph(two_dispatches, 2)),
    "ll_combine": agree(timed_graph(two_combines, 2)),
    "ll_pair": agree(timed_graph(pair, 1)),
    "ll_dispatch_eager": agree(timed(dispatch_fp8)),
    "ll_combine_eager": agree(timed(combine_bf16)),
}


# Send / receive halves through hooks (eager): time of the send call alone, then of the hook alone.
def hook_split(n=iters):
    s = cp.cuda.get_current_stream()
    sends, recvs = [], []
    for _ in range(n):
        cp.cuda.Device().synchronize()
        g.barrier()
        e0, e1, e2 = cp.cuda.Event(), cp.cuda.Event(), cp.cuda.Event()
        e0.record(s)
        _, _, hd, _, hk = buf.low_latency_dispatch(x, idx, T, E, use_fp8=True, return_recv_hook=True)
        e1.record(s)
        hk()
        e2.record(s)
        _, _, hk2 = buf.low_latency_combine(y, idx, w, hd, return_recv_hook=True)
        hk2()
        e2.synchronize()
        sends.append(cp.cuda.get_elapsed_time(e0, e1))
        recvs.append(cp.cuda.get_elapsed_time(e1, e2))
    return median_us(sends), median_us(recvs)


send_us, recv_us = hook_split()
results["ll_dispatch_send_hook"] = agree(send_us)
results["ll_dispatch_recv_hook"] = agree(recv_us)

# -- baseline: NCCL all_to_all_single (torch) of the same bytes, on pre-permuted data ---------------------------
baseline = {}
try:
    import torch
    import torch.distributed as dist
    host0 = g.bcast(socket.gethostname())
    port = g.bcast(29600 + os.getpid() % 1000)
    dist.init_process_group("nccl", init_method=f"tcp://{'127.0.0.1' if host0 == socket.gethostname() else host0}:{port}",
                            rank=rank, world_size=R)
    dev = torch.device("cuda", g.device)
    dest = idx_host[valid] // e_local
    send_pairs = [int((dest == d).sum()) for d in range(R)]
    recv_pairs = torch.empty(R, dtype=torch.int64, device=dev)
    dist.all_to_all_single(recv_pairs, torch.tensor(send_pairs, dtype=torch.int64, device=dev))
    recv_pairs = recv_pairs.tolist()

    def a2a(width, forward=True):
        sc, rc = (send_pairs, recv_pairs) if forward else (recv_pairs, send_pairs)
        src = torch.empty((sum(sc), width), dtype=torch.uint8, device=dev)
        out = torch.empty((sum(rc), width), dtype=torch.uint8, device=dev)
        dist.all_to_all_single(out, src, rc, sc)

    baseline["ll_dispatch"] = agree(timed(lambda: a2a(msg_fp8)))
    baseline["ll_combine"] = agree(timed(lambda: a2a(row_bf16, forward=False)))
    dist.destroy_process_group()
except Exception as exc:  # torch missing or NCCL unusable: say so in the table
    log(f"baseline skipped: {type(exc).__name__}: {exc}")

rows = []
for op, dt, key, nbytes, variant in (("ll_dispatch", "fp8", "ll_dispatch", msg_fp8, "graph"),
                                     ("ll_combine", "bf16", "ll_combine", row_bf16, "graph"),
                                     ("ll_dispatch", "fp8", "ll_dispatch_eager", msg_fp8, "eager"),
                                     ("ll_combine", "bf16", "ll_combine_eager", row_bf16, "eager"),
                                     ("ll_dispatch", "fp8", "ll_dispatch_send_hook", msg_fp8, "send-only (hook)"),
                                     ("ll_dispatch", "fp8", "ll_dispatch_recv_hook", msg_fp8, "recv-only (hook)")):
    us = results[key]
    base = baseline.get(op)
    b = {"name": "torch NCCL all_to_all_single of the same bytes (pre-permuted)", "median_us": round(base, 1)} \
        if base else None
    rows.append(record(op, dt, R, gpus, T, H, K, E, None, us, rows_total * nbytes, rows_remote * nbytes, card, b,
                       variant=variant, pair_us=round(results["ll_pair"], 2)))

if rank == 0:
    print(f"\n{card} x{gpus}, EP{R}, {T} tokens/rank, hidden {H}, top-{K} of {E}; (token, k) pairs {rows_total} "
          f"(remote {rows_remote}); dispatch+combine pair in one graph: {results['ll_pair']:.1f} us")
    print("| op | dtype | variant | median us | logical GB/s | physical GB/s | baseline us | speed-up |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r_ in rows:
        b = r_["baseline"]["median_us"] if r_.get("baseline") else None
        print(f"| {r_['op']} | {r_['dtype']} | {r_['variant']} | {r_['median_us']:.1f} | {r_['logical_gbps']} | "
              f"{r_['physical_gbps']} | {b if b else '-'} | {(b / r_['median_us']) if b else 0:.2f}x |")
    here = os.path.dirname(os.path.abspath(__file__))
    append_jsonl(os.path.join(here, "results", "low_latency.jsonl"), rows)
    if args.out:
        append_jsonl(os.path.join(args.out, "low_latency.jsonl"), rows)
buf.destroy()
