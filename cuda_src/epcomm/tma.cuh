// Hopper bulk copies (the TMA's one-dimensional cp.async.bulk) as inline PTX: the one owner of mbarriers and bulk
// groups in epcomm. A bulk copy moves up to a shared-memory stage per instruction without holding registers, so one
// thread keeps (stages x stage bytes) in flight; register copies are capped by the register file (bench/NOTES.md).
// Sizes and addresses: multiples of 16 bytes. Everything here needs sm_90; kAvailable says whether it compiled in.
#pragma once

#include "epcomm/common.cuh"

namespace epcomm::tma {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr bool kAvailable = true;

EPCOMM_DEVICE_INLINE uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// An mbarrier expecting `count` arrivals per phase; make it visible to the async proxy before first use
// (fence_barrier_init, then a block barrier if other threads use it).
EPCOMM_DEVICE_INLINE void barrier_init(uint64_t* bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}

EPCOMM_DEVICE_INLINE void fence_barrier_init() {
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

// Arrive on bar and add `bytes` to the transaction count its current phase waits for (the bulk loads' bytes).
EPCOMM_DEVICE_INLINE void arrive_expect_bytes(uint64_t* bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}

// True once the phase with this parity completed (every arrival made, every expected byte landed); acquire at CTA
// scope, so the loaded shared memory may be read (or bulk-stored) afterwards.
EPCOMM_DEVICE_INLINE bool barrier_try_wait(uint64_t* bar, uint32_t parity) {
    uint32_t done;
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
    return done != 0;
}

// Bulk load bytes from global src into shared dst; completion is signalled on bar (arrive_expect_bytes first).
EPCOMM_DEVICE_INLINE void load(void* smem_dst, const void* gmem_src, uint32_t bytes, uint64_t* bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                     smem_addr(smem_dst)),
                 "l"(gmem_src), "r"(bytes), "r"(smem_addr(bar))
                 : "memory");
}

// Bulk store bytes from shared src to global dst (this GPU's memory or a peer's through a CUDA IPC mapping), in the
// current bulk group (commit() closes it).
EPCOMM_DEVICE_INLINE void store(void* gmem_dst, const void* smem_src, uint32_t bytes) {
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(gmem_dst), "r"(smem_addr(smem_src)),
                 "r"(bytes)
                 : "memory");
}

EPCOMM_DEVICE_INLINE void commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }

// Wait until all but the kPending most recent bulk groups have finished READING shared memory (stages reusable).
template <int kPending>
EPCOMM_DEVICE_INLINE void wait_reads() {
    asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(kPending) : "memory");
}

// Wait until all but the kPending most recent bulk groups are complete (their global writes performed). Before a
// generic-proxy release of those writes (a flag), also call fence_async_to_generic().
template <int kPending>
EPCOMM_DEVICE_INLINE void wait_writes() {
    asm volatile("cp.async.bulk.wait_group %0;" ::"n"(kPending) : "memory");
}

// Orders the async proxy's completed global writes before this thread's later generic-proxy accesses (e.g. the
// release store of a flag that publishes them).
EPCOMM_DEVICE_INLINE void fence_async_to_generic() { asm volatile("fence.proxy.async.global;" ::: "memory"); }

#else
constexpr bool kAvailable = false;
#endif

}  // namespace epcomm::tma
