"""Intranode normal-mode benchmark (mpirun -n N, one rank per GPU): DeepEP's workload (4096 tokens per rank,
hidden 7168, top-8 of 256 experts): layout, FP8 dispatch, BF16 dispatch, BF16 combine, an SM sweep, the
one-way peer-store NVLink ceiling and the PyTorch/NCCL path measured in the same run. Prints a table, appends
JSON lines to bench/results/intranode.jsonl (and --out), and plots GB/s against SMs."""
from __future__ import annotations

import os
import socket
import sys
import time

try:  # import torch (the baseline) before anything puts bench/ on sys.path: once it failed to import after
    import torch  # noqa: F401  (a custom-op schema parse error inside torch, 2026-11-28, H200 image)
except Exception:
    torch = None

import cupy as cp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from common import append_jsonl, byte_counts, record  # noqa: E402

import epcomm  # noqa: E402
from epcomm import reference as ref  # noqa: E402
from epcomm.intranode import default_peer_sms, nvl_buffer_size_hint  # noqa: E402
from epcomm.testing import make_topk  # noqa: E402

args = common.workload_args(4096, 30, 15, "also split calls into per-kernel device times and profile the host side "
                            "(rank 0)")
iters = args.iters
T, H, K, E = args.tokens, args.hidden, args.topk, args.experts

from mpi4py import MPI  # noqa: E402

R0 = MPI.COMM_WORLD.size
buf = epcomm.Buffer(None, num_nvl_bytes=nvl_buffer_size_hint(T, H * 2, R0, K, zero_copy=True), backend="gpu")
g = buf.group
R, rank = buf.num_ranks, buf.rank
card = cp.cuda.runtime.getDeviceProperties(g.device)["name"].decode()
sms_all = cp.cuda.Device().attributes["MultiProcessorCount"]
gpus = len(set(g.topology.device_of_rank))
log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)

rng = np.random.default_rng(1234 + rank)
x_host = rng.standard_normal((T, H), dtype=np.float32).astype(ref.bf16)
fp8_host, scales_host = ref.per_token_cast_to_fp8(x_host)
x_bf16 = cp.asarray(x_host)
x_fp8 = cp.asarray(fp8_host.view(np.uint8))  # CuPy has no float8 dtype: the e4m3 bits
scales = cp.asarray(scales_host)
scales_cm = cp.asarray(scales.T.copy()).T  # column-major, as DeepGEMM-style callers hold them
idx = cp.asarray(make_topk(np.random.default_rng(99 + rank), T, K, E))
w = cp.asarray(np.random.default_rng(7 + rank).random((T, K), dtype=np.float32))


def timed(fn, n=iters, warmup=3):
    return common.timed(fn, g, n, warmup)


def timed_graph(fn, n=iters):
    return common.timed_graph(fn, g, n, check=lambda: buf._backend._check("benchmark graph replays"))


def agree(v):  # the slowest rank's median is the call's time
    return max(g.allgather(v))


per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
layout_us = agree(timed(lambda: buf.get_dispatch_layout(idx, E)))
layout_graph_us = agree(timed_graph(lambda: buf.get_dispatch_layout(idx, E)))  # device time: the kernel and its fill
res_fp8 = buf.dispatch((x_fp8, scales_cm), num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                       num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=w)
handle = res_fp8[4]
n_recv = handle.num_recv_tokens
n_local = int(handle.num_recv_tokens_per_source[rank].get()) if hasattr(handle.num_recv_tokens_per_source, "get") else 0
rows_total = agree(n_recv)  # the busiest receiver bounds the call
rows_remote = agree(n_recv - n_local)
recv_bf16 = buf.dispatch(x_bf16, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                         num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=w)[0]


