"""Where the intranode calls' time goes (an experiment; the standard benchmark is bench/bench_intranode.py). DeepEP's
workload at 24 SMs; each part can be run alone (--parts):

  split  the Config.send_peer_sms sweep: cached FP8 / BF16 dispatch, graph, copying and zero-copy outputs
  frame  the kernel frame and the token deal, zero-copy, graph: IntranodeTuning fuse_kernels x dynamic_tokens
  items  combine_reduce's work items, zero-copy combine, graph: IntranodeTuning reduce_parts x reduce_tail_warps
  host   eager calls: per-kernel device time (stream marks) and host time per call; a host profile (rank 0)
  graph  per-kernel device time inside a CUDA graph (stream marks between the kernels) and each kernel's named
         in-kernel marks (EPCOMM_DEBUG_TRACE), for cached FP8 / BF16 dispatch and combine, copying and zero-copy
  roles  dispatch_send's parts (EPCOMM_DEBUG_SEND_ROLES: peer rows, own rows, per-row metadata, alone and together;
         the calls' outputs are wrong), graph-split as above

    mpirun -n N python bench/experiments/intranode_split.py [--parts split,frame,items,host,graph,roles] [--quick]

split, frame and items append their records to bench/results/intranode.jsonl (and --out) under the variants the
standard benchmark used to record them with, plus "experiment": "intranode_split" (no baseline or ceiling: those are
the standard benchmark's); the others print. Diagnostics switches are compiled into the kernels when a Buffer is made,
so graph and roles make a Buffer per setting (the previous one destroyed first). split and roles need two or more
ranks (peers to send to)."""
from __future__ import annotations

import os
import sys
import time

import cupy as cp
import numpy as np

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, BENCH)
sys.path.insert(0, os.path.dirname(BENCH))
import common  # noqa: E402
from common import IntranodeWorkload, Ranks, byte_counts, record, save_records  # noqa: E402

import epcomm  # noqa: E402
from epcomm import intranode as plan  # noqa: E402
from epcomm.group import Group  # noqa: E402
from epcomm.runtime import diagnostics, get_kernel  # noqa: E402

PARTS = ("split", "frame", "items", "host", "graph", "roles")
args = common.workload_args(4096, 30, 15, __doc__, extra=lambda ap: ap.add_argument(
    "--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)} (default: all)"))
parts = [p for p in args.parts.split(",") if p]
if not parts or set(parts) - set(PARTS):
    raise SystemExit(f"--parts: expected a comma-separated list of {', '.join(PARTS)}, got {args.parts!r}")
iters = args.iters

group = Group()
ranks = Ranks(group)
R, rank = ranks.num_ranks, ranks.rank
log, agree = ranks.log, ranks.agree
wl = IntranodeWorkload(args.tokens, args.hidden, args.topk, args.experts, rank)
T, H, K, E = wl.T, wl.H, wl.K, wl.E
log(f"intranode split: {ranks.title()}, {T} tokens/rank, hidden {H}, top-{K} of {E}; parts {', '.join(parts)}")
if ranks.oversubscribed:
    log("NOTE: ranks share a GPU, so these are not NVLink timings")

SWITCHES = ("EPCOMM_DEBUG_TRACE", "EPCOMM_DEBUG_SEND_ROLES")
buf = None


def use_buffer(**switches):
    """A fresh Buffer whose kernels are compiled with these diagnostics switches (none: the kernels of normal use),
    bound to the workload; the previous Buffer is destroyed first."""
    global buf
    if buf is not None:
        buf.destroy()
        buf = None
    for name in SWITCHES:
        os.environ.pop(name, None)
    os.environ.update({name: str(value) for name, value in switches.items()})
    buf = epcomm.Buffer(group, num_nvl_bytes=wl.nvl_bytes(R), backend="gpu")
    wl.bind(buf)
    return buf


def timed_graph(fn, n=iters):
    return ranks.timed_graph(fn, n, check=lambda: buf._backend.ctx.check("benchmark graph replays"))


cfg24 = epcomm.Config(num_sms=24)
default_split = plan.default_peer_sms(24, R, fp8=True)
rows = []
counted = {}


