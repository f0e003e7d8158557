"""Per-call cost of the CPU backend's low-latency pair (for the cross-rank agreement before/after): run under
mpiexec -n 2 with PYTHONPATH set to the checkout to measure; prints the median per call on rank 0."""
import time, numpy as np, epcomm
from epcomm.testing import make_rank_inputs
buf = epcomm.Buffer(None, backend="cpu"); rank, R = buf.rank, buf.num_ranks
xs, idxs, ws = make_rank_inputs(1, [4] * R, 256, 2, 2 * R)
def step():
    recv, _, h, _, _ = buf.low_latency_dispatch(xs[rank], idxs[rank], 8, 2 * R, use_fp8=False)
    buf.low_latency_combine(recv, idxs[rank], ws[rank], h)
for _ in range(200): step()
ts = []
for _ in range(7):
    buf.group.barrier(); t = time.perf_counter()
    for _ in range(500): step()
    ts.append((time.perf_counter() - t) / 1000 * 1e6)
if rank == 0: print(f"{epcomm.__file__}: median {np.median(ts):.1f} us per call (ll dispatch or combine, T=4 H=256)")
