// Bounded waiting, the one owner of spinning in epcomm: the wait helpers every kernel uses, the Waiter they take, and
// the ErrorRecord a timed-out wait fills in host-mapped memory (epcomm/runtime/watchdog.py turns it into an exception).
//
// Kernel convention: every communicating kernel takes these three parameters LAST, in this order,
//     ..., uint64_t err_record, long long timeout_ns, int rank)
// (err_record: device address of the process's ErrorSlot, 0 for none; timeout_ns: bound of each wait, from
// EPCOMM_TIMEOUT_S; rank: this rank, for the report), and builds one `comm::Waiter w(err_record, timeout_ns, rank)`.
// Python passes them as `*error_record.wait_params()`.
//
// A wait returns false when it expired or when another thread already recorded an error; the caller then stops its
// work and returns early (after any block-wide barrier it still owes: see block_all_ok), so the whole kernel drains in
// microseconds and the host raises CommTimeoutError instead of hanging. Kernels report other failures (a receive
// buffer too small: kErrCapacity) with record_error; has_error(w) tells every thread to stop.
#pragma once

#include "epcomm/common.cuh"
#include "epcomm/phases.cuh"
#include "epcomm/ptx.cuh"

namespace epcomm::comm {

// ErrorRecord::code values (mirrored by ERR_* in watchdog.py).
constexpr int32_t kErrNone = 0;     // no error
constexpr int32_t kErrWriting = 1;  // a thread claimed the record and is filling it in
constexpr int32_t kErrTimeout = 2;  // a bounded wait expired; every field is valid
constexpr int32_t kErrCapacity = 3; // a receive buffer is too small: observed = rows (or bytes) needed at rank peer,
                                    // expected = what the buffer holds

// ErrorRecord::cmp values: the condition the wait was waiting for (mirrored by CMP_TEXT in watchdog.py).
constexpr int32_t kCmpGeq = 0;  // *addr >= expected
constexpr int32_t kCmpEq = 1;   // *addr == expected
constexpr int32_t kCmpNe = 2;   // *addr != expected

// The report of the first wait that expired in this process. Lives in host-mapped pinned memory (one per process).
// NOTES: the layout is mirrored by ERROR_RECORD_DTYPE in watchdog.py; tests/test_runtime.py compiles this header to PTX
// with every field's offsetof in a __device__ array and compares (NVRTC has no constexpr offsetof, so no
// static_assert on offsets here). Append fields only, and update both.
struct ErrorRecord {
    int32_t code;        // kErr*: written last, with release (the other fields are complete once it is kErrTimeout)
    int32_t rank;        // the rank that waited
    int32_t peer;        // the rank it waited for (-1: itself or unknown)
    int32_t phase;       // epcomm::phase::k*
    int32_t cmp;         // kCmp*
    int32_t block_idx;   // blockIdx.x of the waiting thread
    int64_t observed;    // the last value read (s32 flags sign-extended)
    int64_t expected;    // the value compared against
    int64_t waited_ns;   // how long it waited (globaltimer)
    int32_t thread_idx;  // threadIdx.x of the waiting thread
    int32_t reserved;
};
static_assert(sizeof(ErrorRecord) == 56, "ErrorRecord layout is mirrored by watchdog.ERROR_RECORD_DTYPE");

// Where a process's errors go, in device memory (one per process; watchdog.ErrorRecord allocates it): the address
// of the host-mapped ErrorRecord the host reads, and `seen`, a device copy of "some thread of this process recorded
// an error" that has_error reads instead of the record: reading host memory across PCIe from every block of a grid at
// once costs microseconds per kernel, a device read well under one.
struct ErrorSlot {
    ErrorRecord* record;    // host-mapped (device address); may be nullptr
    int32_t seen;           // 0 until record_error runs on this GPU
    int32_t reserved;
};
static_assert(sizeof(ErrorSlot) == 16, "ErrorSlot layout is mirrored by watchdog.ErrorRecord (two u64 words)");

// How long to wait and where to report; built once per kernel from its three trailing parameters.
struct Waiter {
    ErrorSlot* slot;        // nullptr: report nowhere (the wait still gives up and returns false)
    long long timeout_ns;   // bound of each single wait
    int rank;               // this rank, for the report

