// Memory ordering and raw memory access as inline PTX, the scope always in the name (sys: all GPUs, processes and the
// host; gpu: this GPU; cta: this block). Every flag store/load in epcomm goes through these, never through volatile.
// NOTES: callers name the partner of every acquire/release they use (docs/design.md keeps the table of flag pairs).
#pragma once

#include "epcomm/common.cuh"

namespace epcomm {

// ---- Acquire loads: later reads see everything written before the partner's release store / release atomic.

// Acquire load of a u64 flag, system scope (peer GPU, other process or host may have released it).
EPCOMM_DEVICE_INLINE uint64_t ld_acquire_sys_u64(const uint64_t* ptr) {
    uint64_t value;
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(value) : "l"(ptr) : "memory");
    return value;
}

// Acquire load of a u32 flag, system scope.
EPCOMM_DEVICE_INLINE uint32_t ld_acquire_sys_u32(const uint32_t* ptr) {
    uint32_t value;
    asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(value) : "l"(ptr) : "memory");
    return value;
}

// Acquire load of an s32 flag, system scope.
EPCOMM_DEVICE_INLINE int32_t ld_acquire_sys_s32(const int32_t* ptr) {
    int32_t value;
    asm volatile("ld.acquire.sys.global.s32 %0, [%1];" : "=r"(value) : "l"(ptr) : "memory");
    return value;
}

// Acquire load of a u64 flag, GPU scope (only blocks of this GPU release it).
EPCOMM_DEVICE_INLINE uint64_t ld_acquire_gpu_u64(const uint64_t* ptr) {
    uint64_t value;
    asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(value) : "l"(ptr) : "memory");
    return value;
}

// Acquire load of a u32 flag, GPU scope.
EPCOMM_DEVICE_INLINE uint32_t ld_acquire_gpu_u32(const uint32_t* ptr) {
    uint32_t value;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(value) : "l"(ptr) : "memory");
    return value;
}

// Acquire load of an s32 flag, GPU scope.
EPCOMM_DEVICE_INLINE int32_t ld_acquire_gpu_s32(const int32_t* ptr) {
    int32_t value;
    asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(value) : "l"(ptr) : "memory");
    return value;
}

// ---- Relaxed loads: a fresh value (never cached in a register or L1), no ordering of other accesses.

// Relaxed load of a u64, system scope.
EPCOMM_DEVICE_INLINE uint64_t ld_relaxed_sys_u64(const uint64_t* ptr) {
    uint64_t value;
    asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(value) : "l"(ptr) : "memory");
    return value;
}

// Relaxed load of a u32, system scope.
EPCOMM_DEVICE_INLINE uint32_t ld_relaxed_sys_u32(const uint32_t* ptr) {
    uint32_t value;
    asm volatile("ld.relaxed.sys.global.u32 %0, [%1];" : "=r"(value) : "l"(ptr) : "memory");
    return value;
}

// Relaxed load of an s32, system scope.
EPCOMM_DEVICE_INLINE int32_t ld_relaxed_sys_s32(const int32_t* ptr) {
    int32_t value;
    asm volatile("ld.relaxed.sys.global.s32 %0, [%1];" : "=r"(value) : "l"(ptr) : "memory");
    return value;
}

// Relaxed load of an s32, GPU scope (a word only this GPU's threads write).
EPCOMM_DEVICE_INLINE int32_t ld_relaxed_gpu_s32(const int32_t* ptr) {
    int32_t value;
    asm volatile("ld.relaxed.gpu.global.s32 %0, [%1];" : "=r"(value) : "l"(ptr) : "memory");
    return value;
}

// ---- Release stores: everything this thread wrote before becomes visible to whoever acquires the new value.

// Release store of a u64 flag, system scope.
EPCOMM_DEVICE_INLINE void st_release_sys_u64(uint64_t* ptr, uint64_t value) {
    asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(ptr), "l"(value) : "memory");
}

// Release store of a u32 flag, system scope.
EPCOMM_DEVICE_INLINE void st_release_sys_u32(uint32_t* ptr, uint32_t value) {
    asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(ptr), "r"(value) : "memory");
}

// Release store of an s32 flag, system scope.
EPCOMM_DEVICE_INLINE void st_release_sys_s32(int32_t* ptr, int32_t value) {
    asm volatile("st.release.sys.global.s32 [%0], %1;" ::"l"(ptr), "r"(value) : "memory");
}

// Release store of a u64 flag, GPU scope.
EPCOMM_DEVICE_INLINE void st_release_gpu_u64(uint64_t* ptr, uint64_t value) {
    asm volatile("st.release.gpu.global.u64 [%0], %1;" ::"l"(ptr), "l"(value) : "memory");
}

// Release store of an s32 flag, GPU scope.
EPCOMM_DEVICE_INLINE void st_release_gpu_s32(int32_t* ptr, int32_t value) {
    asm volatile("st.release.gpu.global.s32 [%0], %1;" ::"l"(ptr), "r"(value) : "memory");
}

// ---- Relaxed stores: written through to the point of coherence, no ordering of other accesses.

// Relaxed store of a u64, system scope.
EPCOMM_DEVICE_INLINE void st_relaxed_sys_u64(uint64_t* ptr, uint64_t value) {
    asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(ptr), "l"(value) : "memory");
}

// Relaxed store of a u32, system scope.
EPCOMM_DEVICE_INLINE void st_relaxed_sys_u32(uint32_t* ptr, uint32_t value) {
    asm volatile("st.relaxed.sys.global.u32 [%0], %1;" ::"l"(ptr), "r"(value) : "memory");
}

// Relaxed store of an s32, system scope.
EPCOMM_DEVICE_INLINE void st_relaxed_sys_s32(int32_t* ptr, int32_t value) {
    asm volatile("st.relaxed.sys.global.s32 [%0], %1;" ::"l"(ptr), "r"(value) : "memory");
}

