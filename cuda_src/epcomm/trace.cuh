// Diagnostics: in-kernel timestamps at phase boundaries.
#pragma once

#include "epcomm/common.cuh"
#include "epcomm/ptx.cuh"

namespace epcomm {

// Diagnostics (bench: kernel_trace): thread 0 of block 0 writes the global timer (ns) to marks[slot] at a phase
// boundary of its kernel; marks == nullptr, as in normal use, writes nothing.
EPCOMM_DEVICE_INLINE void mark(unsigned long long* marks, int slot) {
    if (marks != nullptr && blockIdx.x == 0 && threadIdx.x == 0) marks[slot] = globaltimer_ns();
}

}  // namespace epcomm