    EPCOMM_DEVICE_INLINE Waiter(uint64_t err_record, long long timeout_ns_, int rank_)
        : slot(reinterpret_cast<ErrorSlot*>(err_record)), timeout_ns(timeout_ns_), rank(rank_) {}
};

// Polls of the flag between two reads of the timer and of the error slot.
constexpr uint32_t kPollsPerCheck = 64;
// Back-off between polls: from kMinSleepNs doubling to kMaxSleepNs. Unpaced spinning of thousands of threads with
// system-scope acquire loads competes with the peers' incoming NVLink writes into the same memory (bench/NOTES.md).
// The cap bounds the extra latency a wait can add once its flag arrives.
constexpr uint32_t kMinSleepNs = 32;
constexpr uint32_t kMaxSleepNs = 256;

// True when some thread of this process has already recorded an error: stop working and return. A device-memory read
// (ErrorSlot::seen): errors recorded by earlier kernels of this process are seen too.
EPCOMM_DEVICE_INLINE bool has_error(const Waiter& w) {
    return w.slot != nullptr && ld_relaxed_gpu_s32(&w.slot->seen) != 0;
}

// True in every thread of the block iff ok was true in every thread; a block-wide barrier (all threads must call it).
// Use it where a failed wait in one thread must make the whole block skip its remaining work together.
EPCOMM_DEVICE_INLINE bool block_all_ok(bool ok) { return __syncthreads_and(ok ? 1 : 0) != 0; }

// has_error for a whole block: ONE thread reads the slot and the answer reaches every thread through a block-wide
// barrier.
EPCOMM_DEVICE_INLINE bool block_has_error(const Waiter& w) {
    return __syncthreads_or(threadIdx.x == 0 && has_error(w)) != 0;
}

// Fill the error record with {code, rank, peer, phase, observed, expected, ...}; only the first thread of the process
// to report claims it (code 0 -> kErrWriting), later reports are dropped. Then has_error() is true everywhere.
// Timed-out waits call it with kErrTimeout; kernels call it directly for other errors (e.g. kErrCapacity).
// NOTES: the CAS is GPU scope: only this GPU's threads write this process's record; the host only reads it.
EPCOMM_DEVICE_INLINE void record_error(const Waiter& w, int32_t code, int peer, int phase, int64_t observed,
                                       int64_t expected, int64_t waited_ns = 0, int32_t cmp = kCmpGeq) {
    if (w.slot == nullptr) return;
    st_relaxed_gpu_s32(&w.slot->seen, 1);  // every thread of this GPU stops at its next has_error
    ErrorRecord* err = w.slot->record;
    if (err == nullptr || atomic_cas_acq_rel_gpu_s32(&err->code, kErrNone, kErrWriting) != kErrNone) return;
    st_relaxed_sys_s32(&err->rank, w.rank);
    st_relaxed_sys_s32(&err->peer, peer);
    st_relaxed_sys_s32(&err->phase, phase);
    st_relaxed_sys_s32(&err->cmp, cmp);
    st_relaxed_sys_s32(&err->block_idx, static_cast<int32_t>(blockIdx.x));
    st_relaxed_sys_s64(&err->observed, observed);
    st_relaxed_sys_s64(&err->expected, expected);
    st_relaxed_sys_s64(&err->waited_ns, waited_ns);
    st_relaxed_sys_s32(&err->thread_idx, static_cast<int32_t>(threadIdx.x));
    // Publishes the fields above; pairs with the host's read of `code` in watchdog.ErrorRecord.check (after a
    // stream synchronise, or polled while the kernel still runs).
    st_release_sys_s32(&err->code, code);
}

namespace detail {

// Acquire loads the wait family accepts; each pairs with the releasing store / atomic / NVSHMEM signal of the peer.
EPCOMM_DEVICE_INLINE uint64_t load_acquire(const uint64_t* addr) { return ld_acquire_sys_u64(addr); }
EPCOMM_DEVICE_INLINE int32_t load_acquire(const int32_t* addr) { return ld_acquire_sys_s32(addr); }

template <int32_t kCmp, typename T>
EPCOMM_DEVICE_INLINE bool satisfied(T value, T expected) {
    if constexpr (kCmp == kCmpGeq) return value >= expected;
    else if constexpr (kCmp == kCmpEq) return value == expected;
    else return value != expected;
}

// The one spin loop of epcomm: acquire-load *addr until the condition holds (paced by a short back-off), bounded by
// w.timeout_ns.
template <int32_t kCmp, typename T>
EPCOMM_DEVICE_INLINE bool wait_until(const T* addr, T expected, const Waiter& w, int peer, int phase) {
    T value = load_acquire(addr);
    if (satisfied<kCmp>(value, expected)) return true;  // fast path: no timer read
    const uint64_t start_ns = globaltimer_ns();
    uint32_t sleep_ns = kMinSleepNs;
    for (uint32_t polls = 1;; ++polls) {
        __nanosleep(sleep_ns);
        sleep_ns = sleep_ns < kMaxSleepNs ? 2 * sleep_ns : kMaxSleepNs;
        value = load_acquire(addr);
        if (satisfied<kCmp>(value, expected)) return true;
        if (polls % kPollsPerCheck == 0) {
            if (has_error(w)) return false;  // another thread already failed: drain
            const int64_t waited_ns = static_cast<int64_t>(globaltimer_ns() - start_ns);
            if (waited_ns > w.timeout_ns) {
                record_error(w, kErrTimeout, peer, phase, static_cast<int64_t>(value),
                             static_cast<int64_t>(expected), waited_ns, kCmp);
                return false;
            }
        }
    }
}

}  // namespace detail

// Wait until *addr >= expected (u64 counter or flag). False: timed out or another thread failed; return early.
EPCOMM_DEVICE_INLINE bool wait_geq(const uint64_t* addr, uint64_t expected, const Waiter& w, int peer, int phase) {
    return detail::wait_until<kCmpGeq>(addr, expected, w, peer, phase);
}

// Wait until *addr >= expected (s32 counter or flag).
EPCOMM_DEVICE_INLINE bool wait_geq(const int32_t* addr, int32_t expected, const Waiter& w, int peer, int phase) {
    return detail::wait_until<kCmpGeq>(addr, expected, w, peer, phase);
}

// Wait until *addr == expected (u64).
EPCOMM_DEVICE_INLINE bool wait_eq(const uint64_t* addr, uint64_t expected, const Waiter& w, int peer, int phase) {
    return detail::wait_until<kCmpEq>(addr, expected, w, peer, phase);
}

// Wait until *addr == expected (s32).
EPCOMM_DEVICE_INLINE bool wait_eq(const int32_t* addr, int32_t expected, const Waiter& w, int peer, int phase) {
    return detail::wait_until<kCmpEq>(addr, expected, w, peer, phase);
}

// Wait until *addr != value (u64), e.g. "a count has been written" when 0 means not yet.
EPCOMM_DEVICE_INLINE bool wait_ne(const uint64_t* addr, uint64_t value, const Waiter& w, int peer, int phase) {
    return detail::wait_until<kCmpNe>(addr, value, w, peer, phase);
}

// Wait until *addr != value (s32).
EPCOMM_DEVICE_INLINE bool wait_ne(const int32_t* addr, int32_t value, const Waiter& w, int peer, int phase) {
    return detail::wait_until<kCmpNe>(addr, value, w, peer, phase);
}

// block_has_error after a block's waits, in one barrier instead of two: `ok` is this thread's wait result (true where
// it did not wait). The waits must be warp 0's: thread kWarpSize, which does not wait, reads the slot as it reaches the
// barrier, so the read overlaps the waits instead of following them (errors of earlier kernels, or recorded meanwhile).
// True in every thread when the block must stop; all threads call it (more than one warp).
EPCOMM_DEVICE_INLINE bool block_failed(bool ok, const Waiter& w) {
    return __syncthreads_or(!ok || (threadIdx.x == kWarpSize && has_error(w))) != 0;
}

// The one owner of "last block out": true in every thread of the one block of the grid that counts itself out last
// on *counter (every block calls it once, after its work; the caller resets the counter for the next launch).
// Release: every block's stores (all its threads, ordered by the first barrier) happen before its count, through a
// fence of scope kSystem ? system : GPU; system where the last block passes them on to peers (it then releases a flag
// or signal of its own), GPU where only this GPU's threads read them (e.g. ticket counters).
// Acquire: thread 0 of the last block fences after its count (GPU scope: the counts are this GPU's), and the second
// barrier orders the block's other threads after it.
template <bool kSystem>
EPCOMM_DEVICE_INLINE bool last_block_out(int* counter) {
    __shared__ int is_last;
    __syncthreads();
    if (threadIdx.x == 0) {
        if (kSystem) fence_acq_rel_sys();
        else fence_acq_rel_gpu();
        is_last = atomicAdd(counter, 1) == static_cast<int>(gridDim.x) - 1;
        if (is_last) fence_acq_rel_gpu();
    }
    __syncthreads();
    return is_last != 0;
}

}  // namespace epcomm::comm
