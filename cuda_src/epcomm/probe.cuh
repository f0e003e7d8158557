// Probe kernels: a device timestamp for diagnostics; bootstrap probes that prove that CUDA IPC peer mappings (write_peer) and NVSHMEM device calls (nvshmem_put_ring)
// work on this machine before the real kernels rely on them. Launched from epcomm/probe.py.
#pragma once

#include "epcomm/comm.cuh"
#include "epcomm/common.cuh"
#if defined(EPCOMM_NVSHMEM)
#include "epcomm/nvshmem.cuh"
#endif

namespace epcomm::probe {

// dst[i] = value for i in [0, n): a grid-stride fill; dst may be a peer's buffer mapped through CUDA IPC.
template <int kNumThreads>
EPCOMM_DEVICE_INLINE void write_peer(int* dst, int value, long long n) {
    const long long stride = static_cast<long long>(gridDim.x) * kNumThreads;
    for (long long i = static_cast<long long>(blockIdx.x) * kNumThreads + threadIdx.x; i < n; i += stride)
        dst[i] = value;
}

// out[slot] = the GPU's global nanosecond timer (one thread). Diagnostics: launched between kernels it splits a
// call's device time, also inside CUDA graphs (where event timing is unavailable). Resolution: that of %globaltimer.
template <int kNumThreads>
EPCOMM_DEVICE_INLINE void timestamp(unsigned long long* out, int slot) {
    if (blockIdx.x == 0 && threadIdx.x == 0) out[slot] = globaltimer_ns();
}

#if defined(EPCOMM_NVSHMEM)
// Ring put: this PE sends src[0:n] to the next PE's symmetric dst with put-with-signal (sig = round there), then
// waits, bounded, for the previous PE's put to set its own sig to >= round. Launch one block.
// sig: symmetric uint64 word, below round before the call (rounds increase, or the caller zeroes it).
template <int kNumThreads>
EPCOMM_DEVICE_INLINE void nvshmem_put_ring(int* dst, const int* src, long long n, uint64_t* sig, uint64_t round,
                                           uint64_t err_record, long long timeout_ns, int rank) {
    static_assert(kNumThreads % kWarpSize == 0, "whole warps only");
    const comm::Waiter w(err_record, timeout_ns, rank);
    const int me = nvshmem::my_pe(), num_pes = nvshmem::n_pes();
    const int next_pe = (me + 1) % num_pes, prev_pe = (me + num_pes - 1) % num_pes;
    if (blockIdx.x != 0) return;
    if (warp_id() == 0) {
        nvshmem::put_signal_nbi_warp(dst, src, static_cast<size_t>(n) * sizeof(int), sig, round,
                                     nvshmem::SignalOp::kSet, next_pe);
        // Retire our outgoing put before the kernel ends (its completion is what the next PE waits for).
        if (lane_id() == 0) nvshmem::quiet();
    }
    // Pairs with the signal update of prev_pe's put_signal_nbi_warp: dst holds its data once sig >= round.
    if (threadIdx.x == 0) comm::wait_geq(sig, round, w, prev_pe, phase::kProbe);
}
#endif

}  // namespace epcomm::probe