def add_row(op, dt, us, variant, **extra):
    """A record like the standard benchmark's (DeepEP's byte counts at the busiest rank), marked as this
    experiment's."""
    lb, pb = byte_counts(op, dt, H, counted["total"], counted["remote"])
    rows.append(record(op, dt, R, ranks.gpus, T, H, K, E, 24, us, lb, pb, ranks.card, None, variant=variant,
                       experiment="intranode_split", **extra))


# -- splits: stream marks between the kernels, named in-kernel marks with EPCOMM_DEBUG_TRACE ---------------------
TRACED_SPECS = {"dispatch_send": plan.dispatch_send_spec, "dispatch_recv": plan.dispatch_recv_spec,
                "combine_stage": plan.combine_stage_spec, "combine_reduce": plan.combine_reduce_spec}


def traced_kernels(names):
    """{kernel name: Kernel} of the traced kernels among names, where this Buffer's kernels have the trace marks
    compiled in; else {}."""
    intra = buf._backend.intranode
    if not dict(intra.defines).get("EPCOMM_DEBUG_TRACE"):
        return {}
    num_threads = epcomm.Config().num_threads  # every call here uses the default
    return {n: get_kernel(TRACED_SPECS[n](R, num_threads, intra.defines)) for n in names if n in TRACED_SPECS}


def segments(marks, in_kernel, into):
    """Append the gaps between consecutive stream marks [(name, ns)] (us) to into[name], and each kernel's in-kernel
    marks {slot: ns} as offsets from the stream mark before it to into["  kernel/slot"] (in time order)."""
    for i in range(1, len(marks)):
        name, ns = marks[i]
        before = marks[i - 1][1]
        into.setdefault(name, []).append((ns - before) / 1e3)
        for slot, t in sorted(in_kernel.get(name, {}).items(), key=lambda kv: kv[1]):
            into.setdefault(f"  {name}/{slot}", []).append((t - before) / 1e3)


def graph_split(name, fn, n=10, repeats=5):
    """Per-kernel device time inside a CUDA graph: the call is captured with a timestamp kernel between its kernels,
    replayed back-to-back n times (ranks in step, clocks up), and the last replay's gaps are read (and the kernels'
    in-kernel marks, if compiled in); medians over `repeats` rounds, each a fresh capture (a round's mark names are
    read when its marking stops)."""
    ctx = buf._backend.ctx
    s = cp.cuda.Stream(non_blocking=True)
    segs = {}
    with s:
        fn()
        s.synchronize()
        group.barrier()
        for _ in range(repeats):
            ctx.start_stream_marks()
            try:
                s.begin_capture()
                try:
                    fn()
                finally:
                    graph = s.end_capture()
                kernels = traced_kernels(TRACED_SPECS)
                for kernel in kernels.values():
                    diagnostics.clear_marks(kernel, stream=s)
                group.barrier()
                for _ in range(n):
                    graph.launch(s)
                s.synchronize()
            finally:
                marks = ctx.stop_stream_marks()
            in_kernel = {k: diagnostics.read_marks(kernel) for k, kernel in kernels.items()}
            segments(marks, in_kernel, segs)
    ctx.check("graph split")
    med = {k: float(np.median(v)) for k, v in segs.items()}
    for r_, m in enumerate(group.allgather(med)):  # every rank's: the slowest rank sets the call's time
        log(f"graph split {name}, rank {r_}: " + ", ".join(f"{k} {v:.1f}" for k, v in m.items()
                                                          if not k.startswith(" ")) + " us")
        inside = [f"{k.strip()} {v:.1f}" for k, v in m.items() if k.startswith(" ")]
        if inside:
            log("    in-kernel (us after the kernel's stream mark): " + ", ".join(inside))
    return med


def trace_split(name, fn, n=10):
    """Per-kernel device time (stream marks between the launches) and host time per call, medians over n calls."""
    ctx = buf._backend.ctx
    fn()
    cp.cuda.Device().synchronize()
    segs, host = {}, []
    for _ in range(n):
        group.barrier()
        ctx.start_stream_marks()
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e6)
        cp.cuda.Device().synchronize()
        segments(ctx.stop_stream_marks(), {}, segs)
    log(f"trace {name}: host {np.median(host):.0f} us per call; device us: " +
        ", ".join(f"{k} {np.median(v):.0f}" for k, v in segs.items()))


