"""Low-latency (decoding) benchmark, the standard one: DeepEP's low-latency workload (128 tokens per rank, hidden
7168, top-8 of 256 experts): FP8 dispatch and BF16 combine, timed as CUDA-graph replays (median) and eager, once per
rank and per (token, expert) as DeepEP, plus the device time of the send / receive halves with hooks (one graph,
event-record nodes between the halves), compute overlapped through the hooks, and NCCL all_to_all_single of the same
bytes (torch) as the baseline in the same run. Prints a table and appends JSON lines to
bench/results/low_latency.jsonl (and --out).

    mpirun -n N python bench/bench_low_latency.py [--quick] [--out DIR]     (N ranks, one per GPU)

Also one rank (EP1: no peer, so no baseline) and several ranks sharing a GPU (records "oversubscribed": true: not
NVLink timings). Where the once-per-rank combine's time goes: bench/experiments/low_latency_combine_diag.py.

Bytes (shared/SPEC.md section 8): logical = valid (token, k) pairs x message bytes (FP8 dispatch: the 16-byte header +
H e4m3 + 4 H/128 scale bytes; BF16 combine: 2H), physical = the pairs whose expert lives on another rank. The rows are
counted at the busiest rank and the time is the slowest rank's median."""
from __future__ import annotations

import os
import socket
import sys

import cupy as cp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from common import LowLatencyWorkload, Ranks, median_us, record, save_records  # noqa: E402

import epcomm  # noqa: E402
from epcomm.group import Group  # noqa: E402
from epcomm.low_latency import message_bytes  # noqa: E402

args = common.workload_args(128, 50, 20, __doc__)
iters = args.iters

group = Group()
ranks = Ranks(group)
R, rank = ranks.num_ranks, ranks.rank
log, agree = ranks.log, ranks.agree
wl = LowLatencyWorkload(args.tokens, args.hidden, args.topk, args.experts, rank, R)
T, H, K, E = wl.T, wl.H, wl.K, wl.E
e_local, idx_host = wl.e_local, wl.idx_host
buf = epcomm.Buffer(group, num_rdma_bytes=wl.rdma_bytes(R), low_latency_mode=True, backend="gpu")
ranks.say_limits("the PyTorch/NCCL baseline")

