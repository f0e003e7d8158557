// Probe kernels: a device timestamp and a bulk copy for diagnostics, and bootstrap probes that prove that CUDA IPC peer
// mappings (write_peer) and NVSHMEM device calls (nvshmem_put_ring) work on this machine before the real kernels rely
// on them. Launched from epcomm/probe.py.
#pragma once

#include "epcomm/comm.cuh"
#include "epcomm/common.cuh"
#include "epcomm/tma.cuh"
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

// dst[0:n_bytes) = src[0:n_bytes) with bulk copies (the TMA), one thread per block: chunk c (kChunkBytes) goes to block
// c % gridDim.x; each block keeps kStages chunks in flight through shared memory. n_bytes: a multiple of kChunkBytes.
// dst may be a peer's buffer (CUDA IPC). Diagnostics (bench: what 24 SMs move without the register-file cap).
template <int kStages, int kChunkBytes>
EPCOMM_DEVICE_INLINE void bulk_copy(const uint8_t* src, uint8_t* dst, long long n_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    extern __shared__ __align__(128) uint8_t stages[];  // kStages x kChunkBytes
    __shared__ uint64_t bars[kStages];
    if (threadIdx.x != 0) return;
    for (int s = 0; s < kStages; ++s) tma::barrier_init(&bars[s], 1);
    tma::fence_barrier_init();
    const long long chunks = n_bytes / kChunkBytes;
    const long long mine = chunks > blockIdx.x ? (chunks - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
    auto offset = [&](long long i) { return (blockIdx.x + i * gridDim.x) * static_cast<long long>(kChunkBytes); };
    auto issue = [&](long long i) {
        const int s = static_cast<int>(i % kStages);
        tma::arrive_expect_bytes(&bars[s], kChunkBytes);
        tma::load(stages + s * kChunkBytes, src + offset(i), kChunkBytes, &bars[s]);
    };
    for (long long i = 0; i < kStages - 1 && i < mine; ++i) issue(i);
    for (long long i = 0; i < mine; ++i) {
        const int s = static_cast<int>(i % kStages);
        while (!tma::barrier_try_wait(&bars[s], static_cast<uint32_t>((i / kStages) & 1))) {}
        tma::store(dst + offset(i), stages + s * kChunkBytes, kChunkBytes);
        tma::commit();
        if (i + kStages - 1 < mine) {
            tma::wait_reads<1>();  // the store of chunk i - 1 has read stage (i - 1) % kStages, which we reload now
            issue(i + kStages - 1);
        }
    }
    tma::wait_writes<0>();
#else
    __trap();  // sm_90 only
#endif
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
