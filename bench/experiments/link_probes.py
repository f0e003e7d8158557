"""Link probes (an experiment; the standard benchmark measures only the one-way peer-store ceiling): what the NVLink
between two GPUs moves in the ways the kernels could use it, between rank 0 and rank 1 (one way) or every rank and
the next (both ways), over a 256 MiB IPC-mapped buffer per rank:

  - 16-byte peer stores, one per thread per step, 24 blocks and one block per SM: one way and both ways
  - 24 blocks x 512 threads with 8 loads in flight per thread (as the row copies issue them): peer stores, a local copy
    (the copy-out / reduce side), peer reads (pulls), one way and both ways
  - both ways with half the bytes pushed and half pulled (the 24 blocks split between the two)
  - Hopper bulk copies (TMA): one thread per block, 8 x 16 KiB in flight through shared memory (sm_90 only)

    mpirun -n 2 python bench/experiments/link_probes.py [--mib 256] [--iters 10]

Rates count the bytes stored (mixed: the bytes each rank receives). Prints only; bench/NOTES.md keeps the numbers.
Needs two or more ranks, one GPU each."""
from __future__ import annotations

import argparse
import os
import sys

import cupy as cp

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, BENCH)
sys.path.insert(0, os.path.dirname(BENCH))
from common import Ranks, peer_store_gbps  # noqa: E402

from epcomm.group import Group  # noqa: E402
from epcomm.memory import PeerBuffer  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--mib", type=int, default=256, help="bytes per probe, MiB")
ap.add_argument("--iters", type=int, default=10, help="timed calls per probe (the median is reported)")
args = ap.parse_args()

group = Group()
ranks = Ranks(group)
R, rank = ranks.num_ranks, ranks.rank
log, agree = ranks.log, ranks.agree
if not ranks.measures_links:
    ranks.log(f"link probes need two or more ranks, one GPU each; this run is {ranks.title()}")
    group.close()
    sys.exit(2)
log(f"link probes: {ranks.title()}, {args.mib} MiB per probe")

nb = (args.mib << 20) // 4096 * 4096
peer_buf = PeerBuffer(group, nb)  # raw cudaMalloc memory, every peer's mapped through CUDA IPC (as the NVLink buffer)
peer_ptr = peer_buf.peer_ptrs[(rank + 1) % R]
src = cp.ones(nb // 16 * 4, cp.int32)
local_dst = cp.empty_like(src)


def timed(fn):
    return ranks.timed(fn, args.iters)


def gbps(nbytes, us):
    return nbytes / (us * 1e-6) / 1e9


# -- 16-byte peer stores, one per thread per step ----------------------------------------------------------------
ceilings = {blocks: (peer_store_gbps(ranks, src, peer_ptr, nb, blocks, rank == 0, args.iters),
                     peer_store_gbps(ranks, src, peer_ptr, nb, blocks, True, args.iters))
            for blocks in sorted({24, ranks.num_sms})}
log("peer-store ceiling: " + ", ".join(f"{b} blocks: one-way {c[0]:.0f} GB/s, both ways {c[1]:.0f} GB/s each"
                                       for b, c in ceilings.items()))

# -- 8 loads in flight per thread --------------------------------------------------------------------------------
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
probe = {}
for what, src_ptr, dst_ptr, active in (
        ("peer one-way", int(src.data.ptr), peer_ptr, rank == 0), ("peer both ways", int(src.data.ptr), peer_ptr, True),
        ("local copy", int(src.data.ptr), int(local_dst.data.ptr), True),
        ("peer reads one-way", peer_ptr, int(local_dst.data.ptr), rank == 0),
        ("peer reads both ways", peer_ptr, int(local_dst.data.ptr), True)):
    def run8(blocks=24, src_ptr=src_ptr, dst_ptr=dst_ptr, active=active):
        if active:
            copy8((blocks,), (512,), (cp.uint64(src_ptr), cp.uint64(dst_ptr), cp.uint64(nb // 16)))
    t8 = timed(run8)
    probe[what] = gbps(nb, agree(t8 if active else 0))
log("24 blocks x 512 threads, 8 loads in flight per thread: " +
    ", ".join(f"{k} {v:.0f} GB/s" for k, v in probe.items()))

# -- both ways, half pushed and half pulled ----------------------------------------------------------------------
# Against all pushed or all pulled above: what a combine that pushes part of its rows could reach.
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
    probe_mixed[push_blocks] = gbps(nb, agree(timed(run_mixed)))
log("both ways, half pushed and half pulled, 24 blocks x 512 threads, 8 loads in flight: " +
    ", ".join(f"{b} pushing blocks {v:.0f} GB/s" for b, v in probe_mixed.items()))

# -- Hopper bulk copies (TMA) ------------------------------------------------------------------------------------
if int(cp.cuda.Device().compute_capability) < 90:
    log(f"bulk copies (TMA) skipped: they need sm_90, this GPU is sm_{cp.cuda.Device().compute_capability}")
else:
    from epcomm.probe import BULK_CHUNK, bulk_copy
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
            t_tma = timed(run_tma)
            probe_tma[(blocks, what)] = gbps(nb_tma, agree(t_tma if active else 0))
    log("bulk copies (TMA), 1 thread x 128 KiB in flight per block: " +
        ", ".join(f"{b} blocks {k} {v:.0f} GB/s" for (b, k), v in probe_tma.items()))

peer_buf.close()
group.close()
