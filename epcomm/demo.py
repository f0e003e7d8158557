"""A short multi-rank dispatch/combine demo: `mpiexec -n 4 python -m epcomm.demo`.

Every rank makes all ranks' inputs from one seed, runs layout -> dispatch -> combine and the low-latency pair
through epcomm.Buffer (GPU when one is visible, else the CPU backend), checks each result against the numpy
reference, and rank 0 prints a table.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--experts", type=int, default=0, help="default: 8 per rank")
    p.add_argument("--backend", default=None, choices=[None, "auto", "cpu", "gpu"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import epcomm
    from epcomm import reference as ref
    from epcomm.testing import make_topk, make_weights, make_x

    from mpi4py import MPI
    nr = MPI.COMM_WORLD.Get_size()
    e = args.experts or 8 * nr
    tokens = [max(1, args.tokens - 3 * r) for r in range(nr)]  # ranks with different token counts
    tmax = max(tokens)
    from epcomm.intranode import nvl_buffer_size_hint
    # Both modes on one Buffer: the normal-mode buffer is asked for explicitly (a low-latency Buffer has none by
    # default, as in DeepEP).
    buf = epcomm.Buffer(None, backend=args.backend, low_latency_mode=True,
                        num_nvl_bytes=nvl_buffer_size_hint(tmax, args.hidden * 2, nr, args.topk),
                        num_rdma_bytes=epcomm.Buffer.get_low_latency_rdma_size_hint(tmax, args.hidden, nr, e))
    rank = buf.rank
    rng = np.random.default_rng(args.seed)
    xs = [make_x(rng, t, args.hidden, r) for r, t in enumerate(tokens)]
    idxs = [make_topk(rng, t, args.topk, e) for t in tokens]
    ws = [make_weights(rng, t, args.topk) for t in tokens]
    to_dev = (lambda a: a) if buf.backend == "cpu" else __import__("cupy").asarray
    to_host = (lambda a: a) if buf.backend == "cpu" else (lambda a: a.get())
    rows = []

    def check(name, ok, dt):
        rows.append((name, "ok" if ok else "MISMATCH", f"{dt * 1e3:.2f} ms"))

    t0 = time.perf_counter()
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(to_dev(idxs[rank]), e)
    lay = ref.get_dispatch_layout(idxs[rank], e, nr)
    check("layout", np.array_equal(to_host(in_rank), lay[3]) and np.array_equal(to_host(per_expert), lay[2]),
          time.perf_counter() - t0)

    t0 = time.perf_counter()
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
        to_dev(xs[rank]), num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        topk_idx=to_dev(idxs[rank]), topk_weights=to_dev(ws[rank]))
    want = ref.dispatch(xs, idxs, ws, e)[rank]
    check("dispatch", np.array_equal(to_host(recv_x).view(np.uint16), want.recv_x.view(np.uint16))
          and np.array_equal(to_host(recv_idx), want.recv_topk_idx) and counts == want.num_recv_tokens_per_expert_list,
          time.perf_counter() - t0)

    t0 = time.perf_counter()
    combined, _, _ = buf.combine(recv_x, handle)
    results = ref.dispatch(xs, idxs, ws, e)
    in_ranks = [ref.get_dispatch_layout(i, e, nr)[3] for i in idxs]
    want_c = ref.combine([r.recv_x for r in results], results, in_ranks)[rank][0]
    diff = np.abs(to_host(combined).astype(np.float32) - want_c.astype(np.float32)).max()
    check("combine", diff <= 0.0 + 1e-2 * np.abs(want_c.astype(np.float32)).max(), time.perf_counter() - t0)

    t0 = time.perf_counter()
    ll_x, ll_count, ll_handle, _, _ = buf.low_latency_dispatch(to_dev(xs[rank]), to_dev(idxs[rank]), tmax, e,
                                                               use_fp8=False)
    want_ll = ref.low_latency_dispatch(xs, idxs, tmax, e, use_fp8=False)[rank]
    check("ll_dispatch", np.array_equal(to_host(ll_count), want_ll.recv_count), time.perf_counter() - t0)
    t0 = time.perf_counter()
    ll_out, _, _ = buf.low_latency_combine(ll_x, to_dev(idxs[rank]), to_dev(ws[rank]), ll_handle)
    lls = ref.low_latency_dispatch(xs, idxs, tmax, e, use_fp8=False)
    want_llc = ref.low_latency_combine([r.recv_x for r in lls], idxs, ws, lls, e)[rank]
    d = np.abs(to_host(ll_out).astype(np.float32) - want_llc.astype(np.float32)).max()
    check("ll_combine", d <= 1e-2 * max(1.0, np.abs(want_llc.astype(np.float32)).max()), time.perf_counter() - t0)

    return _report(buf, rows, tokens, args, e)


def _report(buf, rows, tokens, args, e) -> int:
    rank, nr = buf.rank, buf.num_ranks
    all_rows = buf.group.allgather(rows)
    ok = all(r[1] == "ok" for rr in all_rows for r in rr)
    if rank == 0:
        print(f"epcomm demo: {nr} ranks, backend {buf.backend}, tokens {tokens}, hidden {args.hidden}, "
              f"top-{args.topk} of {e} experts")
        print(f"{'op':<12} " + " ".join(f"{'rank ' + str(r):>18}" for r in range(nr)))
        for i, (name, _, _) in enumerate(rows):
            print(f"{name:<12} " + " ".join(f"{rr[i][1] + ' ' + rr[i][2]:>18}" for rr in all_rows))
        print("all results match the reference" if ok else "SOME RESULTS DO NOT MATCH THE REFERENCE")
    buf.destroy()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
