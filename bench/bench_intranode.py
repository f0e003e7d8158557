"""Intranode normal-mode benchmark, the standard one: DeepEP's workload (4096 tokens per rank, hidden 7168, top-8 of
256 experts): layout, FP8 dispatch, BF16 dispatch and BF16 combine with copying and zero-copy outputs, an SM sweep,
the one-way peer-store NVLink ceiling and the PyTorch/NCCL path measured in the same run. Prints a table, appends JSON
lines to bench/results/intranode.jsonl (and --out), and with --out plots GB/s against SMs.

    mpirun -n N python bench/bench_intranode.py [--quick] [--out DIR]     (N ranks, one per GPU)

Also one rank (EP1: no peer, so no ceiling and no baseline; said in the output) and several ranks sharing a GPU
(the records say "oversubscribed": true; those times are not NVLink times). The experiments (per-kernel splits,
dispatch_send's parts, the send-split, kernel-frame and combine-item sweeps, link probes) are in bench/experiments/."""
from __future__ import annotations

import os
import socket
import sys

try:  # import torch (the baseline) before anything puts bench/ on sys.path: once it failed to import after
    import torch  # noqa: F401  (a custom-op schema parse error inside torch, 2026-11-28, H200 image)
except Exception:
    torch = None

import cupy as cp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from common import IntranodeWorkload, Ranks, byte_counts, peer_store_gbps, record, save_records  # noqa: E402

import epcomm  # noqa: E402
from epcomm.group import Group  # noqa: E402

args = common.workload_args(4096, 30, 15, __doc__)
iters = args.iters

group = Group()
ranks = Ranks(group)
R, rank = ranks.num_ranks, ranks.rank
log, agree = ranks.log, ranks.agree
wl = IntranodeWorkload(args.tokens, args.hidden, args.topk, args.experts, rank)  # on this rank's GPU (Group chose it)
T, H, K, E = wl.T, wl.H, wl.K, wl.E
buf = epcomm.Buffer(group, num_nvl_bytes=wl.nvl_bytes(R), backend="gpu")
ranks.say_limits("the NVLink ceiling and the PyTorch/NCCL baseline")


def timed(fn, n=iters, warmup=3):
    return ranks.timed(fn, n, warmup)


def timed_graph(fn, n=iters):
    return ranks.timed_graph(fn, n, check=lambda: buf._backend.ctx.check("benchmark graph replays"))


wl.bind(buf)
layout_us = agree(timed(wl.layout))
layout_graph_us = agree(timed_graph(wl.layout))  # device time: the kernel and its fill
n_recv, n_local = wl.received_rows()
rows_total = agree(n_recv)  # the busiest receiver bounds the call
rows_remote = agree(n_recv - n_local)