# -- NVLink ceiling: one-way peer stores (rank 0 -> 1 only), 16 B per thread, SM count = all ------------------
copy16 = cp.RawKernel(r"""
extern "C" __global__ void copy16(const int4* __restrict__ s, int4* __restrict__ d, size_t n) {
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x, st = (size_t)gridDim.x * blockDim.x;
  for (; i < n; i += st) d[i] = s[i];
}""", "copy16")
nb = min(256 << 20, buf._backend.data_bytes) // 4096 * 4096
src = cp.ones(nb // 16 * 4, cp.int32)
peer = (rank + 1) % R
peer_ptr = buf._backend.nvl.peer_ptrs[peer] + buf._backend.meta_bytes


def store_peer(blocks, active):
    if active:
        copy16((blocks,), (512,), (src, cp.uint64(peer_ptr), cp.uint64(nb // 16)))


ceilings = {}
for blocks in (24, sms_all):
    t_one = timed(lambda: store_peer(blocks, rank == 0), n=10)
    t_both = timed(lambda: store_peer(blocks, True), n=10)
    ceilings[blocks] = (nb / (agree(t_one if rank == 0 else 0) * 1e-6) / 1e9, nb / (agree(t_both) * 1e-6) / 1e9)
ceiling_one_way = max(c[0] for c in ceilings.values())
log(f"peer-store ceiling: " + ", ".join(f"{b} blocks: one-way {c[0]:.0f} GB/s, both ways {c[1]:.0f} GB/s each"
                                        for b, c in ceilings.items()))

# What 24 SMs can move with 8 loads in flight per thread (as the row copies issue them): peer stores one way and both
# ways, and a local copy (the copy-out / reduce side). Rates count the bytes stored.
copy8 = cp.RawKernel(r"""
extern "C" __global__ void __launch_bounds__(512) copy8(const int4* __restrict__ s, int4* __restrict__ d, size_t n) {
  const size_t st = (size_t)gridDim.x * blockDim.x;
  for (size_t b = blockIdx.x * (size_t)blockDim.x + threadIdx.x; b < n; b += 8 * st) {
    int4 v[8];
    #pragma unroll
    for (int u = 0; u < 8; ++u) if (b + u * st < n) v[u] = __ldg(s + b + u * st);
    #pragma unroll
    for (int u = 0; u < 8; ++u) if (b + u * st < n) d[b + u * st] = v[u];
  }
}""", "copy8")
local_dst = cp.empty_like(src)
probe = {}
for what, src_ptr, dst_ptr, active in (
        ("peer one-way", int(src.data.ptr), peer_ptr, rank == 0), ("peer both ways", int(src.data.ptr), peer_ptr, True),
        ("local copy", int(src.data.ptr), int(local_dst.data.ptr), True),
        ("peer reads one-way", peer_ptr, int(local_dst.data.ptr), rank == 0),
        ("peer reads both ways", peer_ptr, int(local_dst.data.ptr), True)):
    def run8(blocks=24, src_ptr=src_ptr, dst_ptr=dst_ptr, active=active):
        if active:
            copy8((blocks,), (512,), (cp.uint64(src_ptr), cp.uint64(dst_ptr), cp.uint64(nb // 16)))
    t8 = timed(run8, n=10)
    probe[what] = nb / (agree(t8 if active else 0) * 1e-6) / 1e9
log("24 blocks x 512 threads, 8 loads in flight per thread: " +
    ", ".join(f"{k} {v:.0f} GB/s" for k, v in probe.items()))
# Both ways at once, half the data pushed and half pulled (the blocks split between the two), against all pushed or
# all pulled above: what a combine that pushes part of its rows could reach. Rates count the bytes each rank receives.
mixed8 = cp.RawKernel(r"""
extern "C" __global__ void __launch_bounds__(512) mixed8(const int4* __restrict__ s0, int4* __restrict__ d0,
    const int4* __restrict__ s1, int4* __restrict__ d1, size_t n, int split) {
  const bool first = (int)blockIdx.x < split;
  const int4* s = first ? s0 : s1;
  int4* d = first ? d0 : d1;
  const size_t st = (size_t)(first ? split : gridDim.x - split) * blockDim.x;
  const size_t b0 = (size_t)(first ? blockIdx.x : blockIdx.x - split) * blockDim.x + threadIdx.x;
  for (size_t b = b0; b < n; b += 8 * st) {
    int4 v[8];
    #pragma unroll
    for (int u = 0; u < 8; ++u) if (b + u * st < n) v[u] = s[b + u * st];
    #pragma unroll
    for (int u = 0; u < 8; ++u) if (b + u * st < n) d[b + u * st] = v[u];
  }
}""", "mixed8")
half = nb // 2 // 16  # int4 per half: pushed into the peer's [0, nb/2), pulled from the peer's [nb/2, nb)
probe_mixed = {}
for push_blocks in (8, 12, 16):
    def run_mixed(push_blocks=push_blocks):
        mixed8((24,), (512,), (src, cp.uint64(peer_ptr), cp.uint64(peer_ptr + nb // 2), local_dst,
                               cp.uint64(half), cp.int32(push_blocks)))
    probe_mixed[push_blocks] = nb / (agree(timed(run_mixed, n=10)) * 1e-6) / 1e9
log("both ways, half pushed and half pulled, 24 blocks x 512 threads, 8 loads in flight: " +
    ", ".join(f"{b} pushing blocks {v:.0f} GB/s" for b, v in probe_mixed.items()))
# The same with Hopper bulk copies (TMA): one thread per block, 8 x 16 KiB in flight through shared memory.
from epcomm.probe import BULK_CHUNK, bulk_copy  # noqa: E402
nb_tma = nb // BULK_CHUNK * BULK_CHUNK
probe_tma = {}
for blocks in (24, 48):
    for what, src_ptr, dst_ptr, active in (
            ("peer one-way", int(src.data.ptr), peer_ptr, rank == 0),
            ("peer both ways", int(src.data.ptr), peer_ptr, True),
            ("local copy", int(src.data.ptr), int(local_dst.data.ptr), True),
            ("peer reads both ways", peer_ptr, int(local_dst.data.ptr), True)):
        def run_tma(blocks=blocks, src_ptr=src_ptr, dst_ptr=dst_ptr, active=active):
            if active:
                bulk_copy(src_ptr, dst_ptr, nb_tma, blocks, stream=cp.cuda.get_current_stream())
        t_tma = timed(run_tma, n=10)
        probe_tma[(blocks, what)] = nb_tma / (agree(t_tma if active else 0) * 1e-6) / 1e9
log("bulk copies (TMA), 1 thread x 128 KiB in flight per block: " +
    ", ".join(f"{b} blocks {k} {v:.0f} GB/s" for (b, k), v in probe_tma.items()))
del local_dst

# -- baseline: the PyTorch path (NCCL all_to_all_single + index_select / index_add) ---------------------------
baseline = {}
try:
    if torch is None:
        raise ImportError("torch is not installed")
    import torch.distributed as dist
    host0 = g.bcast(socket.gethostname())
    port = g.bcast(29500 + os.getpid() % 1000)
    dist.init_process_group("nccl", init_method=f"tcp://{'127.0.0.1' if host0 == socket.gethostname() else host0}:{port}",
                            rank=rank, world_size=R)
    dev = torch.device("cuda", g.device)
    tx = torch.from_dlpack(x_bf16.view(cp.uint16)).view(torch.bfloat16)
    tin = torch.from_dlpack(in_rank)
    send_counts = tin.sum(0).to(torch.int64)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts)
    sc, rc = send_counts.tolist(), recv_counts.tolist()
    order = torch.cat([tin[:, d].nonzero().squeeze(1) for d in range(R)])
    row8 = H + 4 * (H // 128)
    tx8 = torch.empty((T, row8), dtype=torch.uint8, device=dev)

    def t_dispatch(xx, width):
        send = xx.index_select(0, order)
        recv = torch.empty((sum(rc), width), dtype=xx.dtype, device=dev)
        dist.all_to_all_single(recv, send, rc, sc)
        return recv

    trecv = t_dispatch(tx, H)

    def t_combine():
        back = torch.empty((len(order), H), dtype=tx.dtype, device=dev)
        dist.all_to_all_single(back, trecv, sc, rc)
        out = torch.zeros_like(tx)
        out.index_add_(0, order, back)
        return out

    # torch and CuPy both issue on the legacy default stream here, so the events bracket torch's work.
    baseline["bf16_dispatch"] = agree(timed(lambda: t_dispatch(tx, H)))
    baseline["fp8_dispatch"] = agree(timed(lambda: t_dispatch(tx8, row8)))
    baseline["bf16_combine"] = agree(timed(t_combine))
    dist.destroy_process_group()
except Exception as exc:  # torch missing or NCCL unusable: say so in the table
    import traceback
    log(f"baseline skipped: {type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}")

# -- epcomm ---------------------------------------------------------------------------------------------------
rows = []


def add_row(op, dt, us, variant=None, sms=24, **extra):
    """One result record: DeepEP's byte counts, the PyTorch baseline of the same op and dtype, the ceiling; variant
    None (an eager call) leaves the key out."""
    lb, pb = byte_counts(op, dt, H, rows_total, rows_remote)
    base = baseline.get(f"{dt}_{op}")
    b = {"name": "torch NCCL all_to_all_single + index_select/index_add", "median_us": round(base, 1)} if base else None
    if variant is not None:
        extra["variant"] = variant
    rows.append(record(op, dt, R, gpus, T, H, K, E, sms, us, lb, pb, card, b,
                       ceiling_one_way_gbps=round(ceiling_one_way, 1), **extra))


sweep = sorted({8, 16, 24, 32, 48, 64, sms_all})
rows.append(record("layout", "int64", R, gpus, T, H, K, E, None, layout_us, 0, 0, card))
rows.append(record("layout", "int64", R, gpus, T, H, K, E, None, layout_graph_us, 0, 0, card, variant="graph"))
for sms in sweep:
    cfg = epcomm.Config(num_sms=sms)
    f8 = agree(timed(lambda: buf.dispatch((x_fp8, scales_cm), handle=handle, config=cfg)))
    disp8 = agree(timed(lambda: buf.dispatch((x_fp8, scales_cm), num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                             num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=w, config=cfg)))
    d16 = agree(timed(lambda: buf.dispatch(x_bf16, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                           num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=w, config=cfg)))
    c16 = agree(timed(lambda: buf.combine(recv_bf16, handle, config=cfg)))
    f8g = agree(timed_graph(lambda: buf.dispatch((x_fp8, scales_cm), handle=handle, config=cfg)))
    d16g = agree(timed_graph(lambda: buf.dispatch(x_bf16, handle=handle, config=cfg)))
    c16g = agree(timed_graph(lambda: buf.combine(recv_bf16, handle, config=cfg)))
    for op, dt, us, variant in (("dispatch", "fp8", f8g, "cached-graph"), ("dispatch", "bf16", d16g, "cached-graph"),
                                ("combine", "bf16", c16g, "graph"), ("dispatch", "fp8", disp8, None),
                                ("dispatch", "fp8", f8, "cached"), ("dispatch", "bf16", d16, None),
                                ("combine", "bf16", c16, None)):
        add_row(op, dt, us, variant, sms=sms)

KERNEL_PHASES = {  # in-kernel marks (intranode.cuh, mark()): slot -> what block 0 (the last block: slot 4) did
    "dispatch_send": ("start", "set up", "rows done", "counted out", "last signalled", "before error check",
                      "arrived at the count", "last received"),
    "dispatch_recv": ("start", "waited", "rows done", None, None, "before error check"),
    "combine_stage": ("start", "waited", "rows done", "counted out", "last signalled", "before error check",
                      "arrived at the count"),
    "combine_reduce": ("start", "waited", "rows done", "counted out", None, "thread 0 waited",
                       "arrived at the count"),
}


def _segments(marks, into, kernels=False):
    """Append the gaps between consecutive timestamp marks (us) of the last traced call to into[name], and with
    kernel_trace each kernel's in-kernel marks as offsets from the stream mark before it to into["kernel/phase"]."""
    be = buf._backend
    stamps = be.trace_stamps.get().astype(np.int64)
    ts = stamps[:len(marks)]
    for i in range(1, len(marks)):
        into.setdefault(marks[i], []).append((ts[i] - ts[i - 1]) / 1e3)
        if kernels and marks[i] in KERNEL_PHASES:
            base = be.MARKS_BASE + 8 * be.KERNEL_MARKS.index(marks[i])
            for j, phase in enumerate(KERNEL_PHASES[marks[i]]):
                if phase is None:
                    continue
                into.setdefault(f"  {marks[i]}/{phase}", []).append((stamps[base + j] - ts[i - 1]) / 1e3)


def graph_split(name, fn, n=10, repeats=5):
    """Per-kernel device time inside a CUDA graph: the call is captured with a timestamp kernel between kernels, replayed
    back-to-back n times (ranks in step, clocks up), and the last replay's gaps are read; median over repeats."""
    be = buf._backend
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        fn()
        s.synchronize()
        g.barrier()
        be.trace, be.kernel_trace = [], True
        s.begin_capture()
        try:
            fn()
        finally:
            graph = s.end_capture()
            be.kernel_trace = False
        marks, be.trace = be.trace, None
        segs = {}
        for _ in range(repeats):
            g.barrier()
            for _ in range(n):
                graph.launch(s)
            s.synchronize()
            _segments(marks, segs, kernels=True)
    be._check("graph split")
    med = {k: float(np.median(v)) for k, v in segs.items()}
    for r_, m in enumerate(g.allgather(med)):  # every rank's: the slowest rank sets the call's time
        log(f"graph split {name}, rank {r_}: " + ", ".join(f"{k} {v:.1f}" for k, v in m.items()
                                                          if not k.startswith(" ")) + " us")
        log("    in-kernel (us after the kernel's stream mark): " +
            ", ".join(f"{k.strip()} {v:.1f}" for k, v in m.items() if k.startswith(" ")))
    return med


def trace_split(name, fn, n=10):
    """Per-kernel device time (timestamp kernels between launches) and host time per call, medians over n calls."""
    be = buf._backend
    fn()
    cp.cuda.Device().synchronize()
    segs, host = {}, []
    for _ in range(n):
        g.barrier()
        be.trace = []
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e6)
        cp.cuda.Device().synchronize()
        marks, be.trace = be.trace, None
        _segments(marks, segs)
    parts = ", ".join(f"{k} {np.median(v):.0f}" for k, v in segs.items())
    log(f"trace {name}: host {np.median(host):.0f} us per call; device us: {parts}")


cfg24 = epcomm.Config(num_sms=24)


def fp8_cached(cfg=cfg24, zc=False):
    return buf.dispatch((x_fp8, scales_cm), handle=handle, config=cfg, zero_copy=zc)


def bf16_cached(cfg=cfg24, zc=False):
    return buf.dispatch(x_bf16, handle=handle, config=cfg, zero_copy=zc)


def zc_combine(cfg=cfg24):  # reads the rows the caller wrote into get_combine_buffer (no staging copy)
    return buf.combine(None, handle, config=cfg, zero_copy=True)


# Where a call's device time goes (timestamp kernels between the kernels inside the graph), at 24 SMs.
graph_split("fp8 cached dispatch, 24 SMs", fp8_cached)
graph_split("bf16 cached dispatch, 24 SMs", bf16_cached)
graph_split("bf16 combine, 24 SMs", lambda: buf.combine(recv_bf16, handle, config=cfg24))

# dispatch_send's parts (diagnostics: the parts left out are not written, so these calls' outputs are wrong): peer
# rows, own rows, per-row metadata (scales, top-k, source index); each role alone with and without the metadata, on all
# 24 SMs and on its share of the default split. Then the split swept at 24 SMs.
default_split = default_peer_sms(24, R, fp8=True)
for label, mask, peers in (("peer rows + metadata, 24 SMs", 5, 0), ("peer rows, no metadata, 24 SMs", 1, 0),
                           ("own rows + metadata, 24 SMs", 6, 0), ("own rows, no metadata, 24 SMs", 2, 0),
                           ("all rows, no metadata, 24 SMs", 3, 0),
                           (f"peer rows + metadata, {default_split} SMs", 5, default_split),
                           (f"own rows + metadata, {24 - default_split} SMs", 6, default_split)):
    buf._backend.send_role_mask = mask
    try:
        graph_split(f"fp8 cached dispatch, {label}", lambda: fp8_cached(epcomm.Config(num_sms=24, send_peer_sms=peers)))
    finally:
        buf._backend.send_role_mask = 7
log(f"send_peer_sms sweep at 24 SMs (default fp8 {default_split}, bf16 {default_peer_sms(24, R)}), graph, cached "
    "dispatch:")
for peers in sorted({0, 10, 12, 14, 16, 18, default_split}):
    cfg_p = epcomm.Config(num_sms=24, send_peer_sms=peers)
    f8p = agree(timed_graph(lambda: fp8_cached(cfg_p)))
    b16p = agree(timed_graph(lambda: bf16_cached(cfg_p)))
    log(f"  send_peer_sms {peers:2d}: fp8 {f8p:.1f} us, bf16 {b16p:.1f} us")
    add_row("dispatch", "fp8", f8p, f"cached-graph, send_peer_sms {peers}", send_peer_sms=peers)
    add_row("dispatch", "bf16", b16p, f"cached-graph, send_peer_sms {peers}", send_peer_sms=peers)

# Zero-copy: dispatch outputs are views of the buffer (no copy-out); combine reads get_combine_buffer (no staging copy).
fp8_cached(zc=True)
zc_f8 = agree(timed_graph(lambda: fp8_cached(zc=True)))
zc_b16 = agree(timed_graph(lambda: bf16_cached(zc=True)))
graph_split("fp8 cached dispatch, zero-copy, 24 SMs", lambda: fp8_cached(zc=True))
graph_split("bf16 cached dispatch, zero-copy, 24 SMs", lambda: bf16_cached(zc=True))
bf16_cached(zc=True)
cbuf = buf.get_combine_buffer(handle)
cbuf.view(cp.uint16)[...] = recv_bf16.view(cp.uint16)
zc_c = agree(timed_graph(zc_combine))
graph_split("bf16 combine, zero-copy, 24 SMs", zc_combine)
zc_d8 = agree(timed(lambda: buf.dispatch((x_fp8, scales_cm), num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                         num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=w, config=cfg24,
                                         zero_copy=True)))
log("send_peer_sms sweep at 24 SMs, zero-copy, graph, cached dispatch:")
for peers in (10, 12, 14, 16, 18):
    cfg_p = epcomm.Config(num_sms=24, send_peer_sms=peers)
    f8p = agree(timed_graph(lambda: fp8_cached(cfg_p, zc=True)))
    b16p = agree(timed_graph(lambda: bf16_cached(cfg_p, zc=True)))
    log(f"  send_peer_sms {peers:2d}: fp8 {f8p:.1f} us, bf16 {b16p:.1f} us")
    add_row("dispatch", "fp8", f8p, f"cached-graph, zero-copy, send_peer_sms {peers}", send_peer_sms=peers,
            zero_copy=True)
    add_row("dispatch", "bf16", b16p, f"cached-graph, zero-copy, send_peer_sms {peers}", send_peer_sms=peers,
            zero_copy=True)
# The kernel frame and the token deal, each against the other in this run (GpuBackend.fuse_kernels /
# dynamic_tokens, both on by default): unfused = a cached dispatch with notify and dispatch_recv, a zero-copy combine
# with combine_stage; static = tokens dealt to warps by a fixed stride instead of tickets.
be = buf._backend
log("kernel frame and token deal, zero-copy, 24 SMs, graph (fp8 dispatch / bf16 dispatch / combine):")
for fuse, dyn, label in ((True, True, ""), (False, True, ", unfused"), (True, False, ", static deal"),
                         (False, False, ", unfused, static deal")):
    be.fuse_kernels, be.dynamic_tokens = fuse, dyn
    try:
        f8v = agree(timed_graph(lambda: fp8_cached(zc=True)))
        b16v = agree(timed_graph(lambda: bf16_cached(zc=True)))
        bf16_cached(zc=True)
        cv = agree(timed_graph(zc_combine))
    finally:
        be.fuse_kernels, be.dynamic_tokens = True, True
    log(f"  fused {fuse!s:5} dynamic {dyn!s:5}: {f8v:.1f} / {b16v:.1f} / {cv:.1f} us")
    if label:
        add_row("dispatch", "fp8", f8v, "cached-graph, zero-copy" + label, zero_copy=True)
        add_row("dispatch", "bf16", b16v, "cached-graph, zero-copy" + label, zero_copy=True)
        add_row("combine", "bf16", cv, "graph, zero-copy" + label, zero_copy=True)
# combine_reduce's work items: the last tail x (its warp count) tokens split into `parts` channel ranges each, the
# others whole (tail None: every token split; parts 1: whole tokens only).
log("combine_reduce items, zero-copy combine, 24 SMs, graph:")
default_items = (be.reduce_parts, be.reduce_tail_warps)
for parts, tail in ((1, None), (2, None), (4, None), (2, 1.0), (2, 2.0), (4, 0.5), (4, 1.0), (4, 2.0)):
    be.reduce_parts, be.reduce_tail_warps = parts, tail
    try:
        bf16_cached(zc=True)
        c_items = agree(timed_graph(zc_combine))
    finally:
        be.reduce_parts, be.reduce_tail_warps = default_items
    label = "whole tokens" if parts == 1 else (f"every token in {parts}" if tail is None
                                               else f"whole, the last {tail:g} x warps tokens in {parts}")
    log(f"  {label}{' (default)' if (parts, tail) == default_items else ''}: {c_items:.1f} us")
    add_row("combine", "bf16", c_items, f"graph, zero-copy, items: {label}", zero_copy=True, reduce_parts=parts,
            reduce_tail_warps=tail)
for op, dt, us, variant in (("dispatch", "fp8", zc_f8, "cached-graph, zero-copy"),
                            ("dispatch", "bf16", zc_b16, "cached-graph, zero-copy"),
                            ("combine", "bf16", zc_c, "graph, zero-copy"),
                            ("dispatch", "fp8", zc_d8, "zero-copy")):
    add_row(op, dt, us, variant, zero_copy=True)

if args.trace:
    trace_split("fp8 cached dispatch", lambda: buf.dispatch((x_fp8, scales_cm), handle=handle, config=cfg24))
    trace_split("bf16 dispatch", lambda: buf.dispatch(x_bf16, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                                      num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=w,
                                                      config=cfg24))
    trace_split("bf16 combine", lambda: buf.combine(recv_bf16, handle, config=cfg24))
    import cProfile
    import pstats
    prof = cProfile.Profile() if rank == 0 else None
    if prof:
        prof.enable()
    for _ in range(20):
        buf.dispatch((x_fp8, scales_cm), handle=handle, config=cfg24)
        buf.combine(recv_bf16, handle, config=cfg24)
    if prof:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    cp.cuda.Device().synchronize()
    g.barrier()

if rank == 0:
    print(f"\n{card} x{gpus}, EP{R}, {T} tokens/rank, hidden {H}, top-{K} of {E}; received rows {rows_total} "
          f"(remote {rows_remote}); one-way peer-store ceiling {ceiling_one_way:.0f} GB/s")
    print("| op | dtype | variant | SMs | median us | logical GB/s | physical GB/s | % ceiling | baseline us | speed-up |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r_ in rows:
        b = r_["baseline"]["median_us"] if r_.get("baseline") else None
        print(f"| {r_['op']} | {r_['dtype']} | {r_.get('variant', '')} | {r_['num_sms'] or '-'} | {r_['median_us']:.1f} | "
              f"{r_['logical_gbps']} | {r_['physical_gbps']} | "
              f"{(100 * r_['physical_gbps'] / ceiling_one_way) if r_['physical_gbps'] else 0:.0f}% | "
              f"{b if b else '-'} | {(b / r_['median_us']) if b else 0:.2f}x |")
    here = os.path.dirname(os.path.abspath(__file__))
    append_jsonl(os.path.join(here, "results", "intranode.jsonl"), rows)
    if args.out:
        append_jsonl(os.path.join(args.out, "intranode.jsonl"), rows)
        try:
            from plot import plot_sm_sweep
            plot_sm_sweep(rows, ceiling_one_way, f"epcomm intranode EP{R} on {gpus}x {card}",
                          os.path.join(args.out, f"intranode_sms_ep{R}.png"))
        except Exception as exc:
            print(f"plot skipped: {exc}")
buf.destroy()