// Relaxed store of an s32, GPU scope.
EPCOMM_DEVICE_INLINE void st_relaxed_gpu_s32(int32_t* ptr, int32_t value) {
    asm volatile("st.relaxed.gpu.global.s32 [%0], %1;" ::"l"(ptr), "r"(value) : "memory");
}

// Relaxed store of an s64, system scope.
EPCOMM_DEVICE_INLINE void st_relaxed_sys_s64(int64_t* ptr, int64_t value) {
    asm volatile("st.relaxed.sys.global.s64 [%0], %1;" ::"l"(ptr), "l"(value) : "memory");
}

// ---- Atomics (return the old value).

// Atomic add with release semantics, system scope, on a u64 counter.
EPCOMM_DEVICE_INLINE uint64_t atomic_add_release_sys_u64(uint64_t* ptr, uint64_t value) {
    uint64_t old;
    asm volatile("atom.release.sys.global.add.u64 %0, [%1], %2;" : "=l"(old) : "l"(ptr), "l"(value) : "memory");
    return old;
}

// Atomic add with release semantics, system scope, on an s32 counter.
EPCOMM_DEVICE_INLINE int32_t atomic_add_release_sys_s32(int32_t* ptr, int32_t value) {
    int32_t old;
    asm volatile("atom.release.sys.global.add.s32 %0, [%1], %2;" : "=r"(old) : "l"(ptr), "r"(value) : "memory");
    return old;
}

// Atomic add with release semantics, GPU scope, on an s32 counter.
EPCOMM_DEVICE_INLINE int32_t atomic_add_release_gpu_s32(int32_t* ptr, int32_t value) {
    int32_t old;
    asm volatile("atom.release.gpu.global.add.s32 %0, [%1], %2;" : "=r"(old) : "l"(ptr), "r"(value) : "memory");
    return old;
}

// Atomic add, relaxed, GPU scope, on an s32 counter (counting only, orders nothing).
EPCOMM_DEVICE_INLINE int32_t atomic_add_relaxed_gpu_s32(int32_t* ptr, int32_t value) {
    int32_t old;
    asm volatile("atom.relaxed.gpu.global.add.s32 %0, [%1], %2;" : "=r"(old) : "l"(ptr), "r"(value) : "memory");
    return old;
}

// Compare-and-swap with acquire-release semantics, GPU scope, on an s32 word.
EPCOMM_DEVICE_INLINE int32_t atomic_cas_acq_rel_gpu_s32(int32_t* ptr, int32_t compare, int32_t value) {
    int32_t old;
    asm volatile("atom.acq_rel.gpu.global.cas.b32 %0, [%1], %2, %3;"
                 : "=r"(old)
                 : "l"(ptr), "r"(compare), "r"(value)
                 : "memory");
    return old;
}

// ---- Fences. PTX has no release-only fence for these scopes: fence.acq_rel is the release (and acquire) fence.

// Acquire-release fence, system scope: orders this thread's accesses as seen by peers, other processes and the host.
EPCOMM_DEVICE_INLINE void fence_acq_rel_sys() { asm volatile("fence.acq_rel.sys;" ::: "memory"); }

// Acquire-release fence, GPU scope.
EPCOMM_DEVICE_INLINE void fence_acq_rel_gpu() { asm volatile("fence.acq_rel.gpu;" ::: "memory"); }

// Acquire-release fence, block scope.
EPCOMM_DEVICE_INLINE void fence_acq_rel_cta() { asm volatile("fence.acq_rel.cta;" ::: "memory"); }

// Sequentially consistent fence, system scope (the heaviest; for store-then-load patterns across agents).
EPCOMM_DEVICE_INLINE void fence_sc_sys() { asm volatile("fence.sc.sys;" ::: "memory"); }

// ---- 16-byte vector access (pointers must be 16-byte aligned).

// Plain 16-byte global load.
EPCOMM_DEVICE_INLINE int4 ld_global_v4(const int4* ptr) {
    int4 v;
    asm volatile("ld.global.v4.s32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(ptr));
    return v;
}

// 16-byte load through the read-only path without L1 allocation: only for data no one writes during the kernel.
EPCOMM_DEVICE_INLINE int4 ld_global_nc_na_v4(const int4* ptr) {
    int4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(ptr));
    return v;
}

// Plain 16-byte global store.
EPCOMM_DEVICE_INLINE void st_global_v4(int4* ptr, int4 v) {
    asm volatile("st.global.v4.s32 [%0], {%1, %2, %3, %4};" ::"l"(ptr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
}

// 16-byte global store that does not allocate in L1 (streaming data to a peer or a receive buffer).
EPCOMM_DEVICE_INLINE void st_global_na_v4(int4* ptr, int4 v) {
    asm volatile("st.global.L1::no_allocate.v4.s32 [%0], {%1, %2, %3, %4};" ::"l"(ptr), "r"(v.x), "r"(v.y), "r"(v.z),
                 "r"(v.w)
                 : "memory");
}

// ---- Timers and thread coordinates.

// Nanoseconds of the GPU's global timer (same clock on every SM; resolution about 1 us on some parts).
EPCOMM_DEVICE_INLINE uint64_t globaltimer_ns() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// Lane index of this thread inside its warp (0..31).
EPCOMM_DEVICE_INLINE int lane_id() {
    int lane;
    asm("mov.u32 %0, %%laneid;" : "=r"(lane));
    return lane;
}

// Warp index of this thread inside its (1-D) block.
EPCOMM_DEVICE_INLINE int warp_id() { return static_cast<int>(threadIdx.x) / kWarpSize; }

}  // namespace epcomm
