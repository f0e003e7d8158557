// Diagnostics: in-kernel timestamps at named phase boundaries, compiled in only with -DEPCOMM_DEBUG_TRACE=1
// (epcomm.runtime.diagnostics: the EPCOMM_DEBUG_TRACE switch); otherwise every mark compiles to nothing.
// NOTES: Mark mirrors MARK_NAMES in epcomm/runtime/diagnostics.py (parity test: tests/test_runtime.py parses this enum);
// one `kName = id,` per line, ids in order.
#pragma once

#include "epcomm/common.cuh"
#include "epcomm/ptx.cuh"

#ifndef EPCOMM_DEBUG_TRACE
#define EPCOMM_DEBUG_TRACE 0
#endif

namespace epcomm::trace {

// What each slot records, in the kernels that mark it (intranode dispatch_send, dispatch_recv, combine_stage,
// combine_reduce); block 0 thread 0 unless said otherwise.
enum Mark : int {
    kStart = 0,        // the kernel started
    kRowsStart = 1,    // set up and past the error check: the first row is next
    kRowsDone = 2,     // this block's rows are done
    kCountedOut = 3,   // counted itself out (last block out)
    kSignalled = 4,    // the last block released the done flags to every peer
    kWaited = 5,       // the waits at the start returned (before the error check)
    kArrived = 6,      // every thread of the block arrived at the count
    kAllReceived = 7,  // dispatch_send with fused_recv: the last block saw every source's rows arrive
    kNumMarks = 8,
};

}  // namespace epcomm::trace

#if EPCOMM_DEBUG_TRACE
// One module holds one kernel, so the marks are that kernel's (the host reads them with Module.get_global).
__device__ unsigned long long epcomm_trace_marks[epcomm::trace::kNumMarks];
#endif

namespace epcomm::trace {

// The global timer (ns) into the module's slot, from the calling thread.
EPCOMM_DEVICE_INLINE void stamp(Mark slot) {
#if EPCOMM_DEBUG_TRACE
    epcomm_trace_marks[slot] = globaltimer_ns();
#endif
}

// The global timer (ns) into the module's slot, from thread 0 of block 0.
EPCOMM_DEVICE_INLINE void mark(Mark slot) {
#if EPCOMM_DEBUG_TRACE
    if (blockIdx.x == 0 && threadIdx.x == 0) stamp(slot);
#endif
}

}  // namespace epcomm::trace