def fp8_cached(cfg=cfg24, zc=False):
    return wl.cached(wl.fp8, cfg, zero_copy=zc)


def bf16_cached(cfg=cfg24, zc=False):
    return wl.cached(wl.x_bf16, cfg, zero_copy=zc)


def zc_combine():
    return wl.zero_copy_combine(cfg24)


# -- the parts with the kernels of normal use (one Buffer) ------------------------------------------------------
use_buffer()
n_recv, n_local = wl.received_rows()
counted.update(total=agree(n_recv), remote=agree(n_recv - n_local))

if "split" in parts and R < 2:
    log("split skipped: one rank has no peers to send rows to")
elif "split" in parts:
    log(f"send_peer_sms sweep at 24 SMs (default fp8 {default_split}, bf16 {plan.default_peer_sms(24, R)}), graph, "
        "cached dispatch:")
    for peers in sorted({0, 10, 12, 14, 16, 18, default_split}):
        cfg_p = epcomm.Config(num_sms=24, send_peer_sms=peers)
        f8p = agree(timed_graph(lambda: fp8_cached(cfg_p)))
        b16p = agree(timed_graph(lambda: bf16_cached(cfg_p)))
        log(f"  send_peer_sms {peers:2d}: fp8 {f8p:.1f} us, bf16 {b16p:.1f} us")
        add_row("dispatch", "fp8", f8p, f"cached-graph, send_peer_sms {peers}", send_peer_sms=peers)
        add_row("dispatch", "bf16", b16p, f"cached-graph, send_peer_sms {peers}", send_peer_sms=peers)
    log("send_peer_sms sweep at 24 SMs, zero-copy, graph, cached dispatch:")
    fp8_cached(zc=True)
    for peers in (10, 12, 14, 16, 18):
        cfg_p = epcomm.Config(num_sms=24, send_peer_sms=peers)
        f8p = agree(timed_graph(lambda: fp8_cached(cfg_p, zc=True)))
        b16p = agree(timed_graph(lambda: bf16_cached(cfg_p, zc=True)))
        log(f"  send_peer_sms {peers:2d}: fp8 {f8p:.1f} us, bf16 {b16p:.1f} us")
        add_row("dispatch", "fp8", f8p, f"cached-graph, zero-copy, send_peer_sms {peers}", send_peer_sms=peers,
                zero_copy=True)
        add_row("dispatch", "bf16", b16p, f"cached-graph, zero-copy, send_peer_sms {peers}", send_peer_sms=peers,
                zero_copy=True)

if "frame" in parts:
    # Each against the other in this run (both on by default): unfused = a cached dispatch with notify and
    # dispatch_recv, a zero-copy combine with combine_stage; static = tokens dealt to warps by a fixed stride instead of
    # tickets.
    wl.fill_combine_buffer(cfg24)
    log("kernel frame and token deal, zero-copy, 24 SMs, graph (fp8 dispatch / bf16 dispatch / combine):")
    for fuse, dyn, label in ((True, True, ""), (False, True, ", unfused"), (True, False, ", static deal"),
                             (False, False, ", unfused, static deal")):
        old = buf.set_tuning("intranode", fuse_kernels=fuse, dynamic_tokens=dyn)
        try:
            f8v = agree(timed_graph(lambda: fp8_cached(zc=True)))
            b16v = agree(timed_graph(lambda: bf16_cached(zc=True)))
            bf16_cached(zc=True)
            cv = agree(timed_graph(zc_combine))
        finally:
            buf.set_tuning("intranode", **vars(old))
        log(f"  fused {fuse!s:5} dynamic {dyn!s:5}: {f8v:.1f} / {b16v:.1f} / {cv:.1f} us")
        if label:
            add_row("dispatch", "fp8", f8v, "cached-graph, zero-copy" + label, zero_copy=True)
            add_row("dispatch", "bf16", b16v, "cached-graph, zero-copy" + label, zero_copy=True)
            add_row("combine", "bf16", cv, "graph, zero-copy" + label, zero_copy=True)

