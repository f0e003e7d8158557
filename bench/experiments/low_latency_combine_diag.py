"""Where the once-per-rank low-latency combine's time goes (an experiment; the standard benchmark is
bench/bench_low_latency.py): DeepEP's low-latency workload, the combine forced once per rank and timed as CUDA-graph
replays (two combines per capture), whole, with parts left out through EPCOMM_DEBUG_LL_COMBINE_SKIP (1 the weights
exchange, 2 the row loads, 4 the partial-row stores, 8 every item; compiled in, so a Buffer per setting; those calls'
results are wrong), and with combine_send at 2 blocks per expert (two waves).

    mpirun -n N python bench/experiments/low_latency_combine_diag.py [--quick]

Prints only; bench/NOTES.md keeps the numbers."""
from __future__ import annotations

import os
import sys

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, BENCH)
sys.path.insert(0, os.path.dirname(BENCH))
import common  # noqa: E402
from common import LowLatencyWorkload, Ranks  # noqa: E402

import epcomm  # noqa: E402
from epcomm.group import Group  # noqa: E402

SWITCH = "EPCOMM_DEBUG_LL_COMBINE_SKIP"
args = common.workload_args(128, 50, 20, __doc__)

group = Group()
ranks = Ranks(group)
R, rank = ranks.num_ranks, ranks.rank
wl = LowLatencyWorkload(args.tokens, args.hidden, args.topk, args.experts, rank, R)
ranks.log(f"low-latency combine diagnostics: {ranks.title()}, {wl.T} tokens/rank, hidden {wl.H}, top-{wl.K} of "
          f"{wl.E}; graph, a combine (median of two per capture)")
if ranks.oversubscribed:
    ranks.log("NOTE: ranks share a GPU, so these are not NVLink timings")

# (skip bits, combine_send blocks per expert (None: the heuristic), what); bits 0 are the kernels of normal use.
RUNS = ((0, None, "full (nothing left out)"), (0, 2, "combine_send 2 blocks per expert (two waves)"),
        (1, None, "no weights exchange"), (2, None, "no row loads"), (4, None, "no partial stores"),
        (8, None, "no items"), (6, None, "no loads, no stores"))
buf = None
for bits in dict.fromkeys(b for b, _, _ in RUNS):  # a Buffer per setting of the switch
    if buf is not None:
        buf.destroy()
    os.environ.pop(SWITCH, None)
    if bits:
        os.environ[SWITCH] = str(bits)
    buf = epcomm.Buffer(group, num_rdma_bytes=wl.rdma_bytes(R), low_latency_mode=True, backend="gpu")
    buf.set_tuning("low_latency", combine_once_per_rank=True)
    wl.bind(buf)
    for b, bpe, what in RUNS:
        if b != bits:
            continue
        old = buf.set_tuning("low_latency", combine_send_blocks_per_expert=bpe)
        try:
            us = ranks.agree(ranks.timed_graph(wl.two_combines, args.iters, 2,
                                               check=lambda: buf._backend.ctx.check("benchmark graph replays")))
        finally:
            buf.set_tuning("low_latency", **vars(old))
        ranks.log(f"combine diag: {what}: {us:.1f} us (graph, a combine)")
buf.destroy()
os.environ.pop(SWITCH, None)
group.close()