# -- NVLink ceiling: one-way peer stores (rank 0 -> 1 only), 16 B per thread, 24 blocks and one per SM ----------
ceiling_one_way = None
if ranks.measures_links:
    intra = buf._backend.intranode  # read-only: this rank's NVLink buffer and its peers' mappings
    nb = min(256 << 20, intra.data_bytes) // 4096 * 4096
    src = cp.ones(nb // 16 * 4, cp.int32)
    peer_ptr = intra.nvl.peer_ptrs[(rank + 1) % R] + intra.meta_bytes
    ceilings = {blocks: peer_store_gbps(ranks, src, peer_ptr, nb, blocks, rank == 0)
                for blocks in sorted({24, ranks.num_sms})}
    ceiling_one_way = max(ceilings.values())
    del src
    log("peer-store ceiling, one way: " + ", ".join(f"{b} blocks {v:.0f} GB/s" for b, v in ceilings.items()) +
        " (both ways and other transports: bench/experiments/link_probes.py)")

# -- baseline: the PyTorch path (NCCL all_to_all_single + index_select / index_add) ---------------------------
baseline = {}
if ranks.measures_links:
    try:
        if torch is None:
            raise ImportError("torch is not installed")
        import torch.distributed as dist
        host0 = group.bcast(socket.gethostname())
        port = group.bcast(29500 + os.getpid() % 1000)
        dist.init_process_group("nccl", rank=rank, world_size=R,
                                init_method=f"tcp://{'127.0.0.1' if host0 == socket.gethostname() else host0}:{port}")
        dev = torch.device("cuda", group.device)
        tx = torch.from_dlpack(wl.x_bf16.view(cp.uint16)).view(torch.bfloat16)
        tin = torch.from_dlpack(wl.in_rank)
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
    rows.append(record(op, dt, R, ranks.gpus, T, H, K, E, sms, us, lb, pb, ranks.card, b,
                       ceiling_one_way_gbps=round(ceiling_one_way, 1) if ceiling_one_way else None, **extra))


rows.append(record("layout", "int64", R, ranks.gpus, T, H, K, E, None, layout_us, 0, 0, ranks.card))
rows.append(record("layout", "int64", R, ranks.gpus, T, H, K, E, None, layout_graph_us, 0, 0, ranks.card,
                   variant="graph"))
# The SM sweep, copying outputs: eager calls (host work included, as a Python layer loop sees them) and graph replays.
for sms in sorted({8, 16, 24, 32, 48, 64, ranks.num_sms}):
    cfg = epcomm.Config(num_sms=sms)
    f8 = agree(timed(lambda: wl.cached(wl.fp8, cfg)))
    disp8 = agree(timed(lambda: wl.dispatch(wl.fp8, cfg)))
    d16 = agree(timed(lambda: wl.dispatch(wl.x_bf16, cfg)))
    c16 = agree(timed(lambda: wl.combine(cfg)))
    f8g = agree(timed_graph(lambda: wl.cached(wl.fp8, cfg)))
    d16g = agree(timed_graph(lambda: wl.cached(wl.x_bf16, cfg)))
    c16g = agree(timed_graph(lambda: wl.combine(cfg)))
    for op, dt, us, variant in (("dispatch", "fp8", f8g, "cached-graph"), ("dispatch", "bf16", d16g, "cached-graph"),
                                ("combine", "bf16", c16g, "graph"), ("dispatch", "fp8", disp8, None),
                                ("dispatch", "fp8", f8, "cached"), ("dispatch", "bf16", d16, None),
                                ("combine", "bf16", c16, None)):
        add_row(op, dt, us, variant, sms=sms)

# Zero-copy at 24 SMs: dispatch outputs are views of the buffer (no copy-out); combine reads get_combine_buffer (no
# staging copy).
cfg24 = epcomm.Config(num_sms=24)
wl.cached(wl.fp8, cfg24, zero_copy=True)
zc_f8 = agree(timed_graph(lambda: wl.cached(wl.fp8, cfg24, zero_copy=True)))
zc_b16 = agree(timed_graph(lambda: wl.cached(wl.x_bf16, cfg24, zero_copy=True)))
wl.fill_combine_buffer(cfg24)
zc_c = agree(timed_graph(lambda: wl.zero_copy_combine(cfg24)))
zc_d8 = agree(timed(lambda: wl.dispatch(wl.fp8, cfg24, zero_copy=True)))
for op, dt, us, variant in (("dispatch", "fp8", zc_f8, "cached-graph, zero-copy"),
                            ("dispatch", "bf16", zc_b16, "cached-graph, zero-copy"),
                            ("combine", "bf16", zc_c, "graph, zero-copy"),
                            ("dispatch", "fp8", zc_d8, "zero-copy")):
    add_row(op, dt, us, variant, zero_copy=True)

if rank == 0:
    if ceiling_one_way:
        ceiling_text = f"one-way peer-store ceiling {ceiling_one_way:.0f} GB/s"
    else:
        ceiling_text = "no NVLink ceiling (" + ("one rank: no peer" if R == 1 else "ranks share a GPU") + ")"
    print(f"\n{ranks.title()}, {T} tokens/rank, hidden {H}, top-{K} of {E}; received rows {rows_total} "
          f"(remote {rows_remote}); {ceiling_text}")
    if ranks.oversubscribed:
        print("NOTE: ranks share a GPU, so these are not NVLink timings (records marked \"oversubscribed\": true)")
    print("| op | dtype | variant | SMs | median us | logical GB/s | physical GB/s | % ceiling | baseline us | "
          "speed-up |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r_ in rows:
        b = r_["baseline"]["median_us"] if r_.get("baseline") else None
        pct = f"{(100 * r_['physical_gbps'] / ceiling_one_way) if r_['physical_gbps'] else 0:.0f}%" \
            if ceiling_one_way else "-"
        print(f"| {r_['op']} | {r_['dtype']} | {r_.get('variant', '')} | {r_['num_sms'] or '-'} | "
              f"{r_['median_us']:.1f} | {r_['logical_gbps']} | {r_['physical_gbps']} | {pct} | "
              f"{b if b else '-'} | {(b / r_['median_us']) if b else 0:.2f}x |")
    save_records("intranode", rows, args.out)
    if args.out:
        try:
            from plot import plot_sm_sweep
            over = "_oversubscribed" if ranks.oversubscribed else ""
            plot_sm_sweep(rows, ceiling_one_way, f"epcomm intranode {ranks.title()}",
                          os.path.join(args.out, f"intranode_sms_ep{R}{over}.png"))
        except Exception as exc:
            print(f"plot skipped: {exc}")
buf.destroy()
group.close()