if "items" in parts:
    # combine_reduce's work items: the last tail x (its warp count) tokens split into `parts` channel ranges each, the
    # others whole (tail None: every token split; parts 1: whole tokens only).
    wl.fill_combine_buffer(cfg24)
    log("combine_reduce items, zero-copy combine, 24 SMs, graph:")
    default = buf.tuning("intranode")
    default_items = (default.reduce_parts, default.reduce_tail_warps)
    for num_parts, tail in ((1, None), (2, None), (4, None), (2, 1.0), (2, 2.0), (4, 0.5), (4, 1.0), (4, 2.0)):
        old = buf.set_tuning("intranode", reduce_parts=num_parts, reduce_tail_warps=tail)
        try:
            bf16_cached(zc=True)
            c_items = agree(timed_graph(zc_combine))
        finally:
            buf.set_tuning("intranode", **vars(old))
        label = "whole tokens" if num_parts == 1 else (f"every token in {num_parts}" if tail is None
                                                       else f"whole, the last {tail:g} x warps tokens in {num_parts}")
        log(f"  {label}{' (default)' if (num_parts, tail) == default_items else ''}: {c_items:.1f} us")
        add_row("combine", "bf16", c_items, f"graph, zero-copy, items: {label}", zero_copy=True,
                reduce_parts=num_parts, reduce_tail_warps=tail)

if "host" in parts:
    trace_split("fp8 cached dispatch", lambda: fp8_cached())
    trace_split("bf16 dispatch", lambda: wl.dispatch(wl.x_bf16, cfg24))
    trace_split("bf16 combine", lambda: wl.combine(cfg24))
    import cProfile
    import pstats
    prof = cProfile.Profile() if rank == 0 else None
    if prof:
        prof.enable()
    for _ in range(20):
        fp8_cached()
        wl.combine(cfg24)
    if prof:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    cp.cuda.Device().synchronize()
    group.barrier()

# -- the parts with diagnostics compiled in (a Buffer per setting) ----------------------------------------------
if "graph" in parts:
    use_buffer(EPCOMM_DEBUG_TRACE=1)
    graph_split("fp8 cached dispatch, 24 SMs", fp8_cached)
    graph_split("bf16 cached dispatch, 24 SMs", bf16_cached)
    graph_split("bf16 combine, 24 SMs", lambda: wl.combine(cfg24))
    graph_split("fp8 cached dispatch, zero-copy, 24 SMs", lambda: fp8_cached(zc=True))
    graph_split("bf16 cached dispatch, zero-copy, 24 SMs", lambda: bf16_cached(zc=True))
    wl.fill_combine_buffer(cfg24)
    graph_split("bf16 combine, zero-copy, 24 SMs", zc_combine)

if "roles" in parts and R < 2:
    log("roles skipped: one rank has no peer rows")
elif "roles" in parts:
    # EPCOMM_DEBUG_SEND_ROLES bits: 1 rows to peers, 2 the rank's own rows, 4 each row's metadata (scales, top-k,
    # source index); on all 24 SMs and on the role's share of the default split.
    runs = (("peer rows + metadata, 24 SMs", 5, 0), ("peer rows, no metadata, 24 SMs", 1, 0),
            ("own rows + metadata, 24 SMs", 6, 0), ("own rows, no metadata, 24 SMs", 2, 0),
            ("all rows, no metadata, 24 SMs", 3, 0),
            (f"peer rows + metadata, {default_split} SMs", 5, default_split),
            (f"own rows + metadata, {24 - default_split} SMs", 6, default_split))
    for mask in dict.fromkeys(m for _, m, _ in runs):  # a Buffer per mask, in first-use order
        use_buffer(EPCOMM_DEBUG_TRACE=1, EPCOMM_DEBUG_SEND_ROLES=mask)
        for label, m, peers in runs:
            if m == mask:
                cfg_p = epcomm.Config(num_sms=24, send_peer_sms=peers)
                graph_split(f"fp8 cached dispatch, {label}", lambda: fp8_cached(cfg_p))

if rows and rank == 0:
    save_records("intranode", rows, args.out)
buf.destroy()
for name in SWITCHES:
    os.environ.pop(name, None)
group.close()