valid = idx_host >= 0
pairs_total = int(valid.sum())
pairs_remote = int((valid & (idx_host // e_local != rank)).sum())
rows_total, rows_remote = agree(pairs_total), agree(pairs_remote)
# Dispatch sends a token's payload once per destination rank (once_per_rank) plus a 16-byte header per (token, k):
# the (token, remote rank) pairs are what crosses NVLink in full.
owners = np.where(valid, idx_host // e_local, -1)
tokens_remote = agree(sum(len(set(row.tolist()) - {-1, rank}) for row in owners))
msg_fp8, row_bf16 = message_bytes(H, True), 2 * H
header_bytes = 16
physical_once = tokens_remote * msg_fp8 + rows_remote * header_bytes
# Combine once per rank: a float32 partial row per (token, remote rank) back, after a 4-byte weight per remote
# (token, k) pair the other way.
physical_combine_once = tokens_remote * 4 * H + rows_remote * 4


def timed(fn, n=iters, warmup=3):
    return ranks.timed(fn, n, warmup)


def timed_graph(fn, calls_per_capture, n=iters):
    """Low-latency graphs must hold an even number of calls of each kind, or dispatch/combine pairs, so that replays
    alternate the buffer halves (see epcomm.gpu.low_latency.LowLatencyGpu)."""
    return ranks.timed_graph(fn, n, calls_per_capture, check=lambda: buf._backend.ctx.check("benchmark graph replays"))


wl.bind(buf)
dispatch_fp8, combine_bf16 = wl.dispatch_fp8, wl.combine_bf16
two_dispatches, two_combines, pair = wl.two_dispatches, wl.two_combines, wl.pair

default = buf.set_tuning("low_latency", once_per_rank=False)  # DeepEP's way, for comparison: a message per expert
per_expert_us = agree(timed_graph(two_dispatches, 2))
buf.set_tuning("low_latency", once_per_rank=True, combine_once_per_rank=False)  # likewise: every row back
combine_per_expert_us = agree(timed_graph(two_combines, 2))
buf.set_tuning("low_latency", combine_once_per_rank=True)  # and the once-per-rank sums whatever the default picks
combine_once_us = agree(timed_graph(two_combines, 2))
buf.set_tuning("low_latency", **vars(default))  # the default: once per rank where it moves fewer bytes (K > 2R)
combine_default_once = buf.tuning("low_latency").combine_sums_once(K, R)
results = {
    "ll_dispatch_per_expert": per_expert_us,
    "ll_combine_per_expert": combine_per_expert_us,
    "ll_combine_once": combine_once_us,
    "ll_dispatch": agree(timed_graph(two_dispatches, 2)),
    "ll_combine": agree(timed_graph(two_combines, 2)),
    "ll_pair": agree(timed_graph(pair, 1)),
    "ll_dispatch_eager": agree(timed(dispatch_fp8)),
    "ll_combine_eager": agree(timed(combine_bf16)),
}


# Send / receive halves through hooks, in device time: ONE CUDA graph holds the pair (dispatch send, hook, combine
# send, hook) with event-record nodes between the halves, so each interval is the GPU time of one half (what a send
# half holds the SMs for), not the host's Python time around the call.
def capture_halves():
    """(stream, graph, 5 events) after a warm-up pair; raises where event-record nodes cannot be captured."""
    from cuda.bindings import driver
    s = cp.cuda.Stream(non_blocking=True)
    evs = [cp.cuda.Event() for _ in range(5)]

    def record_node(i):
        # A plain record during capture only orders streams and cannot be timed; CU_EVENT_RECORD_EXTERNAL makes it
        # an event-record node that every replay records.
        (err,) = driver.cuEventRecordWithFlags(driver.CUevent(evs[i].ptr), driver.CUstream(s.ptr),
                                               driver.CUevent_record_flags.CU_EVENT_RECORD_EXTERNAL)
        if err != driver.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"cuEventRecordWithFlags(CU_EVENT_RECORD_EXTERNAL) inside capture: {err.name}")

    def halves(mark):
        mark(0)
        _, _, hd, _, hk = dispatch_fp8(return_recv_hook=True)
        mark(1)
        hk()
        mark(2)
        _, _, hk = combine_bf16(hd, return_recv_hook=True)
        mark(3)
        hk()
        mark(4)

    with s:
        halves(lambda i: None)  # warm-up: kernels loaded, pool filled
        s.synchronize()
        group.barrier()
        s.begin_capture()
        try:
            halves(record_node)
        except Exception:
            s.end_capture()  # leave capture mode, then report
            raise
        return s, s.end_capture(), evs


def hook_split(n=iters):
    """Medians (us) over n replays, each after a barrier and synchronised: the four halves and the sum of one
    replay's two send halves. {} (and a message) where some rank could not capture the event-record nodes."""
    try:
        s, graph, evs = capture_halves()
        error = None
    except Exception as exc:  # e.g. no cuda-python driver bindings, or a driver without event-record nodes
        error = f"{type(exc).__name__}: {exc}"
    errors = [f"rank {r}: {e}" for r, e in enumerate(group.allgather(error)) if e]
    if errors:
        log(f"hook split skipped: timing the halves needs event-record nodes in a CUDA graph; {errors[0]}")
        return {}
    times = []
    for _ in range(n):
        group.barrier()
        graph.launch(s)
        s.synchronize()
        times.append([cp.cuda.get_elapsed_time(evs[i], evs[i + 1]) for i in range(4)])
    buf._backend.ctx.check("hook split graph replays")
    t = np.asarray(times)
    return {"ll_dispatch_send_hook": median_us(t[:, 0]), "ll_dispatch_recv_hook": median_us(t[:, 1]),
            "ll_combine_send_hook": median_us(t[:, 2]), "ll_combine_recv_hook": median_us(t[:, 3]),
            "ll_send_halves_hook": median_us(t[:, 0] + t[:, 2])}


results.update({k: agree(v) for k, v in hook_split().items()})

# -- overlap: does compute launched between a send and its hook hide the transfer? -------------------------------
# A stand-in for the model's work between the halves: a dependent FMA chain on every SM (~30 us on H100/H200).
busy = cp.RawKernel(r"""
extern "C" __global__ void busy(float* out, int iters) {
  float a = threadIdx.x, b = 1.0001f;
  for (int i = 0; i < iters; ++i) a = a * b + 0.5f;
  if (a == 12345.0f) out[0] = a;  // keeps the loop
}""", "busy")
busy_out = cp.zeros(1, cp.float32)


def compute():
    busy((ranks.num_sms,), (256,), (busy_out, np.int32(15000)))


def pair_compute_between():  # send, compute, receive (the hook), for both operations
    _, _, hd, _, hk = dispatch_fp8(return_recv_hook=True)
    compute()
    hk()
    _, _, hk = combine_bf16(hd, return_recv_hook=True)
    compute()
    hk()


def pair_compute_after():  # the same work with the compute after each complete call (nothing to overlap)
    _, _, hd, _, _ = dispatch_fp8()
    compute()
    combine_bf16(hd)
    compute()


results["compute_x2"] = agree(ranks.timed_graph(lambda: (compute(), compute()), iters))
results["pair_compute_between"] = agree(timed_graph(pair_compute_between, 1))
results["pair_compute_after"] = agree(timed_graph(pair_compute_after, 1))
log(f"overlap (graph, us): two compute kernels alone {results['compute_x2']:.1f}; dispatch+combine pair with them "
    f"after each call {results['pair_compute_after']:.1f}, between each send and its hook "
    f"{results['pair_compute_between']:.1f}; hidden by the hooks: "
    f"{results['pair_compute_after'] - results['pair_compute_between']:.1f} us")

# -- baseline: NCCL all_to_all_single (torch) of the same bytes, on pre-permuted data ---------------------------
baseline = {}
if ranks.measures_links:
    try:
        import torch
        import torch.distributed as dist
        host0 = group.bcast(socket.gethostname())
        port = group.bcast(29600 + os.getpid() % 1000)
        dist.init_process_group("nccl", rank=rank, world_size=R,
                                init_method=f"tcp://{'127.0.0.1' if host0 == socket.gethostname() else host0}:{port}")
        dev = torch.device("cuda", group.device)
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
                                     ("ll_dispatch", "fp8", "ll_dispatch_per_expert", msg_fp8,
                                      "graph, a message per (token, expert) as DeepEP"),
                                     ("ll_combine", "bf16", "ll_combine", row_bf16,
                                      "graph (default: " + ("once per rank)" if combine_default_once else
                                                            "a row per (token, expert))")),
                                     ("ll_combine", "bf16", "ll_combine_per_expert", row_bf16,
                                      "graph, a row per (token, expert) as DeepEP"),
                                     ("ll_combine", "bf16", "ll_combine_once", row_bf16,
                                      "graph, once per rank (float32 partial sums)"),
                                     ("ll_dispatch", "fp8", "ll_dispatch_eager", msg_fp8, "eager"),
                                     ("ll_combine", "bf16", "ll_combine_eager", row_bf16, "eager"),
                                     ("ll_dispatch", "fp8", "ll_dispatch_send_hook", msg_fp8,
                                      "send-only (hook, graph)"),
                                     ("ll_dispatch", "fp8", "ll_dispatch_recv_hook", msg_fp8,
                                      "recv-only (hook, graph)"),
                                     ("ll_combine", "bf16", "ll_combine_send_hook", row_bf16,
                                      "send-only (hook, graph)"),
                                     ("ll_combine", "bf16", "ll_combine_recv_hook", row_bf16,
                                      "recv-only (hook, graph)"),
                                     ("ll_pair", "fp8+bf16", "ll_send_halves_hook", msg_fp8 + row_bf16,
                                      "send halves sum (hook, graph)"),
                                     ("ll_pair", "fp8+bf16", "pair_compute_after", msg_fp8 + row_bf16,
                                      "pair + 2 compute kernels after the calls (graph)"),
                                     ("ll_pair", "fp8+bf16", "pair_compute_between", msg_fp8 + row_bf16,
                                      "pair + 2 compute kernels between send and hook (graph)")):
    if key not in results:  # the hook split was skipped (said above)
        continue
    us = results[key]
    base = baseline.get(op)
    b = {"name": "torch NCCL all_to_all_single of the same bytes (pre-permuted)", "median_us": round(base, 1)} \
        if base else None
    # Physical bytes: what crosses NVLink; a dispatch that sends once per rank moves fewer than its logical bytes.
    per_expert = key.endswith("_per_expert")
    combine_once = key == "ll_combine_once" or (combine_default_once and op == "ll_combine" and not per_expert)
    physical = rows_remote * nbytes
    if op == "ll_dispatch" and not per_expert and "recv" not in key:
        physical = physical_once
    elif op == "ll_combine" and combine_once and "recv" not in key:
        physical = physical_combine_once
    elif op == "ll_pair":
        physical = physical_once + (physical_combine_once if combine_default_once else rows_remote * row_bf16)
    rows.append(record(op, dt, R, ranks.gpus, T, H, K, E, None, us, rows_total * nbytes, physical, ranks.card, b,
                       variant=variant, pair_us=round(results["ll_pair"], 2),
                       compute_x2_us=round(results["compute_x2"], 2),
                       once_per_rank=(combine_once if op == "ll_combine" else not per_expert)))

if rank == 0:
    print(f"\n{ranks.title()}, {T} tokens/rank, hidden {H}, top-{K} of {E}; (token, k) pairs {rows_total} "
          f"(remote {rows_remote}); dispatch+combine pair in one graph: {results['ll_pair']:.1f} us")
    if ranks.oversubscribed:
        print("NOTE: ranks share a GPU, so these are not NVLink timings (records marked \"oversubscribed\": true)")
    print("| op | dtype | variant | median us | logical GB/s | physical GB/s | baseline us | speed-up |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r_ in rows:
        b = r_["baseline"]["median_us"] if r_.get("baseline") else None
        print(f"| {r_['op']} | {r_['dtype']} | {r_['variant']} | {r_['median_us']:.1f} | {r_['logical_gbps']} | "
              f"{r_['physical_gbps']} | {b if b else '-'} | {(b / r_['median_us']) if b else 0:.2f}x |")
    save_records("low_latency", rows, args.out)
buf.destroy()
group.close()
